"""``scope-kv report DIR``: markdown tables and PNG plots from a results directory.

This module holds the report's data work: it reads the results, summarises them, and writes the
summary CSVs and the markdown; :mod:`.plots` draws its figures, and :mod:`.testbed` writes the
testbed section.

Reads ``longgenbench.jsonl``, ``fidelity.jsonl``, ``gold.jsonl`` and/or ``testbed.jsonl``
(merging any part files left by an unfinished sharded run) and writes, next to them:

* ``report.md`` -- one table per harness (the summaries also go to the ``*_summary.csv`` files);
* ``accuracy_vs_memory.png`` / ``agreement_vs_memory.png`` -- score against peak KV memory, one
  point per method;
* ``kv_over_steps.png`` -- KV entries held per layer, and KV MiB held, over decoding steps, per
  method;
* ``fidelity_over_steps.png`` -- KL(full || method) and top-1 agreement over decoding steps;
* ``gold_B<budget>.png`` -- for each decoding budget, ΔNLL of the reference tokens and the NLL
  of the answer tokens against output position.

Every plot gives a method the same colour (:func:`~.plots.method_colours`: one per method family,
the same in every report; budgets of one family differ by line style or marker), and draws the
full cache (``full``, the reference) in black, on top of the others.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Sequence
from typing import Any

from .fidelity import summarize_fidelity
from .gold import REFERENCE, method_family, summarize_gold
from .methods import gold_grid
from .plots import fidelity_figure, gold_plot, kv_figure, memory_scatter, method_colours
from .runner import summarize_longgenbench
from .runs import read_results, write_csv
from .tables import markdown_table
from .testbed import load_records as load_testbed_records
from .testbed import write_report as write_testbed_report

logger = logging.getLogger(__name__)

__all__ = [
    "FIDELITY_COLUMNS",
    "GOLD_COLUMNS",
    "LGB_COLUMNS",
    "load_results",
    "markdown_table",
    "make_report",
    "method_colours",
]


def load_results(directory: str | pathlib.Path, name: str) -> list[dict[str, Any]]:
    """All records of harness ``name`` in ``directory`` (merged file and part files, deduplicated)."""
    return read_results(directory, name, lambda r: (r["example"], r["method"]), lambda r: r["index"])


FIDELITY_COLUMNS = [
    ("method", "method"),
    ("prompts", "prompts"),
    ("steps", "steps"),
    ("prompt_tokens", "prompt tokens"),
    ("kv_entries_per_layer_peak", "KV entries / layer (peak)"),
    ("kv_vs_full", "KV vs full (%)"),
    ("mean_kl", "mean KL (nats)"),
    ("mean_kl_second_half", "mean KL, 2nd half"),
    ("top1_agreement", "top-1 agreement (%)"),
]
LGB_COLUMNS = [
    ("task", "task"),
    ("method", "method"),
    ("examples", "examples"),
    ("accuracy", "accuracy (%)"),
    ("position_accuracy", "position-paired (%)"),
    ("answered", "answered (%)"),
    ("output_tokens", "output tokens"),
    ("kv_entries_per_layer_peak", "KV entries / layer (peak)"),
    ("kv_mib_peak", "KV MiB (peak)"),
    ("tokens_per_second", "tok/s"),
]


GOLD_COLUMNS = [
    ("method", "method"),
    ("examples", "examples"),
    ("gold_tokens", "gold tokens"),
    ("kv_entries_bound", "KV entries / layer"),
    ("kv_vs_full", "KV vs full (%)"),
    ("delta_nll", "ΔNLL"),
    ("delta_nll_q1", "ΔNLL Q1"),
    ("delta_nll_q2", "Q2"),
    ("delta_nll_q3", "Q3"),
    ("delta_nll_q4", "Q4"),
    ("kl", "KL"),
    ("top1", "top-1 (%)"),
    ("answer_nll", "answer NLL"),
    ("answer_delta_nll", "answer ΔNLL"),
    ("answer_top1", "answer top-1 (%)"),
    ("answers_exact", "answers exact (%)"),
]


def make_report(directory: str | pathlib.Path, out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write ``report.md``, the summary CSVs and the PNG plots for a results directory.

    Returns
    -------
    pathlib.Path
        The markdown report's path.

    Raises
    ------
    FileNotFoundError
        If the directory holds no results of any harness.
    """
    directory = pathlib.Path(directory)
    out = pathlib.Path(out_dir) if out_dir is not None else directory
    out.mkdir(parents=True, exist_ok=True)
    lgb = load_results(directory, "longgenbench")
    fid = load_results(directory, "fidelity")
    gold = load_results(directory, "gold")
    testbed = load_testbed_records(directory)
    if not lgb and not fid and not gold and not testbed:
        raise FileNotFoundError(
            f"{directory} holds no results: run `scope-kv eval longgenbench --out {directory} ...`, "
            f"`scope-kv eval fidelity --out {directory} ...`, `scope-kv eval gold --out {directory}` or "
            f"`scope-kv eval testbed --out {directory}` first."
        )
    parts = [f"# scope_kv evaluation report\n\nResults from `{directory}`.\n"]
    # one colour per method (its family's) across every plot of the report
    colours = method_colours(list(dict.fromkeys(r["method"] for r in [*gold, *fid, *lgb])))
    if gold:
        parts.append(_gold_section(gold, out, colours))
    if testbed:
        section = write_testbed_report(testbed, out).read_text(encoding="utf-8")
        parts.append(section.replace("# Testbed", "## Testbed", 1).replace("\n## ", "\n### "))
    if fid:
        parts.append(_fidelity_section(fid, out, colours))
    if lgb:
        parts.append(_longgenbench_section(lgb, out, colours))
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    logger.info("wrote %s", path)
    return path


