"""Tables and plot styling shared by the evaluation reports (:mod:`.report`, :mod:`.testbed`).

One markdown table format, one figure size, and one colour / line style per method across every
plot of a report: a method's colour is its family's, its line style and marker its rank within the
family, and the full cache is black.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .gold import REFERENCE, method_family
from .methods import gold_grid

__all__ = ["FULL_NAMES", "figure", "is_full", "line_style", "markdown_table", "method_colours"]

# Names the full cache goes by in result files: drawn in black, on top.
FULL_NAMES = ("full", REFERENCE, "reference (full cache)", "DynamicCache")
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = "osD^v<>pPX*h"


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


def figure(ncols: int = 1):
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
    order, the same in every plot of one report (:func:`make_report` passes it every method of
    the directory). The full cache (``full``, ``reference``) is black.

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
