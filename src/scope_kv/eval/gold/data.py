"""The gold harness's settings, examples made ready for teacher forcing, and their batches."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..._checks import check_int
from ..longgenbench import Example, PromptSettings, gold_output

logger = logging.getLogger(__name__)

RESULTS = "gold"
REFERENCE = "reference"
_PROMPT_BUDGETS = ("row", "longest")


@dataclass(frozen=True, kw_only=True)
class GoldSettings(PromptSettings):
    """Settings of one gold-output run (they must match to resume into a directory).

    Attributes
    ----------
    max_gold_tokens : int or None
        Cut every reference output after this many tokens (``None``: the whole output).
    plan_tokens : int or None
        The generation length adaptive and discontinuous plan their schedule for; ``None``: the
        longest reference output of the set (one number for every example, so a batched run and
        a run of one example at a time use the same schedule).
    batch_size : int or None
        Examples per batch; ``None`` runs the whole set as one batch.
    reference_rows : int
        Rows per forward of the full cache's reference pass.
    chunk_tokens : int
        Tokens per forward when a prompt (and the reference pass) is fed in chunks; bounds the
        attention and activation memory of long prompts in large batches (the cache holds the
        same entries; the numbers change by float noise only).
    bin_tokens : int
        Width, in output tokens, of the position bins the per-position curves are summed in.
    prompt_budget : str
        How a ``prompt+N`` budget is set in a batch of prompts of different lengths: ``"row"``
        (each row its own prompt's length: exact, but the cache then holds rows of one prompt
        length only, so such methods run in as many sub-batches as there are lengths) or
        ``"longest"`` (one cache for the batch, every row's budget set from the batch's longest
        prompt: shorter rows get up to the length difference more entries, i.e. the baseline is
        favoured; fast).
    keep_per_token : bool
        Also store the per-token lists (``nll``, ``kl``, ``top1``...) in each record.
    max_questions, max_prompt_tokens, chat_template
        How prompts are cut and formatted (:class:`~scope_kv.eval.longgenbench.PromptSettings`).
    """

    max_gold_tokens: int | None = None
    plan_tokens: int | None = None
    batch_size: int | None = None
    reference_rows: int = 8
    chunk_tokens: int = 1024
    bin_tokens: int = 128
    prompt_budget: str = "row"
    keep_per_token: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_gold_tokens", "plan_tokens", "batch_size"):
            check_int(name, getattr(self, name), 1, optional=True)
        for name in ("reference_rows", "chunk_tokens", "bin_tokens"):
            check_int(name, getattr(self, name), 1)
        if self.prompt_budget not in _PROMPT_BUDGETS:
            raise ValueError(f"prompt_budget must be one of {_PROMPT_BUDGETS}, got {self.prompt_budget!r}.")


# -- data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GoldItem:
    """One example, tokenised for teacher forcing.

    Attributes
    ----------
    example : Example
        The (prepared) example.
    index : int
        Its position in the run's example list (result ordering).
    prompt_ids : Tensor
        ``(P,)`` the prompt's tokens, chat template included.
    gold_ids : Tensor
        ``(G,)`` the reference output's tokens.
    answer_of : Tensor
        ``(G,)`` int64: for a token of question ``j``'s final answer ``N``, ``j``; else ``-1``.
    """

    example: Example
    index: int
    prompt_ids: torch.Tensor
    gold_ids: torch.Tensor
    answer_of: torch.Tensor


def _answer_map(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token's character span, the index of the answer span it overlaps, or -1."""
    out = []
    j = 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        hit = j < len(spans) and start < spans[j][1] and end > spans[j][0] and end > start
        out.append(j if hit else -1)
    return out


