"""The report's plots: one colour per method in every plot, the full cache on top, KV in bytes too."""

from __future__ import annotations

import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from scope_kv.eval import FidelitySettings, LongGenBenchSettings, load_examples, make_report, parse_methods
from scope_kv.eval import report as report_module
from scope_kv.eval.fidelity import run_fidelity
from scope_kv.eval.runner import run_longgenbench
from test_eval_harness import PROMPT, TinyTokenizer, make_model

SPECS = ("full", "slide:8/4", "slide:12/6", "adaptive:10/4", "unified-h2o:prompt+8/4")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """One directory holding a fidelity run and a LongGenBench run of the same methods."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    out = tmp_path_factory.mktemp("report")
    examples = load_examples("gsm8k", limit=1)
    methods, errors = parse_methods(list(SPECS), max_new_tokens=16)
    assert not errors
    run_fidelity(model, TinyTokenizer(), examples, methods, out, FidelitySettings(steps=16))
    run_longgenbench(model, TinyTokenizer(), examples, methods, out, LongGenBenchSettings(max_new_tokens=16))
    torch.set_num_threads(before)
    return out


@pytest.fixture(scope="module")
def figures(results):
    """Every figure make_report saves, by file name."""
    saved: dict[str, Figure] = {}
    original = Figure.savefig
    patch = pytest.MonkeyPatch()

    def capture(self, path, *args, **kwargs):
        saved[str(path).rsplit("/", 1)[-1]] = self
        return original(self, path, *args, **kwargs)

    patch.setattr(Figure, "savefig", capture)
    try:
        make_report(results)
    finally:
        patch.undo()
    return saved


def _artists(figure: Figure):
    """(axes, label, colour, zorder, artist) of every labelled line and point set."""
    for ax in figure.axes:
        for line in ax.get_lines():
            if not line.get_label().startswith("_"):
                yield ax, line.get_label(), to_rgba(line.get_color())[:3], line.get_zorder(), line
        for points in ax.collections:
            if not points.get_label().startswith("_"):
                yield ax, points.get_label(), tuple(points.get_facecolor()[0][:3]), points.get_zorder(), points


def test_every_plot_is_drawn(figures):
    assert {"agreement_vs_memory.png", "kv_over_steps.png", "fidelity_over_steps.png"} <= set(figures)
    assert {"accuracy_vs_memory.png", "longgenbench_kv_over_steps.png"} <= set(figures)


def test_one_colour_per_method_across_every_plot(figures):
    colours: dict[str, set] = {}
    for figure in figures.values():
        for _, label, colour, _, _ in _artists(figure):
            colours.setdefault(label, set()).add(colour)
    assert set(SPECS) <= set(colours)
    for label, seen in colours.items():
        assert len(seen) == 1, f"{label} is drawn in {len(seen)} colours"
    assert colours["full"] == colours["reference"] == {to_rgba("black")[:3]}
    # a family shares a colour; the plots tell its budgets apart by line style or marker
    assert colours["slide:8/4"] == colours["slide:12/6"]
    assert colours["slide:8/4"] != colours["adaptive:10/4"] != colours["unified-h2o:prompt+8/4"]
    for figure in figures.values():
        for ax in figure.axes:
            lines = {line.get_label(): line for line in ax.get_lines()}
            if "slide:8/4" in lines and "slide:12/6" in lines:
                assert lines["slide:8/4"].get_linestyle() != lines["slide:12/6"].get_linestyle()


def test_the_full_cache_is_drawn_on_top(figures):
    """The full cache (the reference, and a `full` ScopeCache) lies above every compressed method."""
    checked = 0
    for figure in figures.values():
        for ax in figure.axes:
            drawn = [(label, z) for a, label, _, z, _ in _artists(figure) if a is ax]
            full = [z for label, z in drawn if label in ("full", "reference")]
            if full:
                assert min(full) > max(z for label, z in drawn if label not in ("full", "reference"))
                checked += 1
    assert checked >= 5


def test_kv_is_plotted_in_entries_and_bytes(results, figures):
    rows = report_module.load_results(results, "fidelity")
    full = next(r for r in rows if r["method"] == "full")
    for name in ("kv_over_steps.png", "longgenbench_kv_over_steps.png"):
        entries_ax, bytes_ax = figures[name].axes
        assert "entries" in entries_ax.get_ylabel() and "MiB" in bytes_ax.get_ylabel()
    entries_ax, bytes_ax = figures["kv_over_steps.png"].axes
    line = next(line for line in bytes_ax.get_lines() if line.get_label() == "full")
    expected = [e * full["bytes_per_entry"] / 2**20 for e in full["entries"]]
    assert list(line.get_ydata()) == pytest.approx(expected)
    per_layer = next(line for line in entries_ax.get_lines() if line.get_label() == "full")
    assert per_layer.get_ydata()[0] == PROMPT + 1  # the prefill and the first replayed token


def test_method_colours_are_stable():
    first = report_module.method_colours(["slide:8/4", "unified-h2o:prompt+8/4"])
    second = report_module.method_colours(["unified-h2o:prompt+64/32", "snapkv:prompt/4+slide:8/4", "slide:128/64"])
    assert first["slide:8/4"] == second["slide:128/64"]  # the default grid's families keep their colours
    assert first["unified-h2o:prompt+8/4"] == second["unified-h2o:prompt+64/32"]
    many = report_module.method_colours([f"x{i}:8/4" for i in range(8)] + ["reference", "full"])
    assert len({many[f"x{i}:8/4"] for i in range(8)}) == 8
    assert many["reference"] == many["full"] == to_rgba("black")
