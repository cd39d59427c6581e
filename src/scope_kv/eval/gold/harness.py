"""``scope-kv eval gold``: every method of the grid teacher-forced over every example, resumable."""

from __future__ import annotations

import functools
import logging
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...accounting import bytes_per_entry
from ..common import Shard, input_device
from ..methods import Method
from ..runs import HarnessRun, Pass, Progress
from .data import REFERENCE, RESULTS, GoldBatch, GoldItem, GoldSettings
from .forcing import GoldReference, full_reference, teacher_force
from .records import budget_of, entries_bound, gold_record, mean_or_none, method_family, summarize_gold

logger = logging.getLogger(__name__)


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

    Parameters are as for :func:`scope_kv.eval.runner.run_longgenbench` (the tokenizer gives the pad
    id, else the model's eos), except: ``items`` come from :func:`prepare_gold` with the same
    ``settings`` (batching, reference cut, per-prompt budgets, bins); ``methods`` are planned for
    :func:`plan_tokens`, and they, not examples, are split round robin over shards (each process
    runs the whole batch); the progress bars count methods x groups, and tokens.

    Returns
    -------
    list[dict]
        Every record when this process merged the results, else this shard's new ones. The
        full cache's records carry the method name ``"reference"`` (written by rank 0).
    """
    run = HarnessRun(out_dir, RESULTS, shard, settings, run_info, _key)
    device, pad_id = input_device(model), _pad_id(model, tokenizer)
    owned = [m for i, m in enumerate(methods) if run.shard.owns(i)]
    size = settings.batch_size or len(items)
    batches = [list(items[i : i + size]) for i in range(0, len(items), size)]
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    describe = _Describe(bytes_per_entry(model), layers, _positions(model, items))
    current: dict[str, Any] = {}  # the batch in work and its reference (one batch's at a time)

    def reference_pass(
        group_items: list[GoldItem], want_ref: bool, bars: Progress
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        current.clear()
        batch = GoldBatch.of(group_items, pad_id, device)
        start = time.perf_counter()
        reference = full_reference(model, batch, settings.reference_rows, settings.chunk_tokens)
        current.update(batch=batch, reference=reference)
        if not want_ref:
            return [], {}
        return _reference_records(group_items, batch, reference, time.perf_counter() - start, describe, settings), {}

    def method_pass(
        group_items: list[GoldItem], method: Method, rows: list[int], resolved: int, bars: Progress
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        batch, reference = current["batch"], current["reference"]
        return _method_pass(model, method, batch, group_items, rows, resolved, reference, settings, bars, describe)

    passes: list[Pass] = []
    for group_items in batches:
        prompts = [int(it.prompt_ids.numel()) for it in group_items]
        groups = [
            (method, rows, resolved)
            for method in owned
            for rows, resolved in _groups(method, prompts, settings)
            if not all(run.is_done(group_items[r].example.id, method.spec) for r in rows)
        ]
        want_ref = run.shard.is_main and any(not run.is_done(it.example.id, REFERENCE) for it in group_items)
        if not groups and not want_ref:
            continue
        passes.append(
            Pass(f"reference ({len(group_items)} rows)", 1, functools.partial(reference_pass, group_items, want_ref))
        )
        passes += [
            Pass(
                f"{method.spec} ({len(rows)} rows)",
                max(int(group_items[r].gold_ids.numel()) for r in rows),
                functools.partial(method_pass, group_items, method, rows, resolved),
            )
            for method, rows, resolved in groups
        ]
    tokens = max(int(it.gold_ids.numel()) for b in batches for it in b)
    run.run_passes(passes, progress, tokens, f"[rank {run.shard.rank}] passes")
    rank = {n: i for i, n in enumerate([REFERENCE, *(m.spec for m in methods)])}
    rows_all = run.finish(lambda r: (r["index"], rank.get(r["method"], len(rank)), r["method"]), summarize_gold)
    return run.new if rows_all is None else rows_all


def _reference_records(
    group_items: list[GoldItem],
    batch: GoldBatch,
    reference: Any,
    seconds: float,
    describe: _Describe,
    settings: GoldSettings,
) -> list[dict[str, Any]]:
    """The full cache's records of one batch; its time shared over the rows."""
    records = []
    for row, item in enumerate(group_items):
        base = describe(item, REFERENCE, None, batch.prompt_tokens[row])
        record = gold_record(base, row, item, None, reference, row, settings)
        record["seconds"] = round(seconds / batch.rows, 4)
        records.append(record)
    return records


def _pad_id(model: Any, tokenizer: Any) -> int:
    """The id batches are padded with: the tokenizer's pad token, else the model's."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = model.generation_config.pad_token_id
    if pad_id is None:
        raise ValueError("the gold harness pads batches: give the tokenizer a pad token (or the model a pad_token_id).")
    return int(pad_id)


def _positions(model: Any, items: Sequence[GoldItem]) -> int | None:
    """The model's trained positions (``None``: not stated); warns when prompt + reference go past them."""
    positions = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    longest = max(int(it.prompt_ids.numel() + it.gold_ids.numel()) for it in items)
    if positions is not None and longest > positions:
        logger.warning(
            "prompt + reference reach %d tokens, beyond the model's %d positions: the full cache itself "
            "works outside its trained range there (every method sees the same tokens).",
            longest,
            positions,
        )
    return positions


@dataclass(frozen=True)
class _Describe:
    """The fields every record of one example and method starts from (what was run, and its KV bound)."""

    entry_bytes: int
    layers: int
    positions: int | None

    def __call__(self, item: GoldItem, spec: str, method: Method | None, resolved: int) -> dict[str, Any]:
        p, g = int(item.prompt_ids.numel()), int(item.gold_ids.numel())
        bound = entries_bound(method, p, g, resolved, self.layers)
        return {
            "example": item.example.id,
            "index": item.index,
            "task": item.example.task,
            "method": spec,
            "family": method_family(spec) if method is not None else REFERENCE,
            "budget": budget_of(method),
            "questions": item.example.k,
            "prompt_tokens": p,
            # the prompt length a prompt+N budget was set from (the row's own, unless prompt_budget="longest")
            "budget_prompt_tokens": resolved if method is not None and method.depends_on_prompt else p,
            "num_layers": self.layers,
            "bytes_per_entry": self.entry_bytes,
            "kv_entries_bound": bound,
            "kv_vs_full": round(bound / (p + g - 1), 4),
            # reference tokens at positions past the model's trained context (the full cache's too)
            "tokens_beyond_positions": max(0, p + g - 1 - self.positions) if self.positions is not None else 0,
        }


def _method_pass(
    model: Any,
    method: Method,
    batch: GoldBatch,
    items: Sequence[GoldItem],
    rows: list[int],
    resolved: int,
    reference: GoldReference,
    settings: GoldSettings,
    bars: Progress,
    describe: _Describe,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Teacher-force ``rows`` of ``batch`` (made of ``items``) through one cache of ``method``: one
    record per row, and the pass's mean NLL for the progress bar."""
    sub = batch.select(rows)
    lengths = [resolved] * len(rows) if method.depends_on_prompt else list(sub.prompt_tokens)
    cache = method.make_cache(model, lengths)
    stats = teacher_force(
        model, cache, sub, reference.select(rows, sub.gold_ids.shape[1]), bars.step, settings.chunk_tokens
    )
    records = []
    for i, r in enumerate(rows):
        item = items[r]
        record = gold_record(describe(item, method.spec, method, resolved), i, item, stats, reference, r, settings)
        record.update(
            batch_rows=len(rows),
            kv_slots_peak=round(stats.kv_slots_peak, 1),
            kv_allocated_peak=stats.kv_allocated_peak // len(rows),
            seconds=round(stats.seconds / len(rows), 4),
            group_steps_per_second=round(sub.gold_ids.shape[1] / stats.seconds, 2),
        )
        records.append(record)
    return records, {"method": method.spec, "nll": f"{mean_or_none(stats.nll[sub.gold_valid.cpu()]):.3f}"}
