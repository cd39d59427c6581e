"""H2O as a prefill compressor (Zhang et al., NeurIPS 2023, "H2O: Heavy-Hitter Oracle for
Efficient Generative Inference of Large Language Models").

An entry's score is the attention it accumulates from every prompt query (causal: query
``i`` only sees entries ``j <= i``); the newest ``recent`` prompt entries are always kept and
the top ``budget - recent`` of the others by accumulated score complete the budget.

Memory: the accumulation runs inside the attention function, one block of ``block``
queries at a time, so the largest temporary is ``q_heads x block x prompt`` floats per
layer, never the ``prompt x prompt`` matrix; the running scores are ``kv_heads x prompt``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._checks import check_int
from ..selection import causal_probs
from .base import PrefillCompressor, PrefillMemo

__all__ = ["H2O", "accumulated_attention"]


def accumulated_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    start: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
    block: int = 256,
) -> torch.Tensor:
    """Causal attention received by every key from the given queries, summed per KV head.

    Parameters
    ----------
    query : Tensor
        ``(batch, q_heads, q, dim)`` queries of the tokens at the last ``q`` slots.
    keys : Tensor
        ``(batch, kv_heads, length, dim)``.
    start : Tensor or None
        ``(batch,)`` leading invalid slots per row (never scored; their queries ignored).
    scaling, softcap
        As the model applies them.
    block : int
        Queries scored at once (memory ``q_heads x block x length`` floats).

    Returns
    -------
    Tensor
        ``(batch, kv_heads, length)`` float32: per KV head, the sum over its query group and
        over the queries of their softmax probabilities.
    """
    batch, q_heads, q_len, _ = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    total = keys.new_zeros((batch, q_heads, length), dtype=torch.float32)
    first = length - q_len
    for lo in range(0, q_len, block):
        hi = min(q_len, lo + block)
        probs = causal_probs(query[:, :, lo:hi], keys, first + lo, start, scaling, softcap)
        total += probs.sum(dim=2)
        del probs
    return total.reshape(batch, kv_heads, q_heads // kv_heads, length).sum(dim=2)


@dataclass
class H2OMemo(PrefillMemo):
    """H2O's memo: attention accumulated per prompt slot over the prompt's queries so far."""

    scores: torch.Tensor | None = None  # (batch, kv_heads, prompt slots seen)


@dataclass(frozen=True)
class H2O(PrefillCompressor):
    """H2O heavy hitters of the prompt plus a recent window.

    Parameters
    ----------
    budget : int
        Prompt entries kept per layer and KV head.
    recent : int
        Newest prompt entries always kept (``0 <= recent < budget``).
    block : int
        Prompt queries scored at once (memory bound ``q_heads x block x prompt`` floats).
    """

    spec_kind: ClassVar[str] = "h2o"
    spec_fields: ClassVar[tuple[str, ...]] = ("recent", "block")

    recent: int = 8
    block: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("H2O.recent", self.recent, 0)
        check_int("H2O.block", self.block, 1)
        if self.recent >= self.budget:
            raise ValueError(
                f"H2O: recent ({self.recent}) must be smaller than budget ({self.budget}); the rest of "
                "the budget holds the heavy hitters. Lower recent or raise budget."
            )

    memo_type = H2OMemo

    def observe(
        self,
        memo: H2OMemo,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        start: torch.Tensor,
        scaling: float,
        softcap: float | None,
    ) -> None:
        scores = accumulated_attention(query, keys, start, scaling, softcap, self.block)
        previous = memo.scores
        if previous is not None:
            scores[..., : previous.shape[-1]] += previous
        memo.scores = scores

    def scores(self, memo: H2OMemo, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        assert memo.scores is not None  # observed: compression follows a prefill forward
        scores = memo.scores[..., : keys.shape[2]].clone()
        if self.recent:
            scores[..., -self.recent :] = float("inf")
        return scores
