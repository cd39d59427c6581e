"""R-KV on SCOPE's split, and as a unified baseline (Cai et al., 2025; docs/methods.md).

R-KV keeps the entries that are important and not redundant. Importance is the attention the
newest ``recent`` queries (the observation window) pay to each candidate; redundancy is how
similar a candidate's key is to the other held keys. Selection runs once the pool has grown a
``buffer`` past its budget, and cuts it back to the budget.

:class:`RKV` holds SCOPE's decoding pool to its budget this way and keeps the prompt whole;
:class:`UnifiedRKV` is R-KV as its authors run it, one budget over prompt and output together.
The rule itself is :func:`rkv_scores`; docs/methods.md says where it follows the paper (§3.1-§3.4)
and where it departs from the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ._checks import check_int
from .decoding import DecodingStrategy
from .window import score_in_arrival_order, window_attention

if TYPE_CHECKING:
    from .step import AttentionStep

__all__ = ["RKV", "UnifiedRKV", "rkv_scores"]

_ROWS = 256  # rows of the similarity matrix computed at once (bounds the transient memory)


def rkv_scores(
    keys: torch.Tensor,
    valid: torch.Tensor,
    candidates: torch.Tensor,
    window: torch.Tensor,
    window_valid: torch.Tensor,
    scaling: float,
    mix: float,
    kernel: int,
    threshold: float,
) -> torch.Tensor:
    """R-KV's score of a region's entries (higher is kept), in float32.

    Parameters
    ----------
    keys : Tensor
        ``(batch, kv_heads, n, dim)`` the region's keys in arrival order (oldest first).
    valid : Tensor
        ``(batch, kv_heads, n)`` bool: real entries (the rest is ignored).
    candidates : Tensor
        ``(batch, kv_heads, n)`` bool: the entries that may be evicted (valid, older than the window).
    window : Tensor
        ``(batch, q_heads, w, dim)`` the observation window's queries.
    window_valid : Tensor
        ``(batch, w)`` bool: which window queries are real tokens.
    scaling : float
        The model's softmax scale.
    mix : float
        ``lambda``: the score is ``mix * importance - (1 - mix) * redundancy``.
    kernel : int
        Width of the max-pooling of importance over neighbouring candidates (odd).
    threshold : float
        Cosine similarity above which a key counts as a look-alike of another.

    Returns
    -------
    Tensor
        ``(batch, kv_heads, n)``; only the candidates' values mean anything.
    """
    batch, kv_heads, n, _ = keys.shape
    k = keys.float()
    # importance: each window query's attention over the candidates (logits maxed over the KV
    # head's query group before the softmax), averaged over the window, max-pooled along arrival
    probs = window_attention(keys, candidates, window, scaling, "max")  # (batch, kv_heads, w, n)
    rows = window_valid[:, None, :, None].to(probs.dtype)
    importance = (probs * rows).sum(2) / rows.sum(2).clamp(min=1.0)
    importance = importance.masked_fill(~candidates, float("-inf"))
    importance = torch.nn.functional.max_pool1d(
        importance.reshape(batch * kv_heads, 1, n), kernel, stride=1, padding=kernel // 2
    ).reshape(batch, kv_heads, n)
    importance = importance.masked_fill(~candidates, 0.0)  # (finite everywhere: only candidates count)
    # redundancy: mean cosine similarity to the other held keys, where each key's newest look-alike
    # does not count it (so the newest of near-duplicates stays), softmax over the held entries
    unit = k / (k.norm(dim=-1, keepdim=True) + 1e-8) * valid[..., None]  # invalid entries: zero vectors
    # each column's similarity summed over the other rows: (the sum of every unit key) . key - key . key
    total = unit.sum(-2, keepdim=True)  # (batch, kv_heads, 1, dim)
    column = (unit * total).sum(-1) - unit.square().sum(-1)
    index = torch.arange(n, device=keys.device)
    for lo in range(0, n, _ROWS):  # less each row's newest look-alike, a block of rows at a time
        rows = index[lo : lo + _ROWS]
        sim = torch.matmul(unit[..., lo : lo + _ROWS, :], unit.transpose(-1, -2))  # (batch, kv_heads, rows, n)
        alike = (sim > threshold) & valid[..., None, :] & valid[..., lo : lo + _ROWS, None]
        alike &= index != rows[:, None]
        newest = torch.where(alike, index, -1).amax(-1)  # (batch, kv_heads, rows); -1: none
        found = newest >= 0
        own = sim.gather(-1, newest.clamp(min=0)[..., None]).squeeze(-1) * found
        column.scatter_add_(-1, newest.clamp(min=0), -own)
    mean = column / valid.sum(-1, keepdim=True).clamp(min=1)
    redundancy = torch.softmax(mean.masked_fill(~valid, float("-inf")), dim=-1)
    return mix * importance - (1.0 - mix) * redundancy


@dataclass(frozen=True)
class RKV(DecodingStrategy):
    """R-KV's selection on SCOPE's decoding pool; the prompt is kept whole.

    Once the pool holds ``budget + buffer`` entries, keep the newest ``recent`` (the observation
    window, whose queries score the rest) and the ``budget - recent`` best of the others by
    :func:`rkv_scores`.

    Parameters
    ----------
    budget : int
        Decoding-pool entries kept per layer and KV head after a selection (R-KV's ``B_budget``).
    recent : int
        The observation window ``alpha``: the newest entries, always kept, whose queries score the others.
    buffer : int
        How far the pool grows past the budget before the next selection (``B_buffer``).
    mix : float
        ``lambda`` in ``lambda * importance - (1 - lambda) * redundancy``.
    kernel : int
        Odd width of the max-pooling of importance over neighbouring entries.
    threshold : float
        Cosine similarity above which two keys are look-alikes.
    """

    spec_kind: ClassVar[str] = "rkv"
    spec_fields: ClassVar[tuple[str, ...]] = ("buffer", "mix", "kernel", "threshold")

    recent: int = 8
    buffer: int = 128
    mix: float = 0.1
    kernel: int = 7
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        cls = type(self).__name__
        check_int(f"{cls}.buffer", self.buffer, 1)
        check_int(f"{cls}.kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{cls}.kernel must be odd (a window centred on each entry), got {self.kernel}.")
        for name, value, low in (("mix", self.mix, 0.0), ("threshold", self.threshold, -1.0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= 1.0:
                raise ValueError(f"{cls}.{name} must be a number in [{low:g}, 1], got {value!r}.")

    @property
    def slack(self) -> int:
        return self.buffer - 1  # the pool grows to budget + buffer - 1 between selections

    @property
    def query_window(self) -> int:
        return self.recent

    @property
    def memory_budget(self) -> int:
        return self.budget + self.buffer  # what it holds just before a selection

    def plan(self, n_decoding: int, t: int, skipped: int) -> tuple[bool, int]:
        return n_decoding >= self.budget + self.buffer, skipped

    def plan_tensor(
        self, n_decoding: torch.Tensor, t: torch.Tensor, skipped: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return n_decoding >= self.budget + self.buffer, skipped

    def score(self, step: AttentionStep, first: int, last: int) -> torch.Tensor:
        def rule(keys: torch.Tensor, valid: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
            assert step.window is not None and step.window_valid is not None  # kept by the layer (query_window)
            return rkv_scores(
                keys,
                valid,
                candidates,
                step.window,
                step.window_valid,
                step.scaling,
                self.mix,
                self.kernel,
                self.threshold,
            )

        return score_in_arrival_order(step, first, last, self.recent, rule)


@dataclass(frozen=True)
class UnifiedRKV(RKV):
    """R-KV as its authors run it: one budget over prompt and output entries together.

    Once a layer holds ``budget + buffer`` entries, keep the newest ``recent`` and the best
    ``budget - recent`` of all the others, prompt included (parameters as :class:`RKV`)."""

    spec_kind: ClassVar[str] = "unified-rkv"

    evicts_prompt: ClassVar[bool] = True
