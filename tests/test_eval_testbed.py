"""``scope-kv eval testbed`` end to end on a tiny (untrained) testbed-shaped model: records,
resume, summary, plots; a cache that compresses nothing reproduces DynamicCache's outputs."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from scope_kv.cli import main
from scope_kv.eval.testbed import REFERENCE, TestbedSettings, summarize
from scope_kv.eval.testbed import testbed_grid as default_grid
from scope_kv.testbed import make_example, output_length, prompt_length, save_testbed
from scope_kv.testbed import testbed_config as make_config


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import LlamaForCausalLM

    config = make_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=512)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("testbed") / "model"
    save_testbed(LlamaForCausalLM(config).eval(), path)
    return path


def _run(model_dir, out, *extra):
    return main(["eval", "testbed", "--model-dir", str(model_dir), "--bindings", "3", "--items", "6",
                 "--seeds", "3", "--batch-size", "2", "--scale", "1", "2", "--out", str(out), "--no-progress",
                 "-m", "full", "-m", "slide:8/4", "-m", "unified-h2o:prompt+8/4", *extra])


def test_cli_runs_resumes_and_reports(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(model_dir, out) == 0
    rows = [json.loads(line) for line in (out / "testbed.jsonl").read_text().splitlines()]
    methods = [REFERENCE, "full", "slide:8/4", "unified-h2o:prompt+8/4"]
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    assert len(rows) == len(methods) * 2 * 3  # methods x scales x seeds
    for r in rows:
        n_items = 6 if r["scale"] == 1 else 12
        assert r["n_items"] == n_items and len(r["correct"]) == n_items
        assert r["prompt_tokens"] == prompt_length(3, n_items) and r["gold_tokens"] == output_length(n_items)
        assert r["accuracy"] == sum(r["correct"]) / n_items
        example = make_example(r["seed"], 3, n_items)  # each item's source kind, from the example itself
        assert r["kinds"] == "".join(item.kind[0] for item in example.items)
    by = {(r["method"], r["scale"], r["seed"]): r for r in rows}
    for (method, scale, seed), r in by.items():
        ref = by[(REFERENCE, scale, seed)]
        if method == "full":  # a ScopeCache that compresses nothing: the same tokens
            assert r["output"] == ref["output"] and r["kv_entries"] == ref["kv_entries"]
        if method != REFERENCE and method != "full" and r["new_tokens"] > 9:
            assert r["kv_entries"] <= r["prompt_tokens"] + 8  # the budget holds
    summary = list(csv.DictReader((out / "testbed_summary.csv").open()))
    assert len(summary) == len(methods) * 2
    assert {"accuracy", "accuracy_q1", "accuracy_q4", "accuracy_prompt", "accuracy_hot", "accuracy_back",
            "kv_vs_full", "kv_entries"} <= set(summary[0])
    for scale in (1, 2):
        assert (out / f"testbed_accuracy_x{scale}.png").stat().st_size > 0
        assert (out / f"testbed_by_position_x{scale}.png").stat().st_size > 0
    assert "slide:8/4" in (out / "testbed_report.md").read_text()
    printed = capsys.readouterr().out
    assert "item accuracy" in printed and "testbed_report.md" in printed

    # scope-kv report knows testbed directories too
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "## Testbed" in report and "slide:8/4" in report
    assert (tmp_path / "report" / "testbed_accuracy_x2.png").exists()

    before = (out / "testbed.jsonl").read_text()
    assert _run(model_dir, out) == 0  # resumed: nothing left to run, nothing appended
    assert (out / "testbed.jsonl").read_text() == before
    with pytest.raises(Exception, match="other settings"):
        _run(model_dir, out, "--seed-start", "5")


def test_processes_sharing_a_directory_split_the_runs_and_the_last_writes_the_report(model_dir, tmp_path, capsys):
    """--rank / --world-size: several processes (e.g. on one GPU) each run every world-size-th run;
    the records equal one process's, and the report appears once all are done."""
    whole, shared = tmp_path / "whole", tmp_path / "shared"
    assert _run(model_dir, whole) == 0
    assert _run(model_dir, shared, "--rank", "1", "--world-size", "2") == 0
    assert "rank 1 of 2 done" in capsys.readouterr().out
    assert not (shared / "testbed_report.md").exists() and not (shared / "testbed.jsonl").exists()
    part = [json.loads(line) for line in (shared / "testbed.part-1-of-2.jsonl").read_text().splitlines()]
    assert 0 < len(part) < 24
    assert _run(model_dir, shared, "--rank", "0", "--world-size", "2") == 0
    assert (shared / "testbed_report.md").exists() and not list(shared.glob("testbed.part-*"))

    def records(directory):
        rows = [json.loads(line) for line in (directory / "testbed.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    assert records(shared) == records(whole)


def test_adaptive_is_planned_for_each_scales_output(model_dir, tmp_path):
    """At scale 1 (37-token outputs) adaptive:8/4 plans for 37 tokens and ends at its full budget,
    not for scale 2's 73 (where it would end near r + (B - r) / 2)."""
    out = tmp_path / "run"
    assert main(["eval", "testbed", "--model-dir", str(model_dir), "--bindings", "3", "--items", "6", "--seeds", "2",
                 "--batch-size", "2", "--scale", "1", "2", "--out", str(out), "--no-progress",
                 "-m", "adaptive:8/4", "-m", "adaptive:8/4,T=73"]) == 0
    rows = [json.loads(line) for line in (out / "testbed.jsonl").read_text().splitlines()]
    full_length = [r for r in rows if r["new_tokens"] == r["gold_tokens"] and r["method"] != REFERENCE]  # to the end
    assert {(r["method"], r["scale"]) for r in full_length} == {(m, s) for m in ("adaptive:8/4", "adaptive:8/4,T=73")
                                                                for s in (1.0, 2.0)}
    ends = {(r["method"], r["scale"]): r["kv_entries"] - r["prompt_tokens"] for r in full_length}
    assert ends[("adaptive:8/4", 1.0)] == 8  # planned for 37: B(36) = min(8, 4 + 36 // 8)
    assert ends[("adaptive:8/4,T=73", 1.0)] < 8  # the spec's own plan wins
    assert ends[("adaptive:8/4", 2.0)] == ends[("adaptive:8/4,T=73", 2.0)]


def test_bad_settings_and_missing_model(tmp_path, capsys):
    assert main(["eval", "testbed", "--model-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "-m", "full"]) == 2
    assert "train.py" in capsys.readouterr().err
    assert main(["eval", "testbed", "--seeds", "0", "--out", str(tmp_path / "o")]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--scale"):
        TestbedSettings(scales=(0.0,))


def test_default_grid_and_summary_arithmetic():
    grid = default_grid((128,))
    assert grid[0] == "full" and "slide:128/64" in grid and "unified-h2o:prompt/4+128/64" in grid
    rows = [
        {"scale": 1.0, "method": m, "family": m, "prompt_tokens": 10, "gold_tokens": 25, "correct": c,
         "accuracy": sum(c) / 4, "kv_entries": e, "kv_held_bytes": 2**20, "seconds": 2.0, "kinds": k}
        for m, c, e, k in [(REFERENCE, [1, 1, 1, 1], 40, "phbb"), ("slide:8/4", [1, 1, 0, 0], 18, "phbb"),
                           ("slide:8/4", [1, 0, 1, 0], 18, "pppb")]
    ]
    s = {r["method"]: r for r in summarize(rows)}
    assert s["slide:8/4"]["accuracy"] == 0.5 and s["slide:8/4"]["accuracy_q1"] == 1.0
    assert s["slide:8/4"]["accuracy_q2"] == 0.5 and s["slide:8/4"]["accuracy_q4"] == 0.0
    assert s["slide:8/4"]["kv_vs_full"] == 0.45 and s["slide:8/4"]["exact_outputs"] == 0.0
    assert s[REFERENCE]["exact_outputs"] == 1.0
    # per source kind, pooled over the seeds: prompt items 1 + (1, 0, 1) of 4, the hot one right, back 0 of 3
    assert s["slide:8/4"]["accuracy_prompt"] == 3 / 4 and s["slide:8/4"]["accuracy_hot"] == 1.0
    assert s["slide:8/4"]["accuracy_back"] == 0.0
    assert s[REFERENCE]["accuracy_hot"] == 1.0
