"""The gold harness's records (one per example and method) and their summary."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..methods import Method
from .data import GoldItem, GoldSettings
from .forcing import GoldReference, TokenStats


# -- records ------------------------------------------------------------------------------------
def method_family(spec: str) -> str:
    """A method's name without its decoding budget and recent window (``slide:128/64`` ->
    ``slide:B/r``; an R-KV buffer becomes ``b``): one colour per family in the plots."""
    return re.sub(r"(?<=buffer=)\d+", "b", re.sub(r"\d+/\d+(?=,|$)", "B/r", spec))


def budget_of(method: Method | None) -> int | None:
    """The decoding budget ``B`` a method is compared at (its equal-memory group)."""
    if method is None:
        return None
    if method.per_prompt is not None:
        return method.per_prompt.build(0).memory_budget  # (a share of no prompt: its extra tokens)
    return None if method.decoding is None else method.decoding.memory_budget


def entries_bound(method: Method | None, prompt: int, gold: int, resolved_prompt: int, layers: int) -> int:
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


def mean_or_none(values: torch.Tensor) -> float | None:
    return float(values.double().mean()) if values.numel() else None


def gold_record(
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
        "nll": mean_or_none(nll),
        "ref_nll": mean_or_none(ref_nll),
        "delta_nll": mean_or_none(delta),
        "kl": mean_or_none(kl),
        "top1": mean_or_none(top1),
        "argmax_gold": mean_or_none(hit.float()),
        "quarter_delta_nll": [mean_or_none(delta[a:b]) for a, b in quarters],
        "quarter_kl": [mean_or_none(kl[a:b]) for a, b in quarters],
        "quarter_top1": [mean_or_none(top1[a:b]) for a, b in quarters],
        "answer_nll": mean_or_none(nll[answer]),
        "answer_ref_nll": mean_or_none(ref_nll[answer]),
        "answer_delta_nll": mean_or_none(delta[answer]),
        "answer_kl": mean_or_none(kl[answer]),
        "answer_top1": mean_or_none(top1[answer]),
        "answer_argmax_gold": mean_or_none(hit[answer].float()),
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
