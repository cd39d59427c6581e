"""The base of every prefill compressor (docs/method.md §6).

A prefill compressor decides, once per prompt, which prompt entries each layer keeps in
its prefill pool. It is a frozen configuration with no state: what it gathers while the
prompt runs lives in a memo, a :class:`PrefillMemo` of the type the compressor declares
(``memo_type``), which each layer creates per prompt and hands only to the compressor; the layer
does the eviction itself (:func:`scope_kv.selection.keep_top_`). A compressor answers three
questions:

* ``observe(memo, ...)`` -- called after every prefill forward's attention, with that
  forward's queries: keep what scoring will need in the memo's fields (a window of queries,
  running scores...);
* ``keep_counts(real, layer_idx, num_layers)`` -- how many entries each batch row keeps;
* ``scores(memo, ...)`` -- one score per prompt slot and KV head; the best ``count`` are kept.

Compression runs when the prefill has ended, i.e. at the first decoding step (the only
point where chunked prefill is known to be over), before that step's entry is appended.

GQA: KV is stored per KV head, so each KV head keeps one set. Scores that come from
attention are computed per query head and *summed over the KV head's query group*: the
group shares the kept entries, so they should be the ones the group attends to most in
total (for a group of one this is exactly the published per-head rule).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch

from .._checks import check_int, spec_text

__all__ = ["PrefillCompressor", "PrefillMemo", "check_int"]


@dataclass
class PrefillMemo:
    """What a compressor gathers while one prompt runs, in one layer (base: nothing).

    A compressor that keeps something declares a subclass with one field per item and names it in
    ``memo_type``; the layer creates one per prompt and hands it only to that compressor's methods.
    Fields that hold per-row tensors (or lists or tuples of them) follow the batch when
    ``generate`` re-indexes it (beam search): :meth:`map_batch`.
    """

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch re-indexing to every tensor field (and to tensors inside list / tuple fields)."""
        for f in fields(self):
            setattr(self, f.name, _map_tensors(getattr(self, f.name), fn))


def _map_tensors(item: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(item, torch.Tensor):
        return fn(item)
    if isinstance(item, (list, tuple)):
        return type(item)(_map_tensors(x, fn) for x in item)
    return item


@dataclass(frozen=True)
class PrefillCompressor:
    """Base of every prefill compressor.

    Parameters
    ----------
    budget : int
        Prompt entries kept per layer and KV head. A prompt (batch row) with at most
        ``budget`` real tokens is kept whole.
    """

    budget: int

    # the memo this compressor keeps per layer and prompt (a subclass declares its own)
    memo_type: ClassVar[type[PrefillMemo]] = PrefillMemo

    def __post_init__(self) -> None:
        check_int(f"{type(self).__name__}.budget", self.budget, 1)

    def new_memo(self) -> PrefillMemo:
        """An empty memo for one layer's prompt."""
        return self.memo_type()

    def keep_counts(
        self, real: torch.Tensor, layer_idx: int, num_layers: int, module: torch.nn.Module | None = None
    ) -> torch.Tensor:
        """Entries kept per batch row.

        Parameters
        ----------
        real : Tensor
            ``(batch,)`` int64 real (non-padding) prompt entries held by each row.
        layer_idx, num_layers : int
            The layer, and the model's number of decoder layers (for per-layer budgets).
        module : nn.Module, optional
            The layer's attention module (adapters of external methods may need it).

        Returns
        -------
        Tensor
            ``(batch,)`` int64, ``min(budget, real)`` unless a subclass says otherwise.
        """
        return real.clamp(max=self.budget)

    def observe_input(self, memo: Any, hidden_states: torch.Tensor, position_embeddings: Any) -> None:
        """Record a prefill forward's attention *input*, before the attention runs (default: nothing).

        Our own compressors score from the queries :meth:`observe` receives; adapters of external
        scorers that recompute them from the module's input (kvpress presses) keep it here.

        Parameters
        ----------
        memo : PrefillMemo
            This compressor's memo for the layer and prompt (of its ``memo_type``).
        hidden_states : Tensor
            ``(batch, q, hidden)`` the attention module's input.
        position_embeddings : tuple of Tensor or None
            ``(cos, sin)``, each ``(batch, q, rotary_dim)``, as the model passes them.
        """

    def observe(
        self,
        memo: Any,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        start: torch.Tensor,
        scaling: float,
        softcap: float | None,
    ) -> None:
        """Record what scoring needs from one prefill forward (default: nothing).

        Parameters
        ----------
        memo : PrefillMemo
            This compressor's memo for the layer and prompt (a fresh one after compression).
        module : nn.Module
            The attention module.
        query : Tensor
            ``(batch, q_heads, q, dim)`` this forward's queries (post-RoPE); they sit at slots
            ``[length - q, length)``.
        keys : Tensor
            ``(batch, kv_heads, length, dim)`` every key held, this forward's included.
        start : Tensor
            ``(batch,)`` leading invalid (padding) slots per row.
        scaling : float
            The model's softmax scale.
        softcap : float or None
            Logit soft-capping, if the model uses it.
        """

    def scores(
        self,
        memo: Any,
        keys: torch.Tensor,
        values: torch.Tensor,
        start: torch.Tensor,
    ) -> torch.Tensor:
        """Score every prompt slot; the layer keeps the best ``keep_counts`` per row and KV head.

        Parameters
        ----------
        memo : PrefillMemo
            What :meth:`observe` recorded.
        keys, values : Tensor
            ``(batch, kv_heads, prompt, dim)`` the prefill pool.
        start : Tensor
            ``(batch,)`` leading invalid slots per row (the caller masks them out).

        Returns
        -------
        Tensor
            ``(batch, kv_heads, prompt)``; higher is kept first, ``+inf`` always kept.
        """
        raise NotImplementedError

    # The spec grammar's name for this class (scope_kv.spec), declared by each class it names, and
    # the settings its spec string writes (``key=value``, when they differ from the default).
    spec_kind: ClassVar[str] = ""
    spec_fields: ClassVar[tuple[str, ...]] = ()

    def spec_budget(self) -> str:
        """The budget part of this compressor's spec string."""
        return str(self.budget)

    def spec_settings(self) -> tuple[str, ...]:
        """The fields its spec string writes as ``key=value`` when they differ from the default."""
        return self.spec_fields

    def describe(self) -> str:
        """This compressor as a spec string that builds it again (:func:`scope_kv.spec.parse_spec`)."""
        return spec_text(self)
