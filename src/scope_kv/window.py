"""`QueryWindow`: the newest queries of one layer, for strategies that score from several of them."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["QueryWindow"]


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
