"""Run LongGenBench under several cache methods: greedy generation, scoring, KV accounting.

One JSON line per (example, method) goes to ``<out>/longgenbench.jsonl`` and a per-method
summary to ``<out>/longgenbench_summary.csv``; see :mod:`scope_kv.eval.runs` for resuming
and sharding.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .._checks import check_int
from ..compat import cache_kwargs
from .common import KVAccount, Shard, chunks, input_device
from .longgenbench import Example, PromptSettings, score_output
from .methods import Method
from .runs import HarnessRun, Pass, Progress, write_csv

logger = logging.getLogger(__name__)

__all__ = ["KVTrace", "LongGenBenchSettings", "run_longgenbench", "summarize_longgenbench", "write_csv"]

RESULTS = "longgenbench"


class KVTrace(StoppingCriteria):
    """A stopping criterion that never stops: it records the cache's state after every forward.

    ``generate`` calls it once per generated token, after the forward that produced it, so
    ``entries[i]`` is the KV entries (summed over layers) held after forward ``i`` (``i = 0``
    is the prefill). It also times the prefill and the decoding.

    Parameters
    ----------
    cache : Cache
        The cache passed to ``generate`` as ``past_key_values``.
    account : KVAccount
        KV geometry of the model.
    on_token : callable or None
        Called with no argument after each token (progress bars).
    """

    def __init__(self, cache: Any, account: KVAccount, on_token: Any = None):
        self.cache = cache
        self.account = account
        self.on_token = on_token
        self.entries: list[int] = []
        self.peak_allocated = 0
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.entries.append(sum(self.account.entries(self.cache)))
        self.peak_allocated = max(self.peak_allocated, self.account.allocated_bytes(self.cache))
        if self.on_token is not None:
            self.on_token()
        return cast(torch.BoolTensor, torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device))

    @property
    def prefill_seconds(self) -> float:
        return (self.first or self.start) - self.start

    @property
    def decode_tokens_per_second(self) -> float | None:
        if self.first is None or self.last is None or self.last <= self.first:
            return None
        return (len(self.entries) - 1) / (self.last - self.first)


@dataclass(frozen=True, kw_only=True)
class LongGenBenchSettings(PromptSettings):
    """Settings of one LongGenBench run (they must match to resume into a directory).

    Attributes
    ----------
    max_new_tokens : int
        Generation length (the paper: 4096 for the 4K sets, 7950 for 8K).
    max_questions, max_prompt_tokens, chat_template
        How prompts are cut and formatted (:class:`~scope_kv.eval.longgenbench.PromptSettings`).
    """

    max_new_tokens: int = 4096

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("max_new_tokens", self.max_new_tokens, 1)


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row["example"], row["method"]


def _order(methods: Sequence[str]):
    rank = {m: i for i, m in enumerate(methods)}
    return lambda row: (row["index"], rank.get(row["method"], len(rank)), row["method"])


def run_longgenbench(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    methods: Sequence[Method],
    out_dir: str | pathlib.Path,
    settings: LongGenBenchSettings = LongGenBenchSettings(),
    shard: Shard | None = None,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Generate an answer for every (example, method) pair this shard owns, and score it.

    Parameters
    ----------
    model, tokenizer
        A causal LM and its tokenizer (batch size 1, greedy decoding).
    examples : sequence of Example
        E.g. :func:`scope_kv.eval.longgenbench.load_examples`; split round robin over shards.
    methods : sequence of Method
        Parsed method specs (:func:`scope_kv.eval.methods.parse_method`).
    out_dir : path
        Results directory (resumable).
    settings : LongGenBenchSettings
        Generation length and prompt truncation.
    shard : Shard
        This process's rank / world size.
    progress : bool
        Show tqdm progress bars (examples x methods, and tokens).
    run_info : dict or None
        Extra settings recorded with the run (model name, data path); they must match to resume.

    Returns
    -------
    list[dict]
        Every record of the run when this process merged the results, else this shard's new ones.
    """
    run = HarnessRun(out_dir, RESULTS, shard, settings, run_info, _key)
    account = KVAccount(model)
    device = input_device(model)
    eos = model.generation_config.eos_token_id
    todo = [(i, ex, m) for i, ex in chunks(examples, run.shard) for m in methods if not run.is_done(ex.id, m.spec)]
    if run.done:
        logger.info("resuming: %d records already in %s, %d to run on this rank", len(run.done), out_dir, len(todo))
    prepared: dict[str, tuple[Example, dict[str, torch.Tensor]]] = {}
    tally = [0, 0]  # questions right, questions seen

    def one(
        index: int, example: Example, method: Method, bars: Progress
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if example.id not in prepared:  # one example at a time, encoded once for all its methods
            prepared.clear()
            ex = settings.prepare(example, tokenizer)
            prepared[example.id] = (ex, settings.encode(ex, tokenizer, device))
        ex, inputs = prepared[example.id]
        record = _generate_and_score(model, tokenizer, ex, index, inputs, method, settings, account, bars, eos)
        tally[0], tally[1] = tally[0] + record["correct"], tally[1] + ex.k
        return [record], {"acc": f"{tally[0]}/{tally[1]}"}

    passes = [Pass(f"{ex.id} {m.spec}", None, functools.partial(one, i, ex, m)) for i, ex, m in todo]
    run.run_passes(passes, progress, settings.max_new_tokens, f"[rank {run.shard.rank}] examples x methods")
    rows = run.finish(_order([m.spec for m in methods]), summarize_longgenbench)
    return run.new if rows is None else rows


def _generate_and_score(
    model: Any,
    tokenizer: Any,
    example: Example,
    index: int,
    inputs: dict[str, torch.Tensor],
    method: Method,
    settings: LongGenBenchSettings,
    account: KVAccount,
    bars: Progress,
    eos: Any,
) -> dict[str, Any]:
    """One greedy ``generate`` call of ``example`` (number ``index`` of the run) under a fresh cache of
    ``method``: its record."""
    prompt_len = inputs["input_ids"].shape[1]
    cache = method.make_cache(model, prompt_len)
    trace = KVTrace(cache, account, on_token=bars.step)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            **cache_kwargs(cache),
            max_new_tokens=settings.max_new_tokens,
            do_sample=False,
            stopping_criteria=StoppingCriteriaList([trace]),
            eos_token_id=eos,
        )
    new_tokens = out[0, prompt_len:]
    text_out = tokenizer.decode(new_tokens, skip_special_tokens=True)
    score = score_output(example, text_out)
    entries = trace.entries or [0]
    return {
        "example": example.id,
        "index": index,
        "task": example.task,
        "method": method.spec,
        "questions": example.k,
        "prompt_tokens": prompt_len,
        "output_tokens": int(new_tokens.numel()),
        "output": text_out,
        "correct": score.correct,
        "position_correct": score.position_correct,
        "answered": score.answered,
        "verdicts": [v.as_dict() for v in score.verdicts],
        "num_layers": account.num_layers,
        "bytes_per_entry": account.bytes_per_entry,
        "kv_entries_end": entries[-1],
        "kv_entries_peak": max(entries),
        "kv_bytes_end": account.held_bytes(entries[-1]),
        "kv_bytes_peak": account.held_bytes(max(entries)),
        "kv_allocated_peak": trace.peak_allocated,
        "kv_entries_trace": entries,
        "prefill_seconds": round(trace.prefill_seconds, 4),
        "tokens_per_second": trace.decode_tokens_per_second,
    }


