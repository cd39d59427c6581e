"""`scope-kv demo` on a tiny random Llama: live progress, KV sampled per token, the computed memory
table, the --long report and plot, option checks (SmolLM2 itself: tests/test_smollm2.py)."""

from __future__ import annotations

import io
import re

import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from transformers import DynamicCache

from conftest import make_model
from scope_kv import ScopeCache, Slide
from scope_kv import demo as scope_demo
from scope_kv.accounting import bytes_per_entry, kv_footprint
from scope_kv.cli import main
from scope_kv.measure import KVSample, LiveProgress, LongGenPrompt, memory_projection, plot_kv_over_tokens, timed_generate

PROMPT = 30


@pytest.fixture(scope="module")
def model():
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    return model


@pytest.fixture(scope="module")
def prompt():
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    return LongGenPrompt(ids, torch.ones_like(ids), 1, 2, "a prompt")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_samples_the_kv_footprint_after_every_token(model, prompt):
    cache = ScopeCache(model, decoding=Slide(8, 4))
    log = io.StringIO()
    progress = LiveProgress("slide", 20, cache, stream=log)
    run = timed_generate(model, prompt.inputs(), cache, 20, 20, progress=progress)
    assert run.n_new == 20 and [s.new_tokens for s in progress.samples] == list(range(1, 21))
    per_entry = bytes_per_entry(model) * model.config.num_hidden_layers
    # after token k the cache holds the prompt and min(k - 1, B) generated entries
    assert [s.held_bytes for s in progress.samples] == [per_entry * (PROMPT + min(k - 1, 8)) for k in range(1, 21)]
    assert progress.samples[-1].allocated_bytes == kv_footprint(cache).allocated_bytes
    assert {s.allocated_bytes for s in progress.samples} == {per_entry * (PROMPT + Slide(8, 4).max_held)}
    # not a terminal: the prefill, the first token, then one line per quarter
    lines = log.getvalue().splitlines()
    assert lines[0] == "slide: prefill..." and len(lines) == 6
    assert [re.match(r"slide: (\d+)/20 tokens", line).group(1) for line in lines[1:]] == ["1", "5", "10", "15", "20"]
    assert "tok/s" in lines[-1] and "KV " in lines[-1] and "left" in lines[-2]


def test_progress_on_a_terminal_rewrites_one_line(model, prompt):
    screen = _Terminal()
    timed_generate(
        model, prompt.inputs(), DynamicCache(config=model.config), 6, 6, progress=LiveProgress("d", 6, stream=screen)
    )
    text = screen.getvalue()
    assert text.startswith("\rd: prefill...") and text.endswith("\n") and text.count("\n") == 1
    assert "d: 6/6 tokens" in text.rsplit("\r", 1)[-1]
    quiet = io.StringIO()
    progress = LiveProgress("q", 6, DynamicCache(config=model.config), stream=quiet, enabled=False)
    timed_generate(model, prompt.inputs(), progress.cache, 6, 6, progress=progress)
    assert quiet.getvalue() == "" and len(progress.samples) == 6


def test_the_computed_memory_is_what_the_caches_allocate(model, prompt):
    strategy = Slide(8, 4)
    caches = {"full": DynamicCache(config=model.config), "slide": ScopeCache(model, decoding=strategy)}
    for cache in caches.values():
        timed_generate(model, prompt.inputs(), cache, 20, 20)
    row, longer, longest = memory_projection(model, PROMPT, strategy, [20, 200, 2000])
    assert row.full_bytes == kv_footprint(caches["full"]).allocated_bytes
    assert row.slide_bytes == kv_footprint(caches["slide"]).allocated_bytes
    per_entry = bytes_per_entry(model) * model.config.num_hidden_layers
    assert longer.full_bytes - row.full_bytes == 180 * per_entry  # one entry per token in every layer
    assert row.slide_bytes == longer.slide_bytes == longest.slide_bytes  # flat
    assert row.saving < longer.saving < longest.saving
    assert memory_projection(model, PROMPT, strategy, [20], batch=4)[0].full_bytes == 4 * row.full_bytes


def _run_demo(monkeypatch, model, prompt, argv):
    monkeypatch.setattr(scope_demo, "find_smollm2", lambda: None)
    monkeypatch.setattr(scope_demo, "load_smollm2", lambda: (model, _Decoder()))
    monkeypatch.setattr(scope_demo, "gsm8k_prompt", lambda tokenizer, max_tokens, row=0: prompt)
    threads = torch.get_num_threads()
    status = main(["demo", "--smollm2", *argv])
    assert torch.get_num_threads() == threads, "the demo must give back torch's thread count"
    return status


