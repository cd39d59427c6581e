"""Gold-output teacher forcing: how likely each cache keeps the reference answer, token by token.

After a LongGenBench prompt, the output the prompt asks for (:func:`~scope_kv.eval.longgenbench.gold_output`:
every ``Answer_<n>:``, worked solution and ``The answer is N``, in order) is fed one token per
forward through each method's cache, exactly as decoding would feed its own tokens (positions
and attention mask as ``generate`` builds them), and at every gold token we record

* the NLL of the gold token under the method,
* ``KL(full || method)`` of the next-token distributions,
* whether the method's most likely token is the full cache's (top-1 agreement) and the gold one.

The full cache is the reference: one teacher-forced pass of prompt + gold (transformers'
``DynamicCache``, in chunks of positions) gives its NLL and distribution at every gold token at
once (:func:`full_reference`), so it is never stepped. The
**answer tokens** (those of each ``N`` after ``The answer is``) are reported apart: they are the
closest proxy of accuracy a teacher-forced run has. Unlike greedy generation, this measures
long outputs on a model that cannot solve the task itself, and every method sees the same
tokens.

All examples of a set run as one batch (prompts left-padded, references right-padded); a method
whose budget depends on the prompt's length (``prompt+N``) runs rows of one prompt length per
cache, or one batch with the longest prompt's budget (:attr:`GoldSettings.prompt_budget`). Per-token statistics stay on the device until the
pass ends. Methods are sharded over processes (:class:`~scope_kv.eval.common.Shard`), so
several processes can share one GPU.

Results: ``<out>/gold.jsonl`` (one line per example and method: means overall, per output
quarter and on answer tokens, sums binned by output position), ``<out>/gold_summary.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .._checks import check_int
from ..accounting import bytes_per_entry, kv_footprint
from ..compat import cache_kwargs
from .common import Progress, ResultStore, Shard, input_device, write_csv
from .longgenbench import Example, PromptSettings, gold_output
from .methods import Method

logger = logging.getLogger(__name__)

__all__ = [
    "GoldBatch",
    "GoldItem",
    "GoldReference",
    "GoldSettings",
    "TokenStats",
    "full_reference",
    "method_family",
    "plan_tokens",
    "prepare_gold",
    "run_gold",
    "summarize_gold",
    "teacher_force",
]

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


# -- the reference: the full cache, one forward ----------------------------------------------
def _head(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits from final hidden states ``(..., hidden)`` (the output embedding,
    then the config's final logit soft-capping when it has one)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class GoldReference:
    """The full cache's view of every reference token, from one teacher-forced forward.

    Attributes
    ----------
    hidden : Tensor
        ``(n, G, hidden)`` final hidden states whose output embedding predicts reference token
        ``t`` (kept in the model's dtype; next-token distributions are rebuilt from them).
    nll : Tensor
        ``(n, G)`` float32 NLL of each reference token.
    top1 : Tensor
        ``(n, G)`` int64 the full cache's most likely token at each position.
    """

    hidden: torch.Tensor
    nll: torch.Tensor
    top1: torch.Tensor

    def select(self, rows: Sequence[int], gold_len: int) -> GoldReference:
        index = torch.tensor(list(rows), dtype=torch.long, device=self.hidden.device)
        return GoldReference(
            self.hidden.index_select(0, index)[:, :gold_len],
            self.nll.index_select(0, index.to(self.nll.device))[:, :gold_len],
            self.top1.index_select(0, index.to(self.top1.device))[:, :gold_len],
        )


@torch.no_grad()
def full_reference(
    model: Any, batch: GoldBatch, rows_per_chunk: int = 8, chunk_tokens: int = 1024, positions_per_chunk: int = 512
) -> GoldReference:
    """The full cache's NLL and distributions at every reference token, in one teacher-forced pass.

    Prompt + reference (but its last token) go through the model with transformers' own
    ``DynamicCache`` -- the full cache -- ``chunk_tokens`` positions per forward, ``rows_per_chunk``
    rows at a time; no decoding step is taken.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM whose logits are its output embedding of the decoder's final hidden state.
    batch : GoldBatch
        ``(n, P)`` prompts and ``(n, G)`` references (on the model's input device).
    rows_per_chunk : int
        Rows per pass (their full cache is the memory peak).
    chunk_tokens : int
        Positions per forward (bounds attention and activation memory).
    positions_per_chunk : int
        Positions per chunk of the output-embedding / log-softmax pass.

    Returns
    -------
    GoldReference
        On the batch's device.

    Raises
    ------
    RuntimeError
        If the model's own logits differ from the output embedding of the decoder's hidden
        states (a model that post-processes its logits in a way this harness does not rebuild).
    """
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    n, p = batch.prompt_ids.shape
    g = batch.gold_ids.shape[1]
    hidden_parts, nll_parts, top_parts = [], [], []
    handle = model.get_decoder().register_forward_hook(keep)
    try:
        for lo in range(0, n, rows_per_chunk):
            hi = min(n, lo + rows_per_chunk)
            ids = torch.cat([batch.prompt_ids[lo:hi], batch.gold_ids[lo:hi, :-1]], dim=1)
            mask = torch.cat([batch.prompt_mask[lo:hi], torch.ones_like(batch.gold_ids[lo:hi, :-1])], dim=1)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            cache = DynamicCache(config=model.config)
            pieces = []
            for a in range(0, ids.shape[1], chunk_tokens):
                b = min(ids.shape[1], a + chunk_tokens)
                captured.clear()
                out = model(
                    input_ids=ids[:, a:b],
                    attention_mask=mask[:, :b],
                    position_ids=positions[:, a:b],
                    **cache_kwargs(cache),
                    use_cache=True,
                    logits_to_keep=1,
                )
                if b > p - 1:  # positions p-1 .. p-2+g predict reference tokens 0 .. g-1
                    pieces.append(captured[-1][:, max(0, p - 1 - a) :])
            del cache
            hidden = torch.cat(pieces, dim=1)
            if lo == 0:
                _check_head(model, out.logits[:, -1], hidden[:, -1])
            nll = torch.empty((hi - lo, g), dtype=torch.float32, device=hidden.device)
            top = torch.empty((hi - lo, g), dtype=torch.long, device=hidden.device)
            for a in range(0, g, positions_per_chunk):
                b = min(g, a + positions_per_chunk)
                logp = torch.log_softmax(_head(model, hidden[:, a:b]), dim=-1)
                nll[:, a:b] = -logp.gather(-1, batch.gold_ids[lo:hi, a:b, None])[..., 0]
                top[:, a:b] = logp.argmax(-1)
            hidden_parts.append(hidden)
            nll_parts.append(nll)
            top_parts.append(top)
    finally:
        handle.remove()
    return GoldReference(torch.cat(hidden_parts), torch.cat(nll_parts), torch.cat(top_parts))


def _check_head(model: Any, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """The model's own last-position logits against the output embedding of the same hidden state."""
    want = logits.float()
    got = _head(model, hidden)
    tol = 1e-4 if hidden.dtype == torch.float32 else 1e-2
    gap = float((want - got).abs().max()) / max(1.0, float(want.abs().max()))
    if gap > tol:
        raise RuntimeError(
            f"{type(model).__name__}'s logits are not its output embedding of the decoder's last hidden state "
            f"(relative gap {gap:.2e}); the gold harness cannot rebuild the full cache's distributions for it."
        )


# -- one method -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one teacher-forced pass (CPU tensors, ``(n, G)``).

    Attributes
    ----------
    nll : Tensor
        float32 NLL of each reference token under the cache.
    argmax_gold : Tensor
        bool, the cache's most likely token is the reference token.
    kl, top1 : Tensor or None
        ``KL(full || method)`` (nats) and agreement with the full cache's most likely token,
        when a :class:`GoldReference` was given.
    kv_slots_peak : float
        Most entries held per layer (mean over layers; physical slots, pads included).
    kv_allocated_peak : int
        Most bytes of K/V storage allocated.
    seconds : float
        Wall time of the pass.
    """

    nll: torch.Tensor
    argmax_gold: torch.Tensor
    kl: torch.Tensor | None
    top1: torch.Tensor | None
    kv_slots_peak: float
    kv_allocated_peak: int
    seconds: float


@torch.no_grad()
def teacher_force(
    model: Any,
    cache: Any,
    batch: GoldBatch,
    reference: GoldReference | None = None,
    on_step: Callable[[], Any] | None = None,
    chunk_tokens: int | None = None,
) -> TokenStats:
    """Feed ``batch``'s references through ``cache`` one token per forward, as decoding would.

    The prompt is one forward (its last position predicts reference token 0); then reference
    token ``t - 1`` is fed at position ``prompt + t - 1`` with the growing attention mask
    ``generate`` would build, and the logits predict token ``t``. Statistics accumulate on the
    device and are copied to the CPU once, at the end.

    Parameters
    ----------
    model : PreTrainedModel
        The model the cache was built for.
    cache : Cache
        A fresh cache (e.g. :meth:`scope_kv.eval.methods.Method.make_cache`), filled in place.
    batch : GoldBatch
        ``(n, P)`` prompts and ``(n, G)`` references on the model's input device.
    reference : GoldReference or None
        The full cache's view (:func:`full_reference`) for KL and top-1 agreement.
    on_step : callable or None
        Called after every forward (progress bars).
    chunk_tokens : int or None
        Feed the prompt in forwards of this many positions (chunked prefill; bounds memory);
        ``None``: one forward, as ``generate`` does.
    """
    start = time.perf_counter()
    n, p = batch.prompt_ids.shape
    g = batch.gold_ids.shape[1]
    device = batch.prompt_ids.device
    nll = torch.empty((n, g), dtype=torch.float32, device=device)
    hit = torch.empty((n, g), dtype=torch.bool, device=device)
    kl = torch.zeros((n, g), dtype=torch.float32, device=device)
    top1 = torch.ones((n, g), dtype=torch.bool, device=device)
    mask = torch.cat([batch.prompt_mask, torch.ones_like(batch.gold_ids)], dim=1)
    real = torch.tensor(batch.prompt_tokens, dtype=torch.long, device=device)[:, None]
    slots = allocated = 0

    def record(t: int, logits: torch.Tensor) -> None:
        logq = torch.log_softmax(logits.float(), dim=-1)
        nll[:, t] = -logq.gather(-1, batch.gold_ids[:, t, None])[:, 0]
        best = logq.argmax(-1)
        hit[:, t] = best == batch.gold_ids[:, t]
        if reference is not None:
            logp = torch.log_softmax(_head(model, reference.hidden[:, t]), dim=-1)
            kl[:, t] = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)
            top1[:, t] = best == reference.top1[:, t]

    def measure() -> None:
        nonlocal slots, allocated
        footprint = kv_footprint(cache)
        slots = max(slots, footprint.total_entries)
        allocated = max(allocated, footprint.allocated_bytes)

    positions = batch.positions()
    step = chunk_tokens or p
    for a in range(0, p, step):
        b = min(p, a + step)
        out = model(
            input_ids=batch.prompt_ids[:, a:b],
            attention_mask=batch.prompt_mask[:, :b],
            position_ids=positions[:, a:b],
            **cache_kwargs(cache),
            use_cache=True,
            logits_to_keep=1,
        )
    record(0, out.logits[:, -1])
    measure()
    if on_step is not None:
        on_step()
    for t in range(1, g):
        out = model(
            input_ids=batch.gold_ids[:, t - 1 : t],
            attention_mask=mask[:, : p + t],
            position_ids=real + (t - 1),
            **cache_kwargs(cache),
            use_cache=True,
        )
        record(t, out.logits[:, -1])
        measure()
        if on_step is not None:
            on_step()
    layers = max(1, len(kv_footprint(cache).entries))
    return TokenStats(
        nll.cpu(),
        hit.cpu(),
        kl.cpu() if reference is not None else None,
        top1.cpu() if reference is not None else None,
        slots / layers,
        allocated,
        time.perf_counter() - start,
    )


# -- records ------------------------------------------------------------------------------------
def method_family(spec: str) -> str:
    """A method's name without its decoding budget and recent window (``slide:128/64`` ->
    ``slide:B/r``): one colour per family in the plots, one budget group per ``B``."""
    return re.sub(r"\d+/\d+(?=,|$)", "B/r", spec)


def _budget_of(method: Method | None) -> int | None:
    """The decoding budget ``B`` a method is compared at (its equal-memory group)."""
    if method is None:
        return None
    if method.per_prompt is not None:
        return method.per_prompt.share.extra
    return getattr(method.decoding, "budget", None)


def _bound(method: Method | None, prompt: int, gold: int, resolved_prompt: int, layers: int) -> int:
    """Most entries a method holds per layer and KV head for one row, by its definition (the
    reference feeds ``gold - 1`` tokens after the prompt; per-layer prefill budgets averaged)."""
    if method is None or method.is_full:
        return prompt + gold - 1
    kept_prompt = prompt
    if method.prefill is not None:
        real = torch.tensor([prompt])
        kept = [int(method.prefill.keep_counts(real, layer, layers)[0]) for layer in range(layers)]
        kept_prompt = min(prompt, round(sum(kept) / layers))
    decoding = method.decoding_for(resolved_prompt)
    if decoding is None:
        return kept_prompt + gold - 1
    if decoding.evicts_prompt:
        return min(prompt + gold - 1, decoding.budget)
    return kept_prompt + min(gold - 1, decoding.budget + decoding.slack)


def _mean(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def _record(
    base: dict[str, Any],
    row: int,
    item: GoldItem,
    stats: TokenStats | None,
    reference: GoldReference,
    ref_row: int,
    settings: GoldSettings,
) -> dict[str, Any]:
    """One result line: means overall / per quarter / on answer tokens, and binned sums."""
    g = int(item.gold_ids.numel())
    ref_nll = reference.nll[ref_row, :g].cpu()
    nll = stats.nll[row, :g] if stats is not None else ref_nll
    delta = nll - ref_nll
    kl = stats.kl[row, :g] if stats is not None and stats.kl is not None else torch.zeros(g)
    top1 = stats.top1[row, :g].float() if stats is not None and stats.top1 is not None else torch.ones(g)
    hit = stats.argmax_gold[row, :g] if stats is not None else reference.top1[ref_row, :g].cpu() == item.gold_ids
    answer_of = item.answer_of[:g]
    answer = answer_of >= 0
    quarters = [(q * g // 4, (q + 1) * g // 4) for q in range(4)]
    bins = torch.arange(g) // settings.bin_tokens
    n_bins = int(bins[-1]) + 1

    def binned(values: torch.Tensor, where: torch.Tensor | None = None) -> list[float]:
        weights = values.double() if where is None else values.double() * where
        return [round(v, 6) for v in torch.zeros(n_bins, dtype=torch.float64).index_add_(0, bins, weights).tolist()]

    questions = sorted({int(j) for j in answer_of[answer].tolist()})
    exact = [bool(hit[answer_of == j].all()) for j in questions]
    record = {
        **base,
        "gold_tokens": g,
        "answer_tokens": int(answer.sum()),
        "answers_seen": len(questions),
        "nll": _mean(nll),
        "ref_nll": _mean(ref_nll),
        "delta_nll": _mean(delta),
        "kl": _mean(kl),
        "top1": _mean(top1),
        "argmax_gold": _mean(hit.float()),
        "quarter_delta_nll": [_mean(delta[a:b]) for a, b in quarters],
        "quarter_kl": [_mean(kl[a:b]) for a, b in quarters],
        "quarter_top1": [_mean(top1[a:b]) for a, b in quarters],
        "answer_nll": _mean(nll[answer]),
        "answer_ref_nll": _mean(ref_nll[answer]),
        "answer_delta_nll": _mean(delta[answer]),
        "answer_kl": _mean(kl[answer]),
        "answer_top1": _mean(top1[answer]),
        "answer_argmax_gold": _mean(hit[answer].float()),
        "answers_exact": sum(exact) / len(exact) if exact else None,
        "bins": {
            "width": settings.bin_tokens,
            "count": binned(torch.ones(g)),
            "delta_nll": binned(delta),
            "kl": binned(kl),
            "top1": binned(top1),
            "answer_count": binned(answer.float()),
            "answer_nll": binned(nll, answer),
            "answer_ref_nll": binned(ref_nll, answer),
        },
    }
    if settings.keep_per_token:
        record["per_token"] = {
            "nll": [round(v, 6) for v in nll.tolist()],
            "ref_nll": [round(v, 6) for v in ref_nll.tolist()],
            "kl": [round(v, 6) for v in kl.tolist()],
            "top1": [int(v) for v in top1.tolist()],
            "argmax_gold": [int(v) for v in hit.tolist()],
            "answer_of": answer_of.tolist(),
        }
    return record


# -- the harness ----------------------------------------------------------------------------------
def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row["example"], row["method"]


def _groups(method: Method, prompt_tokens: Sequence[int], settings: GoldSettings) -> list[tuple[list[int], int]]:
    """Rows sharing one cache, and the prompt length their ``prompt+N`` budgets are set from."""
    rows = list(range(len(prompt_tokens)))
    if not method.depends_on_prompt or settings.prompt_budget == "longest":
        return [(rows, max(prompt_tokens))]
    by_length: dict[int, list[int]] = {}
    for r in rows:
        by_length.setdefault(prompt_tokens[r], []).append(r)
    return [(members, length) for length, members in sorted(by_length.items())]


def run_gold(
    model: Any,
    tokenizer: Any,
    items: Sequence[GoldItem],
    methods: Sequence[Method],
    out_dir: str | pathlib.Path,
    settings: GoldSettings = GoldSettings(),
    shard: Shard | None = None,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Teacher-force every example's reference output through every method this shard owns.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer (pad id: the tokenizer's, else the model's eos).
    items : sequence of GoldItem
        From :func:`prepare_gold`, with the same ``settings``.
    methods : sequence of Method
        Parsed specs (adaptive / discontinuous planned for :func:`plan_tokens`). Methods, not
        examples, are split round robin over shards: each process runs the whole batch.
    out_dir : path
        Results directory (resumable).
    settings : GoldSettings
        Batching, reference cut, per-prompt budgets, bins.
    shard : Shard
        This process's rank / world size.
    progress : bool
        Show tqdm bars (methods x groups, and tokens).
    run_info : dict or None
        Extra settings recorded with the run (model, data, questions per example...); they must
        match to resume.

    Returns
    -------
    list[dict]
        Every record when this process merged the results, else this shard's new ones. The
        full cache's records carry the method name ``"reference"`` (written by rank 0).
    """
    shard = shard or Shard()
    config = {"harness": RESULTS, **dataclasses.asdict(settings), **(run_info or {})}
    store = ResultStore(out_dir, RESULTS, shard, config)
    done = store.done(_key)
    device = input_device(model)
    pad_id = (
        tokenizer.pad_token_id
        if getattr(tokenizer, "pad_token_id", None) is not None
        else model.generation_config.pad_token_id
    )
    if pad_id is None:
        raise ValueError("the gold harness pads batches: give the tokenizer a pad token (or the model a pad_token_id).")
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = max(int(it.prompt_ids.numel() + it.gold_ids.numel()) for it in items)
    if positions is not None and longest > positions:
        logger.warning(
            "prompt + reference reach %d tokens, beyond the model's %d positions: the full cache itself "
            "works outside its trained range there (every method sees the same tokens).",
            longest,
            positions,
        )
    owned = [m for i, m in enumerate(methods) if shard.owns(i)]
    names = [REFERENCE, *(m.spec for m in methods)]
    size = settings.batch_size or len(items)
    batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
    entry_bytes = bytes_per_entry(model)
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    passes = sum(
        1 + sum(len(_groups(m, [int(it.prompt_ids.numel()) for it in b], settings)) for m in owned) for b in batches
    )
    bars = Progress(progress, passes, max(int(it.gold_ids.numel()) for it in items), f"[rank {shard.rank}] passes")
    new: list[dict[str, Any]] = []

    def base(item: GoldItem, spec: str, method: Method | None, resolved: int) -> dict[str, Any]:
        p, g = int(item.prompt_ids.numel()), int(item.gold_ids.numel())
        bound = _bound(method, p, g, resolved, layers)
        return {
            "example": item.example.id,
            "index": item.index,
            "task": item.example.task,
            "method": spec,
            "family": method_family(spec) if method is not None else REFERENCE,
            "budget": _budget_of(method),
            "questions": item.example.k,
            "prompt_tokens": p,
            # the prompt length a prompt+N budget was set from (the row's own, unless prompt_budget="longest")
            "budget_prompt_tokens": resolved if method is not None and method.depends_on_prompt else p,
            "num_layers": layers,
            "bytes_per_entry": entry_bytes,
            "kv_entries_bound": bound,
            "kv_vs_full": round(bound / (p + g - 1), 4),
            # reference tokens at positions past the model's trained context (the full cache's too)
            "tokens_beyond_positions": max(0, p + g - 1 - positions) if positions is not None else 0,
        }

    try:
        for group_items in batches:
            todo = [m for m in owned if any((it.example.id, m.spec) not in done for it in group_items)]
            want_ref = shard.is_main and any((it.example.id, REFERENCE) not in done for it in group_items)
            if not todo and not want_ref:
                continue
            batch = GoldBatch.of(group_items, pad_id, device)
            bars.start(f"reference ({batch.rows} rows)", 1)
            start = time.perf_counter()
            reference = full_reference(model, batch, settings.reference_rows, settings.chunk_tokens)
            ref_seconds = time.perf_counter() - start
            bars.done()
            if want_ref:
                for row, item in enumerate(group_items):
                    if (item.example.id, REFERENCE) in done:
                        continue
                    record = _record(
                        base(item, REFERENCE, None, batch.prompt_tokens[row]), row, item, None, reference, row, settings
                    )
                    record["seconds"] = round(ref_seconds / batch.rows, 4)
                    store.append(record)
                    new.append(record)
            for method in todo:
                for rows, resolved in _groups(method, batch.prompt_tokens, settings):
                    if all((group_items[r].example.id, method.spec) in done for r in rows):
                        continue
                    sub = batch.select(rows)
                    bars.start(f"{method.spec} ({len(rows)} rows)", sub.gold_ids.shape[1])
                    lengths = [resolved] * len(rows) if method.depends_on_prompt else list(sub.prompt_tokens)
                    cache = method.make_cache(model, lengths)
                    stats = teacher_force(
                        model,
                        cache,
                        sub,
                        reference.select(rows, sub.gold_ids.shape[1]),
                        bars.step,
                        settings.chunk_tokens,
                    )
                    for i, r in enumerate(rows):
                        item = group_items[r]
                        if (item.example.id, method.spec) in done:
                            continue
                        record = _record(
                            base(item, method.spec, method, resolved), i, item, stats, reference, r, settings
                        )
                        record.update(
                            batch_rows=len(rows),
                            kv_slots_peak=round(stats.kv_slots_peak, 1),
                            kv_allocated_peak=stats.kv_allocated_peak // len(rows),
                            seconds=round(stats.seconds / len(rows), 4),
                            group_steps_per_second=round(sub.gold_ids.shape[1] / stats.seconds, 2),
                        )
                        store.append(record)
                        new.append(record)
                    bars.done(method=method.spec, nll=f"{_mean(stats.nll[sub.gold_valid.cpu()]):.3f}")
    finally:
        bars.close()
    rank = {n: i for i, n in enumerate(names)}
    if store.finish(_key, lambda r: (r["index"], rank.get(r["method"], len(rank)), r["method"])):
        rows_all = store.records()
        write_csv(summarize_gold(rows_all), store.dir / f"{RESULTS}_summary.csv")
        return rows_all
    return new


# -- summary -----------------------------------------------------------------------------------
def _weighted(rows: Sequence[dict[str, Any]], key: str, weight: str) -> float | None:
    pairs = [(r[key], r[weight]) for r in rows if r.get(key) is not None and r.get(weight)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _quarter(rows: Sequence[dict[str, Any]], key: str, q: int) -> float | None:
    pairs = [
        (r[key][q], (q + 1) * r["gold_tokens"] // 4 - q * r["gold_tokens"] // 4) for r in rows if r[key][q] is not None
    ]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _percent(value: float | None) -> float | None:
    return None if value is None else round(100 * value, 2)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits) + 0.0  # no -0.0


def summarize_gold(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, method) summary, token-weighted over examples.

    Columns: mean ΔNLL over the full cache (nats per token), KL(full ‖ method), top-1
    agreement with the full cache (%), each also per output quarter (``*_q1..4``), the same on
    answer tokens, answers whose every token is the method's most likely one (%), and the KV
    entries the method holds by its definition (per layer and KV head, mean over examples)
    against the full cache's.
    """
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    out = []
    for (task, method), rs in groups.items():
        tokens = sum(r["gold_tokens"] for r in rs)
        answers = [r["answers_exact"] for r in rs if r.get("answers_exact") is not None]
        top1 = _weighted(rs, "top1", "gold_tokens")
        answer_top1 = _weighted(rs, "answer_top1", "answer_tokens")
        out.append(
            {
                "task": task,
                "method": method,
                "family": rs[0].get("family"),
                "budget": rs[0].get("budget"),
                "examples": len(rs),
                "prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / len(rs), 1),
                "gold_tokens": round(tokens / len(rs), 1),
                "kv_entries_bound": round(sum(r["kv_entries_bound"] for r in rs) / len(rs), 1),
                "kv_vs_full": round(100 * sum(r["kv_vs_full"] for r in rs) / len(rs), 1),
                "nll": _round(_weighted(rs, "nll", "gold_tokens"), 5),
                "delta_nll": _round(_weighted(rs, "delta_nll", "gold_tokens"), 5),
                **{f"delta_nll_q{q + 1}": _round(_quarter(rs, "quarter_delta_nll", q), 5) for q in range(4)},
                "kl": _round(_weighted(rs, "kl", "gold_tokens"), 5),
                "top1": _round(100 * top1, 2) if top1 is not None else None,
                "answer_nll": _round(_weighted(rs, "answer_nll", "answer_tokens"), 5),
                "answer_delta_nll": _round(_weighted(rs, "answer_delta_nll", "answer_tokens"), 5),
                "answer_kl": _round(_weighted(rs, "answer_kl", "answer_tokens"), 5),
                "answer_top1": _round(100 * answer_top1, 2) if answer_top1 is not None else None,
                "answers_exact": _round(100 * sum(answers) / len(answers), 2) if answers else None,
                **{f"kl_q{q + 1}": _round(_quarter(rs, "quarter_kl", q), 5) for q in range(4)},
                **{f"top1_q{q + 1}": _percent(_quarter(rs, "quarter_top1", q)) for q in range(4)},
            }
        )
    return out
