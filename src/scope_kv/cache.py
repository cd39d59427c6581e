"""`ScopeCache`: a transformers `Cache` that keeps the prompt's KV and holds the generated
tokens' KV to a budget (SCOPE, Wu et al., ACL 2025).

Layout of one managed layer's storage, per batch row and KV head (never per query head)::

    slot:  0 ......... prefill_length ............. length ........ capacity
           [ prefill pool (pads first) | decoding pool | free (pre-allocated) ]

* ``seen``            logical tokens this layer has processed (what `get_seq_length` reports;
                      generate slices ``input_ids`` with it and positions derive from it);
* ``length``          physical slots held (what the attention mask is sized for);
* ``prefill_length``  the prefill/decoding boundary, recorded when a prefill forward runs.

Left padding stays at the front of the prefill pool and is never evicted, so column ``j`` of
the 2-D attention mask transformers builds describes slot ``j`` (we report mask sizes
``(length + q, 0)``; see DESIGN §3). Selection happens *after* the step's attention, from the
attention function in :mod:`scope_kv.attention`, so the step sees the pool before eviction.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .attention import enable_scope_attention
from .decoding import DecodingStrategy
from .selection import attention_scores, compact_, select_heavy, valid_keys

logger = logging.getLogger(__name__)

__all__ = ["ScopeCache", "ScopeLayer"]

# Unbounded (``decoding=None``) layers grow by this factor, so appends cost O(1) amortised.
_GROWTH = 1.5
_MIN_GROWTH = 128


class ScopeLayer(CacheLayerMixin):
    """One decoder layer's SCOPE cache: a prefill pool and a decoding pool in one buffer.

    Parameters
    ----------
    layer_idx : int
        Index of the decoder layer.
    decoding : DecodingStrategy or None
        Budget and selection timing for the decoding pool; ``None`` keeps every entry.
    module_ids : frozenset[int]
        ``id`` of every module of the model the cache was built for (to refuse another model).
    """

    is_sliding = False
    is_compileable = False
    # `crop` cannot restore evicted entries, so stop-string rollback / assisted decoding stay off.
    is_croppable = False

    def __init__(self, layer_idx: int, decoding: DecodingStrategy | None, module_ids: frozenset[int]):
        super().__init__()
        self.layer_idx = layer_idx
        self.decoding = decoding
        self._module_ids = module_ids
        self._clear()

    def _clear(self) -> None:
        self.keys = None  # (batch, kv_heads, capacity, dim)
        self.values = None
        self.is_initialized = False
        self.seen = 0
        self.length = 0
        self.prefill_length = 0
        self.step = 0  # decoding forwards completed since the last prefill: SCOPE's t
        self.skipped = 0  # discontinuous: eligible steps skipped since the last selection
        self.selections = 0  # selections run since the last prefill (for reports)
        self._decode_pending = False
        self._awaiting_attention = False

    # -- CacheLayerMixin ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the forward's new entries and return every held entry.

        Parameters
        ----------
        key_states, value_states : Tensor
            ``(batch, kv_heads, q, dim)`` new entries (RoPE already applied to keys).

        Returns
        -------
        (keys, values) : tuple[Tensor, Tensor]
            ``(batch, kv_heads, length, dim)`` views of the held slots, tagged so that the scope
            attention function can find this layer.
        """
        if self._awaiting_attention:
            raise RuntimeError(
                f"layer {self.layer_idx}: the previous forward never reached scope_kv's attention function, so "
                "nothing could be selected. The model's attention must route through transformers' "
                "AttentionInterface with the implementation ScopeCache(model) set; build the cache with the "
                "model you generate with, and do not change its attn_implementation afterwards."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shapes(key_states, value_states)
        q = key_states.shape[-2]
        decode = self.length > 0 and q == 1
        if decode:
            self._reserve(self.length + 1)
        else:
            # A prefill forward (the first, a chunk, or a new turn's prompt). Whatever the previous
            # turn's decoding pool held joins the prefill pool, and the schedule starts afresh.
            headroom = 0 if self.decoding is None else self.decoding.max_held
            self._reserve(self.length + q + headroom)
        end = self.length + q
        self.keys[:, :, self.length : end].copy_(key_states)
        self.values[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.seen += q
        if decode:
            self._decode_pending = True
        else:
            self.prefill_length = end
            self.step = 0
            self.skipped = 0
            self.selections = 0
        self._awaiting_attention = True
        keys = self.keys[:, :, : self.length]
        values = self.values[:, :, : self.length]
        keys._scope_layer = self  # read by scope_kv.attention; a plain attribute on this view only
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Physical coordinates: mask column j is slot j (pads stay at the front).
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "ScopeCache cannot be cropped: evicted entries cannot be restored. Assisted decoding and "
            "stop-string rollback need a croppable cache (DynamicCache)."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length > 0:
            idx = beam_idx.to(self.device)
            self.keys = self.keys.index_select(0, idx)
            self.values = self.values.index_select(0, idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]

    # -- selection ------------------------------------------------------------------------
    def after_attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
    ) -> None:
        """Called by the scope attention function once the step's attention has run.

        Parameters
        ----------
        module : nn.Module
            The attention module (checked to belong to the model the cache was built for).
        query : Tensor
            ``(batch, q_heads, q, dim)`` the step's queries (post-RoPE).
        keys : Tensor
            ``(batch, kv_heads, length, dim)`` the keys the step attended to.
        attention_mask : Tensor or None
            The mask the step used.
        """
        self._awaiting_attention = False
        if id(module) not in self._module_ids:
            raise ValueError(
                f"layer {self.layer_idx}: this ScopeCache was built for another model. Build one "
                "ScopeCache(model, ...) per model; a cache cannot move between models."
            )
        if not self._decode_pending:
            return
        self._decode_pending = False
        t = self.step
        self.step += 1
        if self.decoding is None:
            return
        recent = self.decoding.recent
        n_decoding = self.length - self.prefill_length
        select, self.skipped = self.decoding.plan(n_decoding, t, self.skipped)
        if not select:
            return
        self.selections += 1
        keep = self.decoding.budget_at(t) - recent
        n_candidates = n_decoding - recent
        if keep >= n_candidates:
            return  # the pool is exactly at budget: nothing to evict
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        valid = valid_keys(attention_mask, keys.shape[0], keys.shape[-2], keys.device)
        scores = attention_scores(query, keys, valid, scale, softcap)
        candidates = scores[:, :, self.prefill_length : self.prefill_length + n_candidates]
        heavy = select_heavy(candidates, keep)
        self.length = compact_(self.keys, self.values, self.prefill_length, self.length, heavy, recent)

    # -- helpers --------------------------------------------------------------------------
    def _check_shapes(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[-1])
        got = (key_states.shape[0], key_states.shape[1], key_states.shape[-1])
        if self.length > 0 and got != expected:
            raise ValueError(
                f"layer {self.layer_idx}: got key states (batch, kv_heads, dim) = {got} but this cache holds "
                f"{expected}. A ScopeCache belongs to one model and one batch: build a new one (or call "
                "cache.reset()) for another model or batch."
            )

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` slots; copies only when the buffer must grow."""
        if needed <= self.capacity:
            return
        if self.decoding is None:
            needed = max(needed, math.ceil(self.capacity * _GROWTH), self.capacity + _MIN_GROWTH)
        shape = (*self.keys.shape[:2], needed, self.keys.shape[-1])
        keys = self.keys.new_empty(shape)
        values = self.values.new_empty(shape)
        keys[:, :, : self.length].copy_(self.keys[:, :, : self.length])
        values[:, :, : self.length].copy_(self.values[:, :, : self.length])
        self.keys, self.values = keys, values

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated by this layer."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def summary(self) -> dict[str, int]:
        return {
            "layer": self.layer_idx,
            "seen": self.seen,
            "held": self.length,
            "prefill": self.prefill_length,
            "decoding": self.length - self.prefill_length,
            "capacity": self.capacity,
            "step": self.step,
            "selections": self.selections,
            "bytes": self.nbytes(),
        }


class ScopeCache(Cache):
    """KV cache implementing SCOPE's decoding-phase compression for any transformers decoder.

    Parameters
    ----------
    model : PreTrainedModel
        The model this cache will be used with. Its attention is switched (idempotently) to
        scope_kv's attention function, which passes through unchanged for any other cache.
    decoding : DecodingStrategy or None
        :class:`~scope_kv.Slide`, :class:`~scope_kv.Adaptive` or :class:`~scope_kv.Discontinuous`;
        ``None`` keeps every generated entry (the prompt is always kept whole).

    Notes
    -----
    Full-attention layers are managed; sliding-window layers (Gemma 3 style) stay transformers'
    own layers, which already bound them. On a new ``generate`` call with the same cache
    (multi-turn), the new turn's prompt tokens and what the previous turn's decoding pool held
    both join the prefill pool; the decoding schedule (step, skip counter) starts afresh.
    """

    def __init__(self, model: PreTrainedModel, decoding: DecodingStrategy | None = None):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"ScopeCache(model, ...) takes the transformers model itself, got {type(model).__name__}."
            )
        if decoding is not None and not isinstance(decoding, DecodingStrategy):
            raise TypeError(
                f"decoding must be Slide(...), Adaptive(...), Discontinuous(...) or None, got {decoding!r}."
            )
        config = model.config.get_text_config(decoder=True)
        template = DynamicCache(config=config)
        module_ids = frozenset(id(m) for m in model.modules())
        layers: list[Any] = []
        for idx, layer in enumerate(template.layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                layers.append(layer)  # bounded by its window already; transformers' own layer
            elif type(layer) is DynamicLayer:
                layers.append(ScopeLayer(idx, decoding, module_ids))
            elif not isinstance(layer, CacheLayerMixin) and type(layer).__name__ == "DummyLayer":
                layers.append(layer)
            else:
                raise ValueError(
                    f"layer {idx} of {type(model).__name__} needs a {type(layer).__name__}; scope_kv manages "
                    "plain attention KV caches only (full or sliding-window attention)."
                )
        if not any(isinstance(layer, ScopeLayer) for layer in layers):
            window = getattr(config, "sliding_window", None)
            raise ValueError(
                f"every attention layer of {type(model).__name__} is a sliding-window layer (sliding_window={window}), "
                "so there is nothing for ScopeCache to compress. If your prompts plus outputs stay within the "
                "window, or the checkpoint was trained without one (e.g. Mistral-7B v0.2+), set "
                "`model.config.sliding_window = None` before building the cache."
            )
        super().__init__(layers=layers)
        self.decoding = decoding
        self.attn_implementation = enable_scope_attention(model)

    # -- lengths --------------------------------------------------------------------------
    def get_query_offset(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        if isinstance(layer, ScopeLayer):
            return layer.length  # physical: the mask describes held slots
        return super().get_query_offset(layer_idx)

    def kv_length(self, layer_idx: int) -> int:
        """Entries physically held by layer ``layer_idx`` (per batch row and KV head; pad slots included)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, ScopeLayer):
            return layer.length
        keys = getattr(layer, "keys", None)
        return 0 if keys is None or keys.numel() == 0 else keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated now, over every layer (what the cache costs in memory)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, ScopeLayer):
                total += layer.nbytes()
            else:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.nbytes
        return total

    def summary(self) -> list[dict[str, Any]]:
        """Per-layer state: tokens seen, entries held (prefill / decoding), capacity, bytes."""
        rows = []
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, ScopeLayer):
                rows.append(layer.summary())
            else:
                rows.append({"layer": idx, "kind": type(layer).__name__, "held": self.kv_length(idx)})
        return rows

    def __repr__(self) -> str:
        managed = sum(isinstance(layer, ScopeLayer) for layer in self.layers)
        return f"ScopeCache(decoding={self.decoding!r}, layers={len(self.layers)}, managed={managed})"