def prepare_gold(
    examples: Sequence[Example], tokenizer: Any, settings: GoldSettings = GoldSettings()
) -> list[GoldItem]:
    """Cut, format and tokenise examples and their reference outputs.

    The reference text is tokenised on its own (as the model would write it after the prompt's
    generation prompt), with character offsets, which locate the answer tokens.

    Raises
    ------
    ValueError
        If an example's task has no worked solutions, or the tokenizer gives no offsets.
    """
    items = []
    for index, example in enumerate(examples):
        ex = settings.prepare(example, tokenizer)
        prompt = settings.encode(ex, tokenizer)["input_ids"][0]
        gold = gold_output(ex)
        try:
            enc = tokenizer(gold.text, add_special_tokens=False, return_offsets_mapping=True)
        except (TypeError, NotImplementedError) as exc:
            raise ValueError(
                "the gold harness locates answer tokens by character offsets: use a fast tokenizer "
                f"(return_offsets_mapping=True failed: {exc})."
            ) from exc
        ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
        answer_of = _answer_map(offsets, gold.answer_spans)
        if settings.max_gold_tokens is not None:
            ids, answer_of = ids[: settings.max_gold_tokens], answer_of[: settings.max_gold_tokens]
        if len(ids) < 2:
            raise ValueError(f"{ex.id}: the reference output has {len(ids)} token(s); nothing to teacher-force.")
        items.append(
            GoldItem(ex, index, prompt, torch.tensor(ids, dtype=torch.long), torch.tensor(answer_of, dtype=torch.long))
        )
    return items


def plan_tokens(items: Sequence[GoldItem], settings: GoldSettings = GoldSettings()) -> int:
    """The generation length the schedules of adaptive / discontinuous are planned for: the
    setting when given, else the longest reference output of the set."""
    return settings.plan_tokens or max(int(it.gold_ids.numel()) for it in items)


@dataclass(frozen=True)
class GoldBatch:
    """Rows ready for one teacher-forced pass: prompts left-padded, references right-padded.

    Attributes
    ----------
    prompt_ids, prompt_mask : Tensor
        ``(n, P)`` prompt tokens (pad id on the left) and 1 for real tokens, 0 for pads.
    gold_ids : Tensor
        ``(n, G)`` reference tokens, the pad id after a row's end.
    gold_valid : Tensor
        ``(n, G)`` bool, True for a row's reference tokens.
    prompt_tokens, gold_tokens : tuple[int, ...]
        Each row's real prompt and reference lengths.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    gold_ids: torch.Tensor
    gold_valid: torch.Tensor
    prompt_tokens: tuple[int, ...]
    gold_tokens: tuple[int, ...]

    @classmethod
    def of(cls, items: Sequence[GoldItem], pad_id: int, device: str | torch.device | None = None) -> GoldBatch:
        """Pad ``items`` into one batch (on ``device``)."""
        n = len(items)
        p = max(int(it.prompt_ids.numel()) for it in items)
        g = max(int(it.gold_ids.numel()) for it in items)
        prompt = torch.full((n, p), pad_id, dtype=torch.long)
        mask = torch.zeros((n, p), dtype=torch.long)
        gold = torch.full((n, g), pad_id, dtype=torch.long)
        valid = torch.zeros((n, g), dtype=torch.bool)
        for row, it in enumerate(items):
            lp, lg = int(it.prompt_ids.numel()), int(it.gold_ids.numel())
            prompt[row, p - lp :] = it.prompt_ids
            mask[row, p - lp :] = 1
            gold[row, :lg] = it.gold_ids
            valid[row, :lg] = True
        return cls(
            prompt.to(device),
            mask.to(device),
            gold.to(device),
            valid.to(device),
            tuple(int(it.prompt_ids.numel()) for it in items),
            tuple(int(it.gold_ids.numel()) for it in items),
        )

    @property
    def rows(self) -> int:
        return self.prompt_ids.shape[0]

    def select(self, rows: Sequence[int]) -> GoldBatch:
        """The sub-batch of ``rows``, re-padded to its own longest prompt and reference."""
        index = torch.tensor(list(rows), dtype=torch.long, device=self.prompt_ids.device)
        p = max(self.prompt_tokens[r] for r in rows)
        g = max(self.gold_tokens[r] for r in rows)
        return GoldBatch(
            self.prompt_ids.index_select(0, index)[:, self.prompt_ids.shape[1] - p :],
            self.prompt_mask.index_select(0, index)[:, self.prompt_mask.shape[1] - p :],
            self.gold_ids.index_select(0, index)[:, :g],
            self.gold_valid.index_select(0, index)[:, :g],
            tuple(self.prompt_tokens[r] for r in rows),
            tuple(self.gold_tokens[r] for r in rows),
        )

    def positions(self) -> torch.Tensor:
        """``(n, P)`` prompt positions as ``generate`` builds them from the mask (pads at 0)."""
        return (self.prompt_mask.cumsum(-1) - 1).masked_fill(self.prompt_mask == 0, 0)