def _fidelity_section(fid: list[dict[str, Any]], out: pathlib.Path, colours: dict[str, Any]) -> str:
    """The report's fidelity section; writes its CSV and plots."""
    summary = summarize_fidelity(fid)
    write_csv(summary, out / "fidelity_summary.csv")
    section = (
        "## Fidelity (teacher-forced against the full cache)\n\n"
        + markdown_table(summary, FIDELITY_COLUMNS)
        + "\n\nKL is KL(full ‖ method) of the next-token distributions, averaged over decode steps; "
        "top-1 agreement is how often the method's most likely next token is the full cache's.\n\n"
        "![agreement vs memory](agreement_vs_memory.png)\n![KV over steps](kv_over_steps.png)\n"
        "![fidelity over steps](fidelity_over_steps.png)\n"
    )
    memory_scatter(
        summary,
        "top1_agreement",
        "top-1 agreement with the full cache (%)",
        "Fidelity vs KV memory",
        out / "agreement_vs_memory.png",
        colours,
    )
    fidelity_figure(fid, out / "fidelity_over_steps.png", colours)
    kv_figure(fid, "entries", "KV cache over decoding (fidelity replay)", out / "kv_over_steps.png", colours)
    return section


def _longgenbench_section(lgb: list[dict[str, Any]], out: pathlib.Path, colours: dict[str, Any]) -> str:
    """The report's LongGenBench section; writes its CSV and plots."""
    summary = summarize_longgenbench(lgb)
    write_csv(summary, out / "longgenbench_summary.csv")
    section = (
        "## LongGenBench\n\n"
        + markdown_table(summary, LGB_COLUMNS)
        + "\n\nAccuracy pairs each `Answer_N` with question N; the position-paired score pairs the i-th "
        "answer with the i-th question, as the research code does (comparable with published numbers).\n\n"
        "![accuracy vs memory](accuracy_vs_memory.png)\n![KV over steps](longgenbench_kv_over_steps.png)\n"
    )
    memory_scatter(
        summary,
        "accuracy",
        "accuracy (%)",
        "LongGenBench accuracy vs KV memory",
        out / "accuracy_vs_memory.png",
        colours,
    )
    kv_figure(
        lgb,
        "kv_entries_trace",
        "KV cache over decoding (LongGenBench)",
        out / "longgenbench_kv_over_steps.png",
        colours,
    )
    return section


# -- gold-output teacher forcing ------------------------------------------------------------------
def _gold_order(summary: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    known = list(dict.fromkeys(method_family(s) for s in gold_grid((128,))))

    def key(row: dict[str, Any]) -> tuple:
        if row["method"] == REFERENCE:
            return (0, 0, 0, "")
        family = row.get("family") or row["method"]
        rank = known.index(family) if family in known else len(known)
        return (1, row.get("budget") or 0, rank, row["method"])

    return sorted(summary, key=key)


def _gold_section(rows: Sequence[dict[str, Any]], out: pathlib.Path, colours: dict[str, Any]) -> str:
    """The report's gold-output section; writes its CSV and one plot per decoding budget."""
    summary = _gold_order(summarize_gold(rows))
    write_csv(summary, out / "gold_summary.csv")
    tasks = sorted({r["task"] for r in rows})
    for row in summary:
        if row["method"] == REFERENCE:
            row["method"] = "reference (full cache)"
    by_budget: dict[int, list[str]] = {}
    for row in rows:
        if row["method"] != REFERENCE and row.get("budget") is not None:
            by_budget.setdefault(row["budget"], [])
            if row["method"] not in by_budget[row["budget"]]:
                by_budget[row["budget"]].append(row["method"])
    reference = [r for r in rows if r["method"] == REFERENCE]
    images = []
    for budget, methods in sorted(by_budget.items()):
        name = f"gold_B{budget}.png"
        gold_plot(rows, reference, budget, methods, tasks, out / name, colours)
        images.append(f"![budget {budget}]({name})")
    widened = [
        r["budget_prompt_tokens"] - r["prompt_tokens"]
        for r in rows
        if r.get("budget_prompt_tokens", r["prompt_tokens"]) > r["prompt_tokens"]
    ]
    note = ""
    beyond = [r for r in reference if r.get("tokens_beyond_positions")]
    if beyond:
        share = sum(r["tokens_beyond_positions"] for r in beyond) / sum(r["gold_tokens"] for r in reference)
        note += (
            f"\n\n**Beyond the model's trained positions:** in {len(beyond)} of {len(reference)} examples prompt + "
            f"reference outrun the model's context; {100 * share:.0f}% of the reference tokens lie past it, for every "
            "method, the full cache included."
        )
    if widened:
        note += (
            f"\n\n**Not at equal memory per example:** {len(widened)} records of prompt-relative budgets were set "
            f"from the batch's longest prompt (`--prompt-budget longest`), {sum(widened) / len(widened):.0f} tokens "
            f"longer than their own on average (at most {max(widened)}): those baselines hold that many more entries "
            "than SCOPE's rows (see the KV column)."
        )
    return (
        "## Gold outputs (teacher-forced reference answers against the full cache)\n\n"
        + markdown_table(summary, GOLD_COLUMNS)
        + note
        + "\n\nΔNLL: mean NLL of the reference tokens under the method minus under the full cache (nats per "
        "token), overall and per quarter of each output; KL is KL(full ‖ method); top-1: the method's most likely "
        "token is the full cache's. The answer columns count only the tokens of each final answer N after "
        "'The answer is'; answers exact: answers whose every token is the method's most likely one. KV entries are "
        "per layer and KV head, as each method's definition bounds them (mean over examples).\n\n"
        + "\n".join(images)
        + "\n"
    )
