"""``scope-kv report DIR``: markdown tables and PNG plots from a results directory.

Reads ``longgenbench.jsonl`` and/or ``fidelity.jsonl`` (merging any part files left by an
unfinished sharded run) and writes, next to them:

* ``report.md`` -- one table per harness (the summaries also go to the ``*_summary.csv`` files);
* ``accuracy_vs_memory.png`` / ``agreement_vs_memory.png`` -- score against peak KV memory, one
  point per method;
* ``kv_over_steps.png`` -- KV entries held per layer over decoding steps, per method;
* ``fidelity_over_steps.png`` -- KL(full || method) and top-1 agreement over decoding steps.

Plots use matplotlib's object API (no pyplot state), so this is safe to call from a library.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any, Sequence

from .fidelity import summarize_fidelity
from .runner import summarize_longgenbench, write_csv

logger = logging.getLogger(__name__)

__all__ = ["load_results", "markdown_table", "make_report"]


def load_results(directory: str | pathlib.Path, name: str) -> list[dict[str, Any]]:
    """All records of harness ``name`` in ``directory`` (merged file and part files, deduplicated)."""
    directory = pathlib.Path(directory)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for path in [directory / f"{name}.jsonl", *sorted(directory.glob(f"{name}.part-*-of-*.jsonl"))]:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                rows.setdefault((row["example"], row["method"]), row)
    return sorted(rows.values(), key=lambda r: r["index"])


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A markdown table of ``rows`` with ``(key, header)`` columns; ``None`` shows as a dash."""

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) < 1 else f"{value:,.2f}".rstrip("0").rstrip(".")
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(cell(row.get(k)) for k, _ in columns) + " |")
    return "\n".join(lines)


_FIDELITY_COLUMNS = [
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
_LGB_COLUMNS = [
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


def _figure(ncols: int = 1):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "scope-kv report draws its plots with matplotlib: pip install matplotlib (or pip install 'scope-kv[eval]')."
        ) from None

    fig = Figure(figsize=(6.4 * ncols, 4.2), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _scatter(summary: Sequence[dict[str, Any]], y: str, ylabel: str, title: str, path: pathlib.Path) -> None:
    fig, (ax,) = _figure()
    markers = "osD^v<>pPX*h"
    for i, row in enumerate(summary):
        # A legend, not annotations: methods at equal memory sit on top of each other.
        ax.scatter(row["kv_mib_peak"], row[y], s=45, marker=markers[i % len(markers)], label=row["method"], alpha=0.85)
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("KV cache held at peak (MiB, per sequence)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def _mean_curves(rows: Sequence[dict[str, Any]], field: str, scale: Any = None) -> dict[str, list[float]]:
    """Per method, the step-wise mean of ``row[field]`` over examples (up to the shortest run)."""
    by_method: dict[str, list[list[float]]] = {}
    for row in rows:
        values = row.get(field)
        if values:
            if scale is not None:
                values = [scale(row, v) for v in values]
            by_method.setdefault(row["method"], []).append(values)
    curves = {}
    for method, runs in by_method.items():
        n = min(len(r) for r in runs)
        curves[method] = [sum(r[i] for r in runs) / len(runs) for i in range(n)]
    return curves


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _lines(curves: dict[str, list[float]], ax: Any, ylabel: str, window: int = 1) -> None:
    for method, ys in curves.items():
        ax.plot(range(len(ys)), _smooth(ys, window), label=method, linewidth=1.3)
    ax.set_xlabel("decode step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def make_report(directory: str | pathlib.Path, out_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write ``report.md``, the summary CSVs and the PNG plots for a results directory.

    Returns
    -------
    pathlib.Path
        The markdown report's path.

    Raises
    ------
    FileNotFoundError
        If the directory holds neither ``longgenbench.jsonl`` nor ``fidelity.jsonl`` results.
    """
    directory = pathlib.Path(directory)
    out = pathlib.Path(out_dir) if out_dir is not None else directory
    out.mkdir(parents=True, exist_ok=True)
    lgb = load_results(directory, "longgenbench")
    fid = load_results(directory, "fidelity")
    if not lgb and not fid:
        raise FileNotFoundError(
            f"{directory} holds no results: run `scope-kv eval longgenbench --out {directory} ...` or "
            f"`scope-kv eval fidelity --out {directory} ...` first."
        )
    parts = [f"# scope_kv evaluation report\n\nResults from `{directory}`.\n"]
    if fid:
        summary = summarize_fidelity(fid)
        write_csv(summary, out / "fidelity_summary.csv")
        parts.append(
            "## Fidelity (teacher-forced against the full cache)\n\n"
            + markdown_table(summary, _FIDELITY_COLUMNS)
            + "\n\nKL is KL(full ‖ method) of the next-token distributions, averaged over decode steps; "
            "top-1 agreement is how often the method's most likely next token is the full cache's.\n\n"
            "![agreement vs memory](agreement_vs_memory.png)\n![KV over steps](kv_over_steps.png)\n"
            "![fidelity over steps](fidelity_over_steps.png)\n"
        )
        _scatter(summary, "top1_agreement", "top-1 agreement with the full cache (%)", "Fidelity vs KV memory", out / "agreement_vs_memory.png")
        fig, axes = _figure(2)
        window = max(1, min(len(r["kl"]) for r in fid if r["method"] != "reference") // 16)
        smoothed = f" (mean of {window} steps)" if window > 1 else ""
        kl_curves = _mean_curves(fid, "kl")
        _lines(kl_curves, axes[0], f"KL(full ‖ method), nats{smoothed}", window)
        _lines(_mean_curves(fid, "top1", lambda r, v: 100.0 * v), axes[1], f"top-1 agreement, %{smoothed}", window)
        if max((max(c) for c in kl_curves.values() if c), default=0.0) > 1e-2:
            axes[0].set_yscale("symlog", linthresh=1e-3)  # KL spans orders of magnitude across methods
        axes[1].legend(fontsize=7)
        fig.savefig(out / "fidelity_over_steps.png", dpi=120)
        fig, (ax,) = _figure()
        _lines(_mean_curves(fid, "entries", lambda r, v: v / r["num_layers"]), ax, "KV entries held per layer")
        ax.legend(fontsize=7)
        ax.set_title("KV cache over decoding (fidelity replay)")
        fig.savefig(out / "kv_over_steps.png", dpi=120)
    if lgb:
        summary = summarize_longgenbench(lgb)
        write_csv(summary, out / "longgenbench_summary.csv")
        parts.append(
            "## LongGenBench\n\n"
            + markdown_table(summary, _LGB_COLUMNS)
            + "\n\nAccuracy pairs each `Answer_N` with question N; the position-paired score pairs the i-th "
            "answer with the i-th question, as the research code does (comparable with published numbers).\n\n"
            "![accuracy vs memory](accuracy_vs_memory.png)\n![KV over steps](longgenbench_kv_over_steps.png)\n"
        )
        _scatter(summary, "accuracy", "accuracy (%)", "LongGenBench accuracy vs KV memory", out / "accuracy_vs_memory.png")
        fig, (ax,) = _figure()
        _lines(_mean_curves(lgb, "kv_entries_trace", lambda r, v: v / r["num_layers"]), ax, "KV entries held per layer")
        ax.legend(fontsize=7)
        ax.set_title("KV cache over decoding (LongGenBench)")
        fig.savefig(out / "longgenbench_kv_over_steps.png", dpi=120)
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    logger.info("wrote %s", path)
    return path