def summarize_longgenbench(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, method) summary rows: accuracies (label and position pairing) and KV memory."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["method"]), []).append(row)
    out = []
    for (task, method), rs in groups.items():
        questions = sum(r["questions"] for r in rs)
        speeds = [r["tokens_per_second"] for r in rs if r.get("tokens_per_second")]
        layers = rs[0]["num_layers"]
        out.append(
            {
                "task": task,
                "method": method,
                "examples": len(rs),
                "questions": questions,
                "accuracy": round(100 * sum(r["correct"] for r in rs) / questions, 2),
                "position_accuracy": round(100 * sum(r["position_correct"] for r in rs) / questions, 2),
                "answered": round(100 * sum(r["answered"] for r in rs) / questions, 2),
                "prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / len(rs), 1),
                "output_tokens": round(sum(r["output_tokens"] for r in rs) / len(rs), 1),
                "kv_entries_per_layer_end": round(sum(r["kv_entries_end"] for r in rs) / len(rs) / layers, 1),
                "kv_entries_per_layer_peak": round(sum(r["kv_entries_peak"] for r in rs) / len(rs) / layers, 1),
                "kv_mib_peak": round(sum(r["kv_bytes_peak"] for r in rs) / len(rs) / 2**20, 3),
                "tokens_per_second": round(sum(speeds) / len(speeds), 2) if speeds else None,
            }
        )
    return out
