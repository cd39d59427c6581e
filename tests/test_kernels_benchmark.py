"""benchmarks/decode.py runs end to end on the CPU (--smoke: tiny model) and writes what it promises."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_decode_benchmark_smoke(tmp_path):
    out = tmp_path / "decode"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--smoke", "--out", str(out),
           "--methods", "dynamic", "static", "scope-full", "slide-noselect", "slide", "discontinuous"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").exists()
    methods = {p["method"] for p in result["points"]}
    assert methods == {"dynamic", "static", "scope-full", "slide-noselect", "slide", "discontinuous"}
    settings = result["settings"]
    for p in result["points"]:
        assert p["ms_mean"] > 0 and p["ms_median"] > 0
        if p["method"] == "slide":
            # Slide holds the prompt plus at most the budget; it selects once the pool is full.
            assert p["held_entries"] <= settings["prompt"] + settings["budget"]
            assert (p["selections"] > 0) == (p["generated"] >= settings["budget"])
        if p["method"] == "dynamic":
            assert p["held_entries"] == settings["prompt"] + p["generated"]
    summary = {(r["method"], r["batch_tag"], r["workload"]) for r in result["summary"]}
    assert ("slide", 1, max(settings["workloads"])) in summary
    assert all(r["tokens_per_s"] > 0 for r in result["summary"])
    assert any(t["target"].startswith("selection cost") for t in result["targets"])


def test_generate_benchmark_smoke(tmp_path):
    """benchmarks/generate.py: real generate calls, warm and cold, eager and compiled (on the CPU
    the compiled decode goes through torch.compile's CUDA-graph-free path)."""
    out = tmp_path / "generate"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--smoke", "--batches", "2", "--out", str(out),
           "--methods", "dynamic,scope-slide,captured-slide"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".md").exists()
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"dynamic", "scope-slide", "captured-slide"}
    settings = result["settings"]
    for row in rows.values():
        assert row["warm"]["steps"] == settings["new"] - 1 and row["step_ms"] > 0
    # Slide holds the prompt plus the budget (per row and KV head); DynamicCache the whole sequence.
    per_entry = result["kv_bytes_per_token"]
    assert rows["scope-slide"]["warm"]["kv_held_bytes"] == 2 * per_entry * (settings["prompt"] + settings["budget"])
    assert rows["dynamic"]["warm"]["kv_held_bytes"] == 2 * per_entry * (settings["prompt"] + settings["new"] - 1)


def test_generate_benchmark_one_call_per_method(tmp_path):
    """``--calls 1`` (long outputs) times one generate call per method and says so in its table;
    ``--stop-after`` ends each call early while the caches stay sized for ``--new``."""
    out = tmp_path / "generate"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--smoke", "--batches", "1", "--out", str(out),
           "--methods", "scope-slide,static-compiled", "--calls", "1", "--stop-after", "30"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    for row in rows.values():
        assert row["warm"] == row["cold"] and row["step_ms"] == row["cold_step_ms"] > 0
        assert row["warm"]["steps"] == 29 and len(row["warm"]["block_ms"]) == 1  # 30 tokens: 29 step intervals
    settings = result["settings"]
    assert settings["calls"] == 1 and settings["stop_after"] == 30 and settings["new"] == 48
    # StaticCache was still sized for the 48 new tokens (generate gives it max_length - 1 slots), not the 30 produced
    per_entry = result["kv_bytes_per_token"]
    assert rows["static-compiled"]["warm"]["kv_allocated_bytes"] == per_entry * (settings["prompt"] + settings["new"] - 1)
    table = out.with_suffix(".md").read_text()
    assert "one call per method" in table and "stopped after 30" in table