class _Decoder:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_quick_demo_says_what_the_numbers_mean(monkeypatch, capsys, model, prompt):
    status = _run_demo(monkeypatch, model, prompt, ["--max-new-tokens", "20", "--budget", "8", "--recent", "4"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert "DynamicCache: 20/20 tokens" in captured.err and "CPU thread" in captured.out
    measured = {}
    for label in ("DynamicCache", "ScopeCache slide:8/4"):
        match = re.search(rf"^{re.escape(label)}\s+(\d+)\s+\S+\s+\S+\s+(\d+)\s+([\d.]+) MiB$", captured.out, re.M)
        assert match, captured.out
        measured[label] = match.group(3)
    assert "What the numbers mean" in captured.out
    this_run = re.search(r"^\s+20\s+([\d.]+) MiB\s+([\d.]+) MiB\s+(-?[\d.]+)%\s+\(this run\)$", captured.out, re.M)
    assert this_run, captured.out
    assert this_run.group(1) == measured["DynamicCache"] and this_run.group(2) == measured["ScopeCache slide:8/4"]
    assert "computed" in captured.out and "(SmolLM2's 8,192 positions)" in captured.out


def test_long_demo_measures_flat_against_growing(monkeypatch, capsys, model, prompt, tmp_path):
    png = tmp_path / "kv.png"
    figures = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figures.append(self) or original(self, *a, **k))
    argv = ["--long", "--max-new-tokens", "40", "--budget", "8", "--recent", "4", "--threads", "1", "--plot", str(png)]
    assert _run_demo(monkeypatch, model, prompt, argv) == 0
    out = capsys.readouterr().out
    assert "exactly 40 new tokens" in out and "1 CPU thread" in out
    table = re.findall(r"^\s+([\d,]+)\s+([\d.]+) MiB\s+([\d.]+) MiB$", out, re.M)
    assert [int(n) for n, _, _ in table] == [1, 5, 10, 15, 20, 25, 30, 35, 40]
    full = [float(f) for _, f, _ in table]
    slide = {s for _, _, s in table}
    assert full == sorted(full) and full[-1] > full[0] and len(slide) == 1
    assert "from token 9 on it holds prompt + 8 entries" in " ".join(out.split())
    assert png.read_bytes()[:4] == b"\x89PNG"
    (ax,) = figures[-1].axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert to_rgba(lines["full cache (DynamicCache)"].get_color()) == to_rgba("black")
    assert lines["full cache (DynamicCache)"].get_zorder() > lines["ScopeCache slide:8/4"].get_zorder()
    assert "MiB" in ax.get_ylabel()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--smollm2", "--plot", "kv.png"], "add --long"),
        (["--smollm2", "--threads", "0"], "--threads"),
        (["--smollm2", "--threads", "many"], "--threads"),
        (["--smollm2", "--budget", "8", "--recent", "8"], "recent"),
        (["--smollm2", "--max-new-tokens", "0"], "at least 1"),
        (["--smollm2", "--items", "40"], "--items sets the testbed's program"),
        (["--long"], "--long belong(s) to the SmolLM2 demo: add --smollm2"),
        (["--row", "0", "--lines", "2"], "--row, --lines belong(s) to the SmolLM2 demo"),
        (["--items", "0"], "--items must be between 1 and"),
        (["--budget", "8", "--recent", "8"], "--budget/--recent"),
        (["--threads", "0"], "--threads"),
    ],
)
def test_bad_options_are_refused_before_loading(monkeypatch, capsys, argv, message):
    monkeypatch.setattr(scope_demo, "find_smollm2", lambda: pytest.fail("loaded the model for bad options"))
    monkeypatch.setattr(scope_demo, "run_testbed_demo", lambda *a, **k: pytest.fail("ran the demo for bad options"))
    assert main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_testbed_demo_measures_accuracy_and_memory_side_by_side(capsys):
    """The default demo on the shipped testbed model, shortened to 40 items (241 output tokens)."""
    from scope_kv.testbed import make_example, output_length

    threads = torch.get_num_threads()
    assert main(["demo", "--items", "40", "--budget", "16", "--no-progress"]) == 0
    assert torch.get_num_threads() == threads
    out = capsys.readouterr().out
    prompt = len(make_example(0, 64, 40).prompt_ids)
    assert f"a {prompt}-token prompt (64 facts, a 40-line program), a 241-token output of 40 items" in out
    number = r"\s+(\d+)/40\s+(\d+ %|-)\s+(\d+ %|-)\s+(\d+ %|-)\s+([\d,]+)\s+([\d.]+) MiB\s+(\d+)%\s+[\d.]+$"
    rows = {}
    for label in ("full cache (DynamicCache)", "SCOPE slide:16/8", "unified H2O, same memory"):
        match = re.search(rf"^{re.escape(label)}{number}", out, re.M)
        assert match, out
        rows[label] = match.groups()
    full, slide, unified = rows.values()
    assert int(full[0]) == 40 and full[6] == "100"  # the model solves it with the whole cache
    # entries held per KV head in layer 0: everything; prompt + B for both compressed caches
    assert int(full[4].replace(",", "")) == prompt + output_length(40) - 1
    assert int(slide[4].replace(",", "")) == int(unified[4].replace(",", "")) == prompt + 16
    assert slide[5] == unified[5] and float(slide[5]) < float(full[5])  # same memory, measured
    for label, row in rows.items():
        if label != "full cache (DynamicCache)" and int(row[0]) < 40:
            assert re.search(rf"^{re.escape(label)}: {40 - int(row[0])} items wrong, the first at item \d+", out, re.M)


def test_plot_draws_the_reference_on_top(tmp_path):
    samples = {
        "DynamicCache": [KVSample(k, k * 10, k * 10) for k in range(1, 5)],
        "ScopeCache slide:8/4": [KVSample(k, 25, 30) for k in range(1, 5)],
    }
    path = plot_kv_over_tokens(samples, tmp_path / "sub" / "kv.png", "t", reference="DynamicCache")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("x\ny\nz", "x\ny\nw", (2, "z", "w")),  # the first differing line, not the first lines
        ("x\ny", "x\ny\nmore", (2, "", "more")),  # one output is longer
        ("x\ny", "x\ny ", (1, "y", "y ")),
        ("", "", (0, "", "")),
    ],
)
def test_demo_shows_the_first_differing_line(a, b, expected):
    assert scope_demo.first_difference(a, b) == expected


def test_cli_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert re.match(r"scope-kv \d+\.\d+\.\d+ \(transformers \d+\.\d+", out), out
