"""`PositionGuard`: refuses a forward whose positions do not continue what a cache holds.

A used cache handed an unrelated prompt looks, to transformers, like a new turn of the same
conversation. Every layer sees the same positions, so one layer of a cache checks them
(:attr:`scope_kv.layer.ScopeLayer.checks_positions`) through its guard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["PositionGuard"]


class PositionGuard:
    """The last prefill position of every row, and whether the next forward may open a new call.

    Attributes
    ----------
    last : Tensor or None
        ``(batch,)`` position of each row's last prefill token (``-1``: the row has only seen padding).
    new_call : bool
        The next forward may be the first of a new ``generate`` call (:meth:`expect_new_call`).
    """

    def __init__(self) -> None:
        self.last: torch.Tensor | None = None
        self.new_call = False

    def reset(self) -> None:
        self.last, self.new_call = None, False

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.last is not None:
            self.last = fn(self.last)

    def expect_new_call(self) -> None:
        """Check the next forward's positions even if it feeds one token.

        ``generate`` reads the cache's length once per call, before its first forward; the cache
        calls this then. A used cache given the same prompt again, as long as the previous call's
        new tokens, is fed one token, which would otherwise pass for the next decoding step.
        """
        self.new_call = True

    def observe(
        self, position_ids: torch.Tensor | None, batch: int, decode: bool, held: int, seen: Any, steps: Any
    ) -> None:
        """A forward's positions, before its attention.

        Parameters
        ----------
        position_ids : Tensor or None
            ``(batch or 1, q)`` (other layouts, e.g. multimodal 3-D positions, are not checked).
        batch : int
            Rows of the forward.
        decode : bool
            One token after a prefill: checked only when it may open a new call (one sync per call,
            never one per step).
        held : int
            Slots the layer holds (nothing to continue when 0).
        seen, steps : int or Tensor
            Tokens the layer has seen, and decode steps since its last prefill.
        """
        new_call, self.new_call = self.new_call, False
        if position_ids is None or position_ids.dim() != 2 or (decode and not new_call):
            return
        position_ids = position_ids.expand(batch, -1)
        last = self.last
        if held > 0 and last is not None:
            behind = position_ids[:, 0].to(last.device) <= last + steps
            if bool(behind.any()):
                raise ValueError(
                    f"this ScopeCache already holds {int(seen)} tokens of another generation, and "
                    f"this call's inputs do not continue it (position {int(position_ids[:, 0].min())} comes again). "
                    "Build a new ScopeCache for every generate call and every pipeline prompt; to continue a "
                    "conversation, pass the previous output followed by the new turn."
                )
        if decode:
            return
        # A chunk that is all left padding (chunked prefill of a padded batch) carries one repeated
        # filler position and no real token: that row has not started, its first real token
        # (position 0) comes in a later chunk. A real run of two or more tokens always rises.
        pad_only = (position_ids == position_ids[:, :1]).all(dim=1) & (position_ids.shape[1] > 1)
        if last is not None:
            pad_only &= last.to(position_ids.device) < 0  # padding only ever precedes a row's tokens
        self.last = torch.where(pad_only, -1, position_ids[:, -1])
