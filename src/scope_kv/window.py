"""`QueryWindow`: the newest queries of one layer, for strategies that score from several of them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .step import AttentionStep

__all__ = ["QueryWindow", "score_in_arrival_order", "window_attention"]


class QueryWindow:
    """The newest ``size`` queries a layer saw, oldest first, and which of them are real tokens.

    The buffers have one shape for the whole generation and are written in place, so a compiled
    decode step keeps them too. A decoding strategy asks for them with
    :attr:`~scope_kv.DecodingStrategy.query_window`; the step hands them over as
    :attr:`~scope_kv.AttentionStep.window` / ``window_valid``.

    Parameters
    ----------
    size : int
        How many queries are kept (0: none, the object does nothing).
    """

    def __init__(self, size: int):
        self.size = size
        self.queries: torch.Tensor | None = None  # (batch, q_heads, size, dim)
        self.valid: torch.Tensor | None = None  # (batch, size) bool

    def reset(self) -> None:
        self.queries = self.valid = None

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.queries is not None and self.valid is not None:
            self.queries, self.valid = fn(self.queries), fn(self.valid)

    def observe(self, query: torch.Tensor, valid: torch.Tensor | None) -> None:
        """A forward's ``(batch, q_heads, q, dim)`` queries and which are real tokens, ``(batch, q)``
        (``None``: all of them)."""
        if not self.size:
            return
        if valid is None:
            valid = torch.ones_like(query[:, 0, :, 0], dtype=torch.bool)
        if self.queries is None or self.valid is None:
            batch, q_heads, _, dim = query.shape
            self.queries = query.new_zeros(batch, q_heads, self.size, dim)
            self.valid = torch.zeros(batch, self.size, dtype=torch.bool, device=query.device)
        self.queries.copy_(torch.cat([self.queries, query.to(self.queries.dtype)], dim=2)[:, :, -self.size :])
        self.valid.copy_(torch.cat([self.valid, valid], dim=1)[:, -self.size :])


def window_attention(
    keys: torch.Tensor, candidates: torch.Tensor, window: torch.Tensor, scaling: float, group: str
) -> torch.Tensor:
    """Each window query's attention over the candidates, per KV head, in float32.

    ``(batch, kv_heads, w, n)``: the scaled logits of the ``(batch, q_heads, w, dim)`` window queries
    against the ``(batch, kv_heads, n, dim)`` keys, reduced over each KV head's query group (``"max"``
    or ``"sum"``) before a softmax over the ``(batch, kv_heads, n)`` candidates only (0 elsewhere).
    """
    batch, kv_heads, _, dim = keys.shape
    q = window.float().reshape(batch, kv_heads, window.shape[1] // kv_heads, -1, dim)
    logits = torch.matmul(q, keys.float()[:, :, None].transpose(-1, -2))  # (batch, kv_heads, group, w, n)
    logits = (logits.amax(2) if group == "max" else logits.sum(2)) * scaling
    logits = logits.masked_fill(~candidates[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)


def score_in_arrival_order(
    step: AttentionStep,
    first: int,
    last: int,
    recent: int,
    rule: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Scores of the slots ``[first, last)`` by a ``rule`` that reads the whole region ``[first, length)``
    oldest first, in either layout.

    ``rule(keys, valid, candidates)`` receives the region's ``(batch, kv_heads, n, dim)`` keys in
    arrival order (invalid slots last), which are real entries, and which are candidates (real, and
    older than the newest ``recent``); it returns ``(batch, kv_heads, n)`` scores, which go back to
    slot order here. (In the default layout slot order is arrival order and the candidates are
    ``[first, last)``; in the static layout slots are in any order.)
    """
    batch, kv_heads, length = step.keys.shape[0], step.keys.shape[1], step.length
    keys = step.keys[:, :, first:]
    valid = step.valid
    if valid is None:
        valid = torch.ones(batch, length, dtype=torch.bool, device=keys.device)
    if valid.dim() == 2:
        valid = valid[:, None].expand(batch, kv_heads, length)
    valid = valid[..., first:]
    arrival = step.arrival_order(first, length)
    order = torch.argsort(arrival.masked_fill(~valid, torch.iinfo(arrival.dtype).max), dim=-1, stable=True)
    keys = keys.gather(2, order[..., None].expand_as(keys))
    valid = valid.gather(-1, order)
    index = torch.arange(length - first, device=keys.device)
    candidates = valid & (index < valid.sum(-1, keepdim=True) - recent)
    if step.arrival is None:  # slot order is arrival order: the candidates are [first, last)
        candidates &= index < last - first
    scores = rule(keys, valid, candidates)
    return torch.empty_like(scores).scatter_(-1, order, scores)[..., : last - first]
