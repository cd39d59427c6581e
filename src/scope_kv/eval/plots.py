"""Every figure of the evaluation reports (:mod:`.report`, :mod:`.testbed`), with their shared styling.

One figure size, and one colour / line style per method across every plot of a report: a method's
colour is its family's, its line style and marker its rank within the family, and the full cache is
black, on top. Figures use matplotlib's object API (no pyplot state), and matplotlib is imported
only when a figure is drawn.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .gold import REFERENCE, method_family
from .methods import gold_grid

__all__ = [
    "FULL_NAMES",
    "binned_curve",
    "fidelity_figure",
    "figure",
    "gold_plot",
    "is_full",
    "kv_figure",
    "line_style",
    "mean_curves",
    "memory_scatter",
    "method_colours",
    "smooth",
    "step_lines",
    "testbed_accuracy_figure",
    "testbed_position_figure",
]

# Names the full cache goes by in result files: drawn in black, on top.
FULL_NAMES = ("full", REFERENCE, "reference (full cache)", "DynamicCache")
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = "osD^v<>pPX*h"


# -- styling ----------------------------------------------------------------------------------------
def figure(ncols: int = 1):
    """A new figure of ``ncols`` side-by-side axes (the reports' one size), and its axes."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "scope-kv report draws its plots with matplotlib: pip install matplotlib (or pip install 'scope-kv[eval]')."
        ) from None

    fig = Figure(figsize=(6.4 * ncols, 4.2), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def is_full(method: str) -> bool:
    """Whether ``method`` names the full cache (drawn in black, on top)."""
    return method in FULL_NAMES


def line_style(method: str, methods: Sequence[str], colours: dict[str, Any]) -> dict[str, Any]:
    """Colour (the family's), line style and marker (the method's rank in its family) of a method;
    the full cache in black, thicker, on top."""
    if is_full(method):
        # the reference solid and topmost; a `full` ScopeCache beside it dashed (they coincide)
        reference = method != "full"
        return {
            "color": "black",
            "linewidth": 2.0,
            "zorder": 11 if reference else 10,
            "linestyle": "-" if reference else "--",
            "marker": "*" if reference else "P",
        }
    family = method_family(method)
    rank = [m for m in dict.fromkeys(methods) if not is_full(m) and method_family(m) == family].index(method)
    return {
        "color": colours[method],
        "linewidth": 1.3,
        "zorder": 2,
        "linestyle": _LINE_STYLES[rank % len(_LINE_STYLES)],
        "marker": _MARKERS[rank % len(_MARKERS)],
    }


def method_colours(methods: Sequence[str]) -> dict[str, Any]:
    """One colour per method, the same in every plot.

    A method gets its family's colour (``slide:128/64`` and ``slide:64/32`` share ``slide:B/r``'s;
    plots tell budgets apart by line style or marker). The default gold grid's families have
    fixed colours, the same in every report; other families take the next colours in sorted
    order, the same in every plot of one report (:func:`~.report.make_report` passes it every
    method of the directory). The full cache (``full``, ``reference``) is black.

    Parameters
    ----------
    methods : sequence of str
        Method specs (as in result files).

    Returns
    -------
    dict
        ``{method: matplotlib colour}``.
    """
    from matplotlib import colormaps

    palette = [colormaps["tab10"](i) for i in range(10)] + [colormaps["Dark2"](i) for i in range(8)]
    known = list(dict.fromkeys(method_family(s) for s in gold_grid((128,))))
    others = sorted({method_family(m) for m in methods if not is_full(m)} - set(known))
    order = known + others
    return {
        m: (0.0, 0.0, 0.0, 1.0) if is_full(m) else palette[order.index(method_family(m)) % len(palette)]
        for m in methods
    }


# -- fidelity and LongGenBench ----------------------------------------------------------------------
def memory_scatter(
    summary: Sequence[dict[str, Any]], y: str, ylabel: str, title: str, path: pathlib.Path, colours: dict[str, Any]
) -> None:
    """Score ``row[y]`` against peak KV memory, one point per method, saved to ``path``."""
    fig, (ax,) = figure()
    methods = [row["method"] for row in summary]
    for row in summary:
        # A legend, not annotations: methods at equal memory sit on top of each other.
        style = line_style(row["method"], methods, colours)
        ax.scatter(
            row["kv_mib_peak"],
            row[y],
            s=70 if is_full(row["method"]) else 45,
            marker=style["marker"],
            color=style["color"],
            zorder=style["zorder"],
            label=row["method"],
            alpha=0.85,
        )
    ax.legend(fontsize=7, loc="best")
    ax.set_xlabel("KV cache held at peak (MiB, per sequence)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120)


def mean_curves(
    rows: Sequence[dict[str, Any]], field: str, scale: Callable[[dict[str, Any], Any], float] | None = None
) -> dict[str, list[float]]:
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


def smooth(values: list[float], window: int) -> list[float]:
    """The running mean of ``values`` over the last ``window`` steps (``values`` if ``window <= 1``)."""
    if window <= 1:
        return values
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def step_lines(curves: dict[str, list[float]], ax: Any, ylabel: str, colours: dict[str, Any], window: int = 1) -> None:
    """One line per method of ``curves`` over decode steps on ``ax``, smoothed over ``window`` steps."""
    methods = list(curves)
    # the full cache last, so that it is drawn (and listed) on top
    for method, ys in sorted(curves.items(), key=lambda item: is_full(item[0])):
        style = line_style(method, methods, colours)
        style.pop("marker")
        ax.plot(range(len(ys)), smooth(ys, window), label=method, **style)
    ax.set_xlabel("decode step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)


def _bytes_per_entry(row: dict[str, Any]) -> float:
    """Bytes of one entry in one layer: the record's, or its peak bytes / entries (older records)."""
    if row.get("bytes_per_entry"):
        return float(row["bytes_per_entry"])
    return row["kv_bytes_peak"] / max(row["kv_entries_peak"], 1)


def kv_figure(
    rows: Sequence[dict[str, Any]], field: str, title: str, path: pathlib.Path, colours: dict[str, Any]
) -> None:
    """KV entries held per layer and KV MiB held over decoding steps, side by side."""
    fig, axes = figure(2)
    step_lines(
        mean_curves(rows, field, lambda r, v: v / r["num_layers"]), axes[0], "KV entries held per layer", colours
    )
    step_lines(
        mean_curves(rows, field, lambda r, v: v * _bytes_per_entry(r) / 2**20),
        axes[1],
        "KV cache held (MiB, all layers, per sequence)",
        colours,
    )
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)


def fidelity_figure(fid: Sequence[dict[str, Any]], path: pathlib.Path, colours: dict[str, Any]) -> None:
    """KL(full ‖ method) and top-1 agreement over decoding steps, side by side, saved to ``path``."""
    fig, axes = figure(2)
    window = max(1, min(len(r["kl"]) for r in fid if r["method"] != "reference") // 16)
    smoothed = f" (mean of {window} steps)" if window > 1 else ""
    kl_curves = mean_curves(fid, "kl")
    step_lines(kl_curves, axes[0], f"KL(full ‖ method), nats{smoothed}", colours, window)
    step_lines(
        mean_curves(fid, "top1", lambda r, v: 100.0 * v), axes[1], f"top-1 agreement, %{smoothed}", colours, window
    )
    if max((max(c) for c in kl_curves.values() if c), default=0.0) > 1e-2:
        axes[0].set_yscale("symlog", linthresh=1e-3)  # KL spans orders of magnitude across methods
    axes[1].legend(fontsize=7)
    fig.savefig(path, dpi=120)


# -- gold-output teacher forcing --------------------------------------------------------------------
def binned_curve(rows: Sequence[dict[str, Any]], field: str, count: str) -> tuple[list[float], list[float]]:
    """Bin centres and the mean of ``field`` per output-position bin, pooled over examples."""
    totals: dict[int, float] = {}
    counts: dict[int, float] = {}
    width = rows[0]["bins"]["width"]
    for row in rows:
        for i, (v, c) in enumerate(zip(row["bins"][field], row["bins"][count], strict=True)):
            totals[i] = totals.get(i, 0.0) + v
            counts[i] = counts.get(i, 0.0) + c
    xs, ys = [], []
    for i in sorted(totals):
        if counts[i] > 0:
            xs.append((i + 0.5) * width)
            ys.append(totals[i] / counts[i])
    return xs, ys


def gold_plot(
    rows: Sequence[dict[str, Any]],
    reference: Sequence[dict[str, Any]],
    budget: int,
    methods: Sequence[str],
    tasks: Sequence[str],
    path: pathlib.Path,
    colours: dict[str, Any],
) -> None:
    """The gold section's plot for one decoding budget (ΔNLL and answer NLL over output positions)."""
    fig, axes = figure(2)
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        colour = colours[method]
        for ax, field, count in ((axes[0], "delta_nll", "count"), (axes[1], "answer_nll", "answer_count")):
            xs, ys = binned_curve(mine, field, count)
            ax.plot(
                xs,
                ys,
                label=method,
                color=colour,
                linewidth=1.3,
                marker="o" if len(xs) <= 8 else None,
                markersize=3,
            )
    axes[0].axhline(0.0, color="black", linewidth=1.6, zorder=10, label="full cache")
    if reference:
        xs, ys = binned_curve(reference, "answer_ref_nll", "answer_count")
        axes[1].plot(
            xs,
            ys,
            color="black",
            linewidth=1.8,
            zorder=10,
            label="full cache",
            marker="o" if len(xs) <= 8 else None,
            markersize=3,
        )
    width = rows[0]["bins"]["width"]
    axes[0].set_ylabel(f"ΔNLL vs full cache (nats / token, bins of {width})")
    axes[1].set_ylabel(f"answer-token NLL (nats, bins of {width})")
    for ax in axes:
        ax.set_xlabel("output position (tokens)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Gold-output teacher forcing, decoding budget B = {budget} ({', '.join(tasks)})")
    fig.savefig(path, dpi=120)


# -- testbed ----------------------------------------------------------------------------------------
def testbed_accuracy_figure(
    part: Sequence[dict[str, Any]], scale: float, methods: Sequence[str], colours: dict[str, Any], path: pathlib.Path
) -> None:
    """Item accuracy against KV entries at one scale: one line per family through its budgets.

    ``part`` holds the summary rows of that scale; ``methods`` every method of the report (their
    order sets line styles).
    """
    fig, (ax,) = figure()
    for family in dict.fromkeys(r["family"] for r in part):
        pts = sorted((r["kv_entries"], r["accuracy"], r["method"]) for r in part if r["family"] == family)
        style = line_style(pts[0][2], methods, colours)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, label=family, **style)
    _accuracy_axes(
        ax,
        "KV entries held per layer and KV head",
        "item accuracy (exact match)",
        f"testbed, {scale:g}x trained length",
        dict(fontsize=7),
    )
    fig.savefig(path, dpi=120)


def _accuracy_axes(ax: Any, xlabel: str, ylabel: str, title: str, legend: dict[str, Any]) -> None:
    """Labels, the [0, 1] accuracy range, grid and legend of a testbed accuracy plot."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(**legend)


def testbed_position_figure(
    rows: Sequence[dict[str, Any]],
    shown: Sequence[str],
    scale: float,
    methods: Sequence[str],
    colours: dict[str, Any],
    position_bins: int,
    path: pathlib.Path,
) -> None:
    """Item accuracy by output position at one scale, one line per method of ``shown``.

    ``rows`` are the testbed records; ``methods`` every method of the report (their order sets
    line styles); the items are pooled into at most ``position_bins`` bins.
    """
    fig, (ax,) = figure()
    for method in shown:
        rs = [r for r in rows if r["scale"] == scale and r["method"] == method]
        correct = np.array([r["correct"] for r in rs], dtype=float)
        bins = np.array_split(np.arange(correct.shape[1]), min(position_bins, correct.shape[1]))
        xs = [(b[0] + b[-1]) / 2 + 1 for b in bins if len(b)]
        ys = [correct[:, b].mean() for b in bins if len(b)]
        style = line_style(method, methods, colours)
        ax.plot(xs, ys, label=method, **style)
    _accuracy_axes(
        ax,
        "item (output position)",
        "item accuracy",
        f"testbed, {scale:g}x trained length: accuracy along the output",
        dict(fontsize=6, ncol=2),
    )
    fig.savefig(path, dpi=120)