def test_generate_benchmark_interleaves_rounds_of_eager_methods(tmp_path):
    """``--rounds R`` calls every eager method once a round after a cold call of each, reports the
    median round (and every round in the JSON); compiled methods are refused with the reason."""
    out = tmp_path / "generate"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--smoke", "--batches", "1", "--out", str(out),
           "--methods", "dynamic,scope-slide", "--rounds", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["settings"]["rounds"] == 3
    for row in result["rows"]:
        rounds = row["rounds_ms"]
        assert len(rounds) == 3 and all(ms > 0 for ms in rounds)
        assert row["step_ms"] == sorted(rounds)[1] == row["warm"]["step_ms"]  # the median round
    table = out.with_suffix(".md").read_text()
    assert "3 interleaved rounds" in table
    refused = subprocess.run(cmd[:-4] + ["--methods", "dynamic,captured-slide", "--rounds", "2"], capture_output=True,
                             text=True, timeout=300, cwd=ROOT / "benchmarks")
    assert refused.returncode == 2 and "captured-slide" in refused.stderr and "recompile" in refused.stderr


def test_generate_benchmark_switches_parts_of_the_eager_slide_path_off(tmp_path):
    """``scope-slide/per-layer-evictions`` and ``scope-slide/backend-attention`` time eager Slide
    with one part of its decode path off (the layer's public switches), at Slide's memory."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import generate
    finally:
        sys.path.pop(0)
    from conftest import make_model

    args = argparse.Namespace(budget=8, recent=4, new=16, snap_budget=8, compile_backend="inductor")
    model = make_model("llama")
    for method, switch in (("scope-slide/per-layer-evictions", "batch_evictions"),
                           ("scope-slide/backend-attention", "fast_decode")):
        cache = generate._generate_kwargs(model, method, args)
        cache = next(v for v in cache.values() if hasattr(v, "layers"))
        assert cache.describe() == "slide:8/4"
        assert all(getattr(layer, switch) is False for layer in cache.layers), method
        plain = next(v for v in generate._generate_kwargs(model, "scope-slide", args).values() if hasattr(v, "layers"))
        assert all(getattr(layer, switch) is None for layer in plain.layers)  # the default: on for CUDA
    out = tmp_path / "generate"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--smoke", "--batches", "1", "--out", str(out),
           "--methods", "scope-slide,scope-slide/per-layer-evictions,scope-slide/backend-attention", "--calls", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len({r["warm"]["kv_held_bytes"] for r in rows}) == 1 and len(rows) == 3


def test_profile_benchmark_smoke(tmp_path):
    """benchmarks/profile_decode.py profiles real generate calls and writes its tables, without
    counting the profiler's step markers as kernels."""
    out = tmp_path / "profile"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"), "--smoke", "--out", str(out),
           "--methods", "dynamic,scope-slide"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert [r["method"] for r in result["rows"]] == ["dynamic", "scope-slide"]
    for row in result["rows"]:
        assert row["step_ms"] > 0 and row["cpu_ops"], row  # host operators were recorded
        assert not any(k["name"].startswith("ProfilerStep") for k in row["kernels"])


