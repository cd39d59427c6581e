"""`AttentionStep`: one forward's attention in one managed layer, as a small immutable record.

The scope attention function (:mod:`scope_kv.attention`) builds it once the attention has run
and hands it to the layer (:meth:`scope_kv.layer.ScopeLayer.after_attention`), which plans,
scores, selects and compacts from it. A decoding strategy's scorer
(:meth:`scope_kv.DecodingStrategy.score`) receives it too, so a new scoring rule needs nothing
but the record.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .kernels import candidate_scores
from .masks import valid_slots
from .selection import attention_scores

__all__ = ["AttentionStep", "DecodeAttention"]


@dataclass(frozen=True)
class DecodeAttention:
    """How the attention function should run a decode step the layer scores from the log-sum-exp:
    the grouped decode attention (:func:`scope_kv.kernels.grouped_decode_attention`) with this
    ``kernel`` and ``splits``."""

    kernel: str = "auto"
    splits: int | None = None


@dataclass(frozen=True)
class AttentionStep:
    """What one forward's attention saw in one managed layer.

    Attributes
    ----------
    module : nn.Module
        The attention module (``module.layer_idx`` is the layer).
    query : Tensor
        ``(batch, q_heads, q, dim)`` the forward's queries (post-RoPE, post-norm).
    keys, values : Tensor
        ``(batch, kv_heads, length, dim)`` every entry the layer held during the attention,
        this forward's included (views of the layer's storage; physical slots).
    mask : Tensor or None
        The mask the attention used, in ``backend``'s format, in physical slots
        (:mod:`scope_kv.masks`).
    backend : str
        ``sdpa``, ``eager`` or a flash backend.
    scaling : float
        The softmax scale the attention used (the model's, or ``dim ** -0.5``).
    softcap : float or None
        Logit soft-capping, if the model uses it.
    lse : Tensor or None
        ``(batch, q_heads)`` float32 log-sum-exp of a one-query forward's scaled logits over the
        whole attended context, when the grouped decode attention ran (it returns it).
    head_valid : Tensor or None
        ``(batch, kv_heads, length)`` boolean valid slots per KV head, when they differ between
        heads (a static-layout layer, :mod:`scope_kv.static`); ``None``: :attr:`valid` holds for
        every head.
    arrival : Tensor or None
        ``(batch, kv_heads, length)`` int64 order in which the slots' entries arrived, when slot
        order is not arrival order (the static layout); ``None``: slot ``j`` arrived ``j``-th.
    window : Tensor or None
        ``(batch, q_heads, w, dim)`` the newest ``w`` queries the layer saw, this forward's last
        (oldest first), for a strategy with a :attr:`~scope_kv.DecodingStrategy.query_window`.
    window_valid : Tensor or None
        ``(batch, w)`` boolean: which of them are real tokens (not padding, not yet seen).
    decode : DecodeAttention or None
        Set by the layer when this step should run the grouped decode attention, which returns
        the log-sum-exp the layer then scores from (an sdpa attention function takes it where the
        call is plain softmax); ``None``: the backend's own attention.
    kv_repeat : int
        How many times the layer stores each KV head (per-query-head selection): the backend
        then attends one stored head per query head.
    """

    module: torch.nn.Module
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None
    backend: str
    scaling: float
    softcap: float | None = None
    lse: torch.Tensor | None = None
    head_valid: torch.Tensor | None = None
    arrival: torch.Tensor | None = None
    window: torch.Tensor | None = None
    window_valid: torch.Tensor | None = None
    decode: DecodeAttention | None = None
    kv_repeat: int = 1

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def length(self) -> int:
        """Physical slots attended to."""
        return self.keys.shape[-2]

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @property
    def valid(self) -> torch.Tensor | None:
        """The slots the forward's last query could attend to: boolean ``(batch, length)``, or
        ``(batch, kv_heads, length)`` when they differ per KV head; ``None`` when all of them."""
        if self.head_valid is not None:
            return self.head_valid
        return valid_slots(self.mask, self.batch, self.length, self.keys.device)

    def arrival_order(self, first: int = 0, last: int | None = None) -> torch.Tensor:
        """``(batch, kv_heads, last - first)`` int64: when each slot's entry arrived (larger = newer)."""
        last = self.length if last is None else last
        if self.arrival is not None:
            return self.arrival[..., first:last]
        order = torch.arange(first, last, device=self.keys.device)
        return order.expand(self.batch, self.keys.shape[1], last - first)

    def with_lse(self, lse: torch.Tensor) -> AttentionStep:
        """This record with the attention's log-sum-exp. Every layer of every eager decode step
        makes one, so it copies the fields directly (``dataclasses.replace`` re-runs the
        constructor: ~9x the host time). A compiled step takes the constructor: the compiler
        cannot trace a write into an instance's ``__dict__``, and the copy costs nothing there."""
        if torch.compiler.is_compiling():
            return replace(self, lse=lse)
        step = object.__new__(AttentionStep)
        step.__dict__.update(self.__dict__)
        object.__setattr__(step, "lse", lse)  # the record is frozen to everyone else
        return step

    def probabilities(self, first: int = 0, last: int | None = None) -> torch.Tensor:
        """SCOPE's score of the held slots ``[first, last)`` (docs/method.md §5).

        The newest query's softmax probability on each slot, the softmax taken over the whole
        held context per query head, summed over each KV head's query group.

        Returns
        -------
        Tensor
            ``(batch, kv_heads, last - first)`` float32. With :attr:`lse` this costs
            O(``last - first``) per head; otherwise one pass over every held key.
        """
        last = self.length if last is None else last
        if self.lse is not None:
            return candidate_scores(self.query[:, :, -1:], self.keys[:, :, first:last], self.lse, self.scaling)
        return attention_scores(self.query, self.keys, self.valid, self.scaling, self.softcap)[..., first:last]
