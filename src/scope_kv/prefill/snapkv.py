"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation")
and PyramidKV (Cai et al., 2024, "PyramidKV: Dynamic KV Cache Compression based on Pyramidal
Information Funneling").

SnapKV scores each prompt entry by the attention it receives from the last ``window``
prompt queries (the observation window), summed over those queries and smoothed with a 1-D
pooling of width ``kernel`` over positions; it keeps the top ``budget - window`` entries
before the window, plus the window itself. PyramidKV uses the same scores with per-layer
budgets that shrink linearly with depth (more entries in lower layers), averaging ``budget``.

While the prompt runs, a layer only remembers the newest ``window`` queries (so chunked
prefill costs ``window x dim`` per head, not the prompt); scoring happens once, at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .._checks import check_int
from ..selection import causal_probs
from .base import PrefillCompressor, PrefillMemo

__all__ = ["SnapKV", "PyramidKV"]

_POOLINGS = ("max", "avg")


@dataclass
class SnapKVMemo(PrefillMemo):
    """SnapKV's memo: the last ``window`` prompt queries and the model's softmax settings."""

    queries: torch.Tensor | None = None  # (batch, q_heads, <= window, dim), post-RoPE
    scaling: float = 1.0
    softcap: float | None = None


@dataclass(frozen=True)
class SnapKV(PrefillCompressor):
    """SnapKV prefill compression (defaults: the SCOPE paper's setting, window 8, kernel 7, max pooling).

    Parameters
    ----------
    budget : int
        Prompt entries kept per layer and KV head, the observation window included.
    window : int
        Observation window: the last ``window`` prompt queries score the entries before them,
        and are always kept (``1 <= window < budget``).
    kernel : int
        Width of the pooling over positions (odd, so each entry is pooled around itself).
    pooling : str
        ``"max"`` or ``"avg"``.

    Notes
    -----
    GQA: the window attention is computed per query head, summed over the window's queries and
    pooled per query head (the published per-head score); a KV head's score is the sum of its
    query group's pooled scores (see :mod:`scope_kv.prefill.base`).
    """

    spec_kind: ClassVar[str] = "snapkv"
    spec_fields: ClassVar[tuple[str, ...]] = ("window", "kernel", "pooling")

    window: int = 8
    kernel: int = 7
    pooling: str = "max"

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        check_int(f"{cls}.window", self.window, 1)
        check_int(f"{cls}.kernel", self.kernel, 1)
        if self.window >= self.budget:
            example = (
                f"e.g. {cls}(budget={self.budget}, window={max(1, self.budget // 4)})"
                if self.budget >= 2
                else f"so the budget must be at least 2, e.g. {cls}(budget=2, window=1)"
            )
            raise ValueError(
                f"{cls}: window ({self.window}) must be smaller than budget ({self.budget}); the budget "
                f"holds the window (at least 1) plus the selected entries, {example}."
            )
        if self.kernel % 2 == 0:
            raise ValueError(
                f"{cls}: kernel ({self.kernel}) must be odd so every entry is pooled around itself; use {self.kernel + 1}."
            )
        if self.pooling not in _POOLINGS:
            raise ValueError(f"{cls}: pooling must be one of {_POOLINGS}, got {self.pooling!r}.")

    memo_type = SnapKVMemo

    def observe(
        self,
        memo: SnapKVMemo,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        start: torch.Tensor,
        scaling: float,
        softcap: float | None,
    ) -> None:
        previous = memo.queries
        queries = query if previous is None else torch.cat([previous, query], dim=2)
        memo.queries = queries[:, :, -self.window :].detach().clone()
        memo.scaling, memo.softcap = scaling, softcap

    def scores(self, memo: SnapKVMemo, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        batch, kv_heads, length, _ = keys.shape
        queries = memo.queries  # (batch, q_heads, w, dim), at the last w slots
        assert queries is not None  # observed: compression follows a prefill forward
        w = queries.shape[2]
        probs = causal_probs(queries, keys, length - w, start, memo.scaling, memo.softcap)
        window_sum = probs[..., : length - w].sum(dim=2)  # (batch, q_heads, length - w)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(window_sum, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        q_heads = pooled.shape[1]
        grouped = pooled.reshape(batch, kv_heads, q_heads // kv_heads, length - w).sum(dim=2)
        window = grouped.new_full((batch, kv_heads, w), float("inf"))  # the window is always kept
        return torch.cat([grouped, window], dim=-1)


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    """PyramidKV: SnapKV scores, per-layer budgets shrinking linearly with depth.

    Parameters
    ----------
    budget : int
        Mean prompt entries kept per layer and KV head, windows included.
    beta : int
        Shape of the pyramid: the top layer keeps ``(budget - window) / beta`` selected entries,
        the bottom layer ``2 (budget - window)`` minus that (``beta >= 1``; larger is steeper).
    window, kernel, pooling
        As for :class:`SnapKV`.

    Notes
    -----
    The allocation follows the published rule, integer arithmetic included, so the kept sets
    are the published ones: a prompt shorter than ``budget`` is kept whole; one shorter than
    ``2 (budget - window)`` gets plain SnapKV; otherwise layer ``l`` keeps
    ``max_n - l * ((max_n - min_n) // (L - 1))`` selected entries plus the window, where
    ``min_n = (budget - window) // beta`` and ``max_n = 2 (budget - window) - min_n``
    (``max_n`` capped at ``prompt - window``, ``min_n`` raised to keep the sum). The floor in the
    step makes the mean over layers exceed ``budget`` by less than ``(L - 1) / 2`` entries.
    With a padded batch the rule is applied to each row's real length.
    """

    spec_kind: ClassVar[str] = "pyramidkv"
    spec_fields: ClassVar[tuple[str, ...]] = ("window", "kernel", "pooling", "beta")

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("PyramidKV.beta", self.beta, 1)

    def layer_budget(self, prompt: int, layer_idx: int, num_layers: int) -> int:
        """Entries layer ``layer_idx`` keeps from a prompt of ``prompt`` real tokens."""
        selected = self.budget - self.window
        if prompt < self.budget:
            return prompt
        if prompt < 2 * selected:
            return self.budget
        min_n = selected // self.beta
        max_n = 2 * selected - min_n
        if max_n >= prompt - self.window:
            max_n = prompt - self.window
            min_n = 2 * selected - max_n
        step = (max_n - min_n) // (num_layers - 1) if num_layers > 1 else 0
        return max_n - layer_idx * step + self.window

    def keep_counts(
        self, real: torch.Tensor, layer_idx: int, num_layers: int, module: torch.nn.Module | None = None
    ) -> torch.Tensor:
        counts = [self.layer_budget(int(n), layer_idx, num_layers) for n in real.tolist()]
        return torch.tensor(counts, dtype=torch.long, device=real.device)
