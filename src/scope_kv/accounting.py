"""KV accounting: what any cache holds and what it costs, counted one way everywhere.

Used by :class:`~scope_kv.ScopeCache` itself, the eval harnesses, the demo, the examples and
the benchmarks, so that every figure the project prints means the same thing.

Terms (per layer):

* an **entry** is one token's key and value, per batch row and KV head;
* **held bytes** are the bytes of the entries the layer holds now (``entries x batch x kv_heads
  x head_dim x itemsize``, keys and values);
* **allocated bytes** are the bytes of the layer's K/V storage, pre-allocated room included
  (what the cache costs in memory; a ``ScopeLayer`` reserves ``prompt + max_held`` slots).

Works for :class:`~scope_kv.ScopeCache` and for transformers' caches (``DynamicCache``,
``StaticCache``, sliding-window layers), by reading each layer's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["KVFootprint", "bytes_per_entry", "kv_footprint"]


@dataclass(frozen=True)
class KVFootprint:
    """What a cache holds now.

    Attributes
    ----------
    entries : tuple[int, ...]
        Entries held per layer (per batch row and KV head; pad slots included).
    held_bytes : int
        Bytes of the held entries, over every layer, row and KV head, keys and values.
    allocated_bytes : int
        Bytes of K/V storage allocated, pre-allocated room included.
    """

    entries: tuple[int, ...]
    held_bytes: int
    allocated_bytes: int

    @property
    def total_entries(self) -> int:
        """Entries summed over layers."""
        return sum(self.entries)


def _layer_footprint(layer: Any) -> tuple[int, int, int]:
    """(entries held, held bytes, allocated bytes) of one cache layer."""
    keys = getattr(layer, "keys", None)
    values = getattr(layer, "values", None)
    if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.numel() == 0:
        return 0, 0, 0
    # ScopeLayer's storage is longer than what it holds (`length`); transformers' layers hold
    # exactly their tensors' length.
    held = int(getattr(layer, "length", keys.shape[-2]))
    allocated = keys.nbytes + values.nbytes
    per_slot = allocated // keys.shape[-2]
    return held, held * per_slot, allocated


def kv_footprint(cache: Any) -> KVFootprint:
    """Entries and bytes ``cache`` holds now (any transformers ``Cache`` with ``layers``).

    Parameters
    ----------
    cache : transformers.Cache
        A :class:`~scope_kv.ScopeCache`, ``DynamicCache``, ``StaticCache``...

    Returns
    -------
    KVFootprint
    """
    entries, held, allocated = [], 0, 0
    for layer in cache.layers:
        n, h, a = _layer_footprint(layer)
        entries.append(n)
        held += h
        allocated += a
    return KVFootprint(tuple(entries), held, allocated)


def bytes_per_entry(model: Any, dtype: torch.dtype | None = None) -> int:
    """Bytes one entry costs in one layer (keys and values, every KV head, one batch row).

    Parameters
    ----------
    model : PreTrainedModel
        Gives the KV geometry (``num_key_value_heads``, ``head_dim``).
    dtype : torch.dtype, optional
        The cache's dtype; the model's by default.
    """
    config = model.config.get_text_config(decoder=True)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty((), dtype=dtype or model.dtype).element_size()
    return 2 * heads * head_dim * itemsize
