"""Fidelity: how far a compressed cache moves the model's next-token distributions.

For each prompt, a reference continuation of ``steps`` tokens is generated greedily with
the full cache (transformers' ``DynamicCache``), keeping the full cache's next-token
log-probabilities at every decode step. Each method then replays the same prompt and the
same reference tokens (teacher forcing: one token per forward, positions from the cache's
logical length), and at every decode step ``t`` we record

* ``KL(full || method)`` of the two next-token distributions (nats),
* top-1 agreement: whether the method's most likely next token is the full cache's,
* the KV entries the method's cache holds after the step (summed over layers).

This costs one forward per token and method, needs no task the model can solve, and is
exact about what compression changes; it is the honest measure on small models
(SmolLM2-135M cannot solve LongGenBench). :mod:`scope_kv.eval.gold` measures the same
against the reference answer instead of the model's own continuation.

Results: ``<out>/fidelity.jsonl`` (one line per (prompt, method) with per-step lists) and
``<out>/fidelity_summary.csv``.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from .._checks import check_int
from ..compat import cache_kwargs
from .common import KVAccount, Shard, chunks, input_device
from .longgenbench import Example, PromptSettings
from .methods import Method
from .runs import HarnessRun, Pass, Progress

logger = logging.getLogger(__name__)

__all__ = ["FidelitySettings", "Reference", "reference_run", "replay", "run_fidelity", "summarize_fidelity"]

RESULTS = "fidelity"


@dataclass(frozen=True, kw_only=True)
class FidelitySettings(PromptSettings):
    """Settings of one fidelity run (they must match to resume into a directory).

    Attributes
    ----------
    steps : int
        Reference tokens generated and replayed per prompt (decode steps compared).
    allow_eos : bool
        Let the reference end at the end-of-turn token; by default it is never chosen, so every
        prompt gives ``steps`` comparable steps (the distributions compared are not changed).
    max_questions, max_prompt_tokens, chat_template
        How prompts are cut and formatted (:class:`~scope_kv.eval.longgenbench.PromptSettings`).
    """

    steps: int = 256
    allow_eos: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("steps", self.steps, 1)


@dataclass
class Reference:
    """The full cache's greedy continuation of one prompt.

    Attributes
    ----------
    tokens : Tensor
        ``(steps,)`` the reference tokens; ``tokens[t]`` is fed at decode step ``t``.
    log_probs : Tensor
        ``(steps, vocab)`` float32 log-probabilities the full cache gives after decode step ``t``.
    entries : list[int]
        KV entries the full cache holds after each decode step (summed over layers).
    """

    tokens: torch.Tensor
    log_probs: torch.Tensor
    entries: list[int]


def _forward(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """One forward over ``ids`` (1, q) with ``cache``; returns last-position float32 logits (vocab,)."""
    seen = cache.get_seq_length()
    mask = torch.ones((1, seen + ids.shape[1]), dtype=torch.long, device=ids.device)
    out = model(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), use_cache=True)
    return out.logits[0, -1].float()


def _banned(model: Any, allow_eos: bool) -> list[int]:
    if allow_eos:
        return []
    eos = model.generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


@torch.no_grad()
def reference_run(model: Any, input_ids: torch.Tensor, steps: int, allow_eos: bool = False) -> Reference:
    """Greedy continuation with the full cache, keeping its log-probabilities at every step.

    Parameters
    ----------
    input_ids : Tensor
        ``(1, prompt)`` prompt tokens.
    steps : int
        Decode steps to run (the reference has ``steps`` tokens).
    allow_eos : bool
        If False, the end-of-turn token is never chosen (the continuation runs ``steps`` tokens).
    """
    account = KVAccount(model)
    cache = DynamicCache(config=model.config)
    banned = _banned(model, allow_eos)
    logits = _forward(model, input_ids, cache)
    tokens, log_probs, entries = [], [], []
    for _ in range(steps):
        choice = logits.clone()
        if banned:
            choice[banned] = float("-inf")
        nxt = int(choice.argmax())
        if not banned and nxt in _banned(model, False):
            break
        tokens.append(nxt)
        logits = _forward(model, torch.tensor([[nxt]], device=input_ids.device), cache)
        log_probs.append(torch.log_softmax(logits, -1).cpu())
        entries.append(sum(account.entries(cache)))
    stacked = torch.stack(log_probs) if log_probs else torch.empty((0, logits.shape[-1]))
    return Reference(torch.tensor(tokens, dtype=torch.long), stacked, entries)


@torch.no_grad()
def replay(
    model: Any, cache: Any, input_ids: torch.Tensor, reference: Reference, on_step: Any = None
) -> dict[str, list]:
    """Teacher-force ``reference`` through ``cache`` and compare with the full cache per step.

    Returns
    -------
    dict
        ``kl`` (nats), ``top1`` (0/1) and ``entries`` (KV entries held, summed over layers),
        one value per decode step.
    """
    account = KVAccount(model)
    _forward(model, input_ids, cache)
    kl, top1, entries = [], [], []
    device = input_ids.device
    for t, token in enumerate(reference.tokens.tolist()):
        logits = _forward(model, torch.tensor([[token]], device=device), cache)
        log_q = torch.log_softmax(logits, -1).cpu()
        log_p = reference.log_probs[t]
        kl.append(max(0.0, float((log_p.exp() * (log_p - log_q)).sum())))
        top1.append(int(log_q.argmax() == log_p.argmax()))
        entries.append(sum(account.entries(cache)))
        if on_step is not None:
            on_step()
    return {"kl": kl, "top1": top1, "entries": entries}


def _key(row: dict[str, Any]) -> tuple[str, str]:
    return row["example"], row["method"]


def run_fidelity(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    methods: Sequence[Method],
    out_dir: str | pathlib.Path,
    settings: FidelitySettings = FidelitySettings(),
    shard: Shard | None = None,
    progress: bool = False,
    run_info: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Compare every method with the full cache on every prompt this shard owns.

    Parameters are as for :func:`scope_kv.eval.runner.run_longgenbench`; ``settings.steps``
    reference tokens are replayed per prompt. The reference itself is recorded under the
    method name ``"reference"`` (its KV entries only).

    Returns
    -------
    list[dict]
        Every record when this process merged the results, else this shard's new ones.
    """
    run = HarnessRun(out_dir, RESULTS, shard, settings, run_info, _key)
    account = KVAccount(model)
    device = input_device(model)
    names = ["reference", *(m.spec for m in methods)]
    todo = [(i, ex) for i, ex in chunks(examples, run.shard) if any(not run.is_done(ex.id, n) for n in names)]
    current: dict[str, Any] = {}  # the example whose reference the method passes compare with

    def reference_pass(index: int, example: Example, bars: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        current.clear()
        ex = settings.prepare(example, tokenizer)
        ids = settings.encode(ex, tokenizer, device)["input_ids"]
        start = time.perf_counter()
        reference = reference_run(model, ids, settings.steps, settings.allow_eos)
        ref_seconds = time.perf_counter() - start
        if reference.tokens.numel() == 0:
            logger.warning("%s: the reference ended at once (end-of-turn first); nothing to compare", example.id)
            return [], {}
        base = {
            "example": example.id,
            "index": index,
            "task": ex.task,
            "questions": ex.k,
            "prompt_tokens": ids.shape[1],
            "steps": int(reference.tokens.numel()),
            "num_layers": account.num_layers,
            "bytes_per_entry": account.bytes_per_entry,
        }
        current.update(example=example.id, ids=ids, reference=reference, base=base)
        row = {
            **base,
            "method": "reference",
            "reference_text": tokenizer.decode(reference.tokens, skip_special_tokens=False),
            "entries": reference.entries,
            "seconds": round(ref_seconds, 3),
        }
        return [row], {}

    def method_pass(example: Example, method: Method, bars: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        if current.get("example") != example.id:
            return [], {}  # its reference ended at once: nothing to compare
        record = _method_record(model, method, current["ids"], current["reference"], account, bars)
        row = {**current["base"], **record}
        return [row], {"method": method.spec, "kl": f"{row['mean_kl']:.3f}", "top1": f"{row['top1_agreement']:.2f}"}

    passes = []
    for index, example in todo:
        passes.append(Pass(f"{example.id} reference", None, functools.partial(reference_pass, index, example)))
        passes += [
            Pass(f"{example.id} {m.spec}", None, functools.partial(method_pass, example, m))
            for m in methods
            if not run.is_done(example.id, m.spec)
        ]
    run.run_passes(passes, progress, settings.steps, f"[rank {run.shard.rank}] prompts x methods")
    rank = {n: i for i, n in enumerate(names)}
    rows = run.finish(lambda r: (r["index"], rank.get(r["method"], len(rank)), r["method"]), summarize_fidelity)
    return run.new if rows is None else rows


def _method_record(
    model: Any, method: Method, ids: torch.Tensor, reference: Any, account: KVAccount, bars: Progress
) -> dict[str, Any]:
    """Replay the reference through ``method``'s cache: the record's per-method fields."""
    start = time.perf_counter()
    cache = method.make_cache(model, ids.shape[1])
    result = replay(model, cache, ids, reference, on_step=bars.step)
    steps = len(result["kl"])
    return {
        "method": method.spec,
        "mean_kl": sum(result["kl"]) / steps,
        "top1_agreement": sum(result["top1"]) / steps,
        "kv_entries_end": result["entries"][-1],
        "kv_entries_peak": max(result["entries"]),
        "kv_bytes_peak": account.held_bytes(max(result["entries"])),
        "seconds": round(time.perf_counter() - start, 3),
        **result,
    }


def summarize_fidelity(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, method) summary: mean KL, top-1 agreement, KV memory relative to the full cache.

    ``kv_vs_full`` divides the method's peak KV entries by the full cache's at the same prompt
    and step count (the reference's last step).
    """
    full_peak = {r["example"]: max(r["entries"]) for r in rows if r["method"] == "reference"}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["method"] != "reference":
            groups.setdefault((row["task"], row["method"]), []).append(row)
    out = []
    for (task, method), rs in groups.items():
        steps = sum(len(r["kl"]) for r in rs)
        kl_all = [k for r in rs for k in r["kl"]]
        late = [k for r in rs for k in r["kl"][len(r["kl"]) // 2 :]]
        layers = rs[0]["num_layers"]
        ratios = [r["kv_entries_peak"] / full_peak[r["example"]] for r in rs if r["example"] in full_peak]
        out.append(
            {
                "task": task,
                "method": method,
                "prompts": len(rs),
                "steps": steps,
                "mean_kl": round(sum(kl_all) / steps, 5),
                "mean_kl_second_half": round(sum(late) / max(len(late), 1), 5),
                "max_kl": round(max(kl_all), 4),
                "top1_agreement": round(100 * sum(sum(r["top1"]) for r in rs) / steps, 2),
                "prompt_tokens": round(sum(r["prompt_tokens"] for r in rs) / len(rs), 1),
                "kv_entries_per_layer_peak": round(sum(r["kv_entries_peak"] for r in rs) / len(rs) / layers, 1),
                "kv_mib_peak": round(sum(r["kv_bytes_peak"] for r in rs) / len(rs) / 2**20, 3),
                "kv_vs_full": round(100 * sum(ratios) / len(ratios), 1) if ratios else None,
            }
        )
    return out
