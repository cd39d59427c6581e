"""StreamingLLM as a prefill compressor (Xiao et al., ICLR 2024, "Efficient Streaming
Language Models with Attention Sinks"): keep the first ``sinks`` tokens (attention sinks)
and the most recent ``budget - sinks`` prompt tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .._checks import check_int
from .base import PrefillCompressor, PrefillMemo

__all__ = ["StreamingLLM"]


@dataclass(frozen=True)
class StreamingLLM(PrefillCompressor):
    """Attention sinks plus a recent window; needs no attention scores.

    Parameters
    ----------
    budget : int
        Prompt entries kept per layer and KV head.
    sinks : int
        First real tokens of each row always kept (``0 <= sinks < budget``).
    """

    spec_kind: ClassVar[str] = "streamingllm"
    spec_fields: ClassVar[tuple[str, ...]] = ("sinks",)

    sinks: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("StreamingLLM.sinks", self.sinks, 0)
        if self.sinks >= self.budget:
            raise ValueError(
                f"StreamingLLM: sinks ({self.sinks}) must be smaller than budget ({self.budget}); "
                "the rest of the budget is the recent window. Lower sinks or raise budget."
            )

    def scores(self, memo: PrefillMemo, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        batch, heads, length, _ = keys.shape
        slots = torch.arange(length, device=keys.device, dtype=torch.float32)
        # Newer slots score higher (the recent window); the first `sinks` real slots score +inf.
        scores = slots.expand(batch, length).clone()
        sink = (slots[None, :] < (start[:, None] + self.sinks)) & (slots[None, :] >= start[:, None])
        scores = scores.masked_fill(sink, float("inf"))
        return scores[:, None, :].expand(batch, heads, length)
