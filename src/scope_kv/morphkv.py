"""MorphKV on SCOPE's split, and as a unified baseline (Ghadia et al., 2025; docs/methods.md).

MorphKV holds the cache at a constant size: the newest ``recent`` entries (the window) and the
``budget - recent`` older entries the window's queries attend to most, chosen again at every
step. :class:`MorphKV` applies the rule to SCOPE's decoding pool and keeps the prompt whole;
:class:`UnifiedMorphKV` is MorphKV as its authors run it, over prompt and output together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .decoding import DecodingStrategy
from .window import score_in_arrival_order, window_attention

if TYPE_CHECKING:
    from .step import AttentionStep

__all__ = ["MorphKV", "UnifiedMorphKV", "morph_scores"]

FUSIONS = ("max", "sum")


def morph_scores(
    keys: torch.Tensor,
    candidates: torch.Tensor,
    window: torch.Tensor,
    window_valid: torch.Tensor,
    scaling: float,
    fusion: str,
) -> torch.Tensor:
    """MorphKV's score of a region's entries (higher is kept), in float32.

    For each window query and KV head: the scaled logits against the candidates, summed over the
    head's query group, a softmax over the candidates only; then fused over the window's real queries
    (``"max"`` or ``"sum"``).

    Parameters
    ----------
    keys : Tensor
        ``(batch, kv_heads, n, dim)``.
    candidates : Tensor
        ``(batch, kv_heads, n)`` bool: the entries that may be evicted.
    window, window_valid : Tensor
        ``(batch, q_heads, w, dim)`` the window's queries, ``(batch, w)`` which are real tokens.
    scaling : float
        The model's softmax scale.
    fusion : str
        ``"max"`` or ``"sum"`` over the window's queries.

    Returns
    -------
    Tensor
        ``(batch, kv_heads, n)``; only the candidates' values mean anything.
    """
    probs = window_attention(keys, candidates, window, scaling, "sum")
    probs = probs * window_valid[:, None, :, None].to(probs.dtype)
    return probs.amax(2) if fusion == "max" else probs.sum(2)


@dataclass(frozen=True)
class MorphKV(DecodingStrategy):
    """MorphKV's selection on SCOPE's decoding pool; the prompt is kept whole.

    At every step at which the pool holds ``budget`` entries, keep the newest ``recent`` (the window,
    whose queries score the rest) and the ``budget - recent`` older entries :func:`morph_scores` ranks
    highest.

    Parameters
    ----------
    budget : int
        Decoding-pool entries kept per layer and KV head (MorphKV's ``C + R``).
    recent : int
        The window ``R``: the newest entries, always kept, whose queries score the others.
    fusion : str
        ``"max"`` (the authors' setting for long outputs) or ``"sum"`` over the window's queries.
    """

    spec_kind: ClassVar[str] = "morphkv"
    spec_fields: ClassVar[tuple[str, ...]] = ("fusion",)

    fusion: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.fusion not in FUSIONS:
            raise ValueError(f"{type(self).__name__}.fusion must be one of {FUSIONS}, got {self.fusion!r}.")

    @property
    def query_window(self) -> int:
        return self.recent

    def score(self, step: AttentionStep, first: int, last: int) -> torch.Tensor:
        def rule(keys: torch.Tensor, valid: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            assert step.window is not None and step.window_valid is not None  # kept by the layer (query_window)
            return morph_scores(keys, candidates, step.window, step.window_valid, step.scaling, self.fusion)

        return score_in_arrival_order(step, first, last, self.recent, rule)


@dataclass(frozen=True)
class UnifiedMorphKV(MorphKV):
    """MorphKV as its authors run it: one budget over prompt and output entries together
    (parameters as :class:`MorphKV`; the budget is the total ``C + R``)."""

    spec_kind: ClassVar[str] = "unified-morphkv"

    evicts_prompt: ClassVar[bool] = True
