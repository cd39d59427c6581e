"""Budgets set from each batch row's prompt: ``prompt``, ``prompt+N``, ``prompt/D``, ``prompt/D+N``.

:class:`PromptShare` is such a budget; the ``Shared*`` prefill compressors keep that share of each
row's prompt (``snapkv:prompt/4``). The spec grammar (:mod:`scope_kv.spec`) builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .prefill import H2O, PrefillCompressor, SnapKV, StreamingLLM

__all__ = [
    "SHARED_PREFILL",
    "PromptShare",
    "SharedBudget",
    "SharedH2O",
    "SharedSnapKV",
    "SharedStreamingLLM",
    "share_text",
]


@dataclass(frozen=True)
class PromptShare:
    """A budget set per batch row from its prompt length: ``prompt // divisor + extra``.

    Attributes
    ----------
    divisor : int
        The prompt's length is divided by this (``1``: the whole prompt).
    extra : int
        Tokens added on top.
    """

    divisor: int = 1
    extra: int = 0

    def __post_init__(self) -> None:
        if self.divisor < 1 or self.extra < 0:
            raise ValueError(f"a prompt share needs divisor >= 1 and extra >= 0, got {self.divisor} and {self.extra}.")

    def of(self, prompt_tokens: int) -> int:
        """The budget for a prompt of ``prompt_tokens`` real tokens."""
        return prompt_tokens // self.divisor + self.extra

    def describe(self) -> str:
        """The spec text: ``prompt``, ``prompt+N``, ``prompt/D`` or ``prompt/D+N``."""
        return share_text(self)


class SharedBudget:
    """Mixin for a prefill compressor whose budget is a share of each row's prompt.

    ``keep_counts`` (the per-row hook of :class:`scope_kv.PrefillCompressor`) keeps
    ``max(budget, share.of(real))`` entries of a row with ``real`` prompt tokens (never more than
    ``real``); ``budget`` is only the floor that keeps the compressor's own window valid.
    """

    share: PromptShare
    budget: int

    def keep_counts(
        self, real: torch.Tensor, layer_idx: int, num_layers: int, module: torch.nn.Module | None = None
    ) -> torch.Tensor:
        wanted = (real // self.share.divisor + self.share.extra).clamp(min=self.budget)
        return torch.minimum(wanted, real)

    def spec_budget(self) -> str:
        return share_text(self.share)


@dataclass(frozen=True)
class SharedSnapKV(SharedBudget, SnapKV):
    """:class:`scope_kv.SnapKV` keeping ``share.of(prompt)`` entries of each row (e.g. a quarter)."""

    spec_kind: ClassVar[str] = "snapkv"

    share: PromptShare = field(default_factory=PromptShare)


@dataclass(frozen=True)
class SharedH2O(SharedBudget, H2O):
    """:class:`scope_kv.H2O` keeping ``share.of(prompt)`` entries of each row."""

    spec_kind: ClassVar[str] = "h2o"

    share: PromptShare = field(default_factory=PromptShare)


@dataclass(frozen=True)
class SharedStreamingLLM(SharedBudget, StreamingLLM):
    """:class:`scope_kv.StreamingLLM` keeping ``share.of(prompt)`` entries of each row."""

    spec_kind: ClassVar[str] = "streamingllm"

    share: PromptShare = field(default_factory=PromptShare)


SHARED_PREFILL: dict[str, type[PrefillCompressor]] = {
    "snapkv": SharedSnapKV,
    "h2o": SharedH2O,
    "streamingllm": SharedStreamingLLM,
}


def share_text(share: PromptShare) -> str:
    text = "prompt" if share.divisor == 1 else f"prompt/{share.divisor}"
    return text + (f"+{share.extra}" if share.extra else "")