def test_profile_summary_leaves_out_the_step_markers(monkeypatch):
    """The profiler's step markers carry the whole step's device time; the totals count kernels only."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from profile_decode import summarise

    row = dict(method="m", batch=1, step_ms=10.0, cpu_ops=[], kernels=[
        dict(name="ProfilerStep*", us_per_step=10000.0, calls_per_step=1.0),
        dict(name="gemm", us_per_step=8000.0, calls_per_step=100.0)])
    row = summarise(row, top=40)
    assert row["kernel_ms_per_step"] == 8.0 and row["kernels_per_step"] == 100.0 and row["idle_share"] == 0.2
    assert [k["name"] for k in row["kernels"]] == ["gemm"]


def test_profile_benchmark_python_host_time(tmp_path):
    """``profile_decode.py --python``: Python's profiler over a real generate call, host time per
    step by package and function; only ScopeCache's run spends any of it in scope_kv."""
    out = tmp_path / "profile"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_decode.py"), "--smoke", "--python", "--out", str(out),
           "--methods", "dynamic,scope-slide"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["method"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    assert set(rows) == {"dynamic", "scope-slide"}
    assert rows["dynamic"]["self_us_per_step_by_package"].get("scope_kv", 0.0) == 0.0
    assert rows["scope-slide"]["self_us_per_step_by_package"]["scope_kv"] > 0
    ours = [f for f in rows["scope-slide"]["functions"] if f["package"] == "scope_kv"]
    assert ours and all(f["self_us_per_step"] <= f["total_us_per_step"] and f["calls_per_step"] > 0 for f in ours)
    table = out.with_suffix(".md").read_text()
    assert "Python's profiler" in table and "| scope-slide |" in table and "kernels by time" not in table


def test_generate_benchmark_times_the_unified_baselines_in_both_layouts(tmp_path):
    """The unified baselines are methods of benchmarks/generate.py, eager and captured, at SnapKV +
    Slide's memory (``--snap-budget`` + ``--budget`` entries over prompt and output)."""
    out = tmp_path / "generate"
    methods = ["scope-unified-h2o", "captured-unified-h2o", "scope-unified-streamingllm", "captured-unified-streamingllm"]
    cmd = [sys.executable, str(ROOT / "benchmarks" / "generate.py"), "--smoke", "--batches", "2", "--out", str(out),
           "--methods", ",".join(methods), "--calls", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == methods
    settings, per_entry = result["settings"], result["kv_bytes_per_token"]
    assert settings["prompt"] > settings["snap_budget"] + settings["budget"]  # the prompt itself is cut
    for name in ("unified-h2o", "unified-streamingllm"):
        eager, captured = rows[f"scope-{name}"]["warm"], rows[f"captured-{name}"]["warm"]
        assert eager["kv_held_bytes"] == 2 * per_entry * (settings["snap_budget"] + settings["budget"])
        # the static layout's slots are its footprint (a free slot per row and KV head beside the budget)
        assert eager["kv_held_bytes"] < captured["kv_held_bytes"] == captured["kv_allocated_bytes"]
        assert captured["kv_allocated_bytes"] <= eager["kv_held_bytes"] + 2 * per_entry


def test_host_calls_benchmark_counts_python_calls_per_decode_step(tmp_path):
    """benchmarks/host_calls.py: Python calls per eager decode step, the same on every run; the
    stock cache makes none into scope_kv, ScopeCache some, and evicting makes more than not."""
    out = tmp_path / "host_calls"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "host_calls.py"), "--layers", "2", "--new", "24",
           "--budget", "8", "--recent", "4", "--prompt", "16", "--out", str(out)]
    runs = []
    for _ in range(2):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(json.loads(out.with_suffix(".json").read_text()))
    assert out.with_suffix(".md").exists()
    rows = {r["method"]: r for r in runs[0]["rows"]}
    assert list(rows) == ["dynamic", "scope-none", "scope-slide/no-eviction", "scope-slide"]
    assert rows["dynamic"]["scope_kv_calls_per_step"] == 0 and rows["dynamic"]["extra_per_layer"] == 0
    assert 0 < rows["scope-none"]["scope_kv_calls_per_step"] <= rows["scope-slide/no-eviction"]["scope_kv_calls_per_step"]
    assert rows["scope-slide"]["calls_per_step"] > rows["scope-slide/no-eviction"]["calls_per_step"]
    assert [r["calls_per_step"] for r in runs[0]["rows"]] == [r["calls_per_step"] for r in runs[1]["rows"]]


def test_passthrough_benchmark_times_dynamic_cache_on_a_stock_and_a_routed_model(tmp_path):
    """benchmarks/passthrough_cpu.py: DynamicCache with the model stock and routed through scope_kv
    (a ScopeCache built on it). Stock, the step never calls into scope_kv; routed, it does on every
    layer (the pre-hook and the pass-through function)."""
    out = tmp_path / "passthrough"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "passthrough_cpu.py"), "--layers", "2", "--pairs", "2",
           "--short", "2", "--new", "6", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT / "benchmarks")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.with_suffix(".json").read_text())
    assert len(result["pairs"]["stock_ms"]) == len(result["pairs"]["routed_ms"]) == 2
    assert all(ms > 0 for ms in result["pairs"]["stock_ms"] + result["pairs"]["routed_ms"])
    assert result["scope_kv_calls_per_step"]["stock"] == 0
    assert result["scope_kv_calls_per_step"]["routed"] >= 2 * 2  # the hook and the function, each layer
    assert result["calls_per_step"]["routed"] > result["calls_per_step"]["stock"]
    assert "µs a layer" in out.with_suffix(".md").read_text()
