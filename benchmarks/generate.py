"""End-to-end `model.generate` decode speed: every cache as a user runs it.

Real ``model.generate`` calls (no hand-driven step), Llama-3.1-8B geometry with random bf16
weights, a random prompt of ``--prompt`` tokens, ``--new`` new tokens. The time of each decode
step is read from CUDA events that a logits processor records once per step in the stream, so
it is the step-to-step time the user waits for (host stalls included). Each method runs the
identical call twice: the first (``cold``) pays compilation, CUDA-graph capture and, for caches
whose KV length changes every step, cuDNN's plan for each new length; the second (``warm``)
is what a long-running service sees and is the headline. Step times are the median over the
last ``--window`` steps (the pool is at budget there; the script prints the first and last
windows too, to show the step is flat).

Methods (``--methods``, comma-separated):

* ``dynamic`` -- transformers' DynamicCache, on the model's own attention (nothing of scope_kv's
  in its path: ``disable_scope_attention``); ``dynamic/routed`` -- the same cache with the model
  left routed through scope_kv's attention function, as after a ScopeCache was built on it (what
  the pass-through costs);
* ``static-compiled`` -- transformers' StaticCache through ``generate``'s own compilation
  (``cache_implementation="static"``; torch.compile, mode reduce-overhead);
* ``scope-none``, ``scope-slide``, ``scope-adaptive``, ``scope-discontinuous``, ``scope-snapkv+slide``,
  ``scope-unified-h2o``, ``scope-unified-streamingllm`` -- ScopeCache, eager (the unified baselines
  hold ``--snap-budget`` + ``--budget`` entries over prompt and output: SnapKV + Slide's memory);
* ``captured-slide``, ``captured-adaptive``, ``captured-discontinuous``, ``captured-snapkv+slide``,
  ``captured-unified-h2o``, ``captured-unified-streamingllm``
  -- ScopeCache(static=True): ``generate`` compiles the decode step (``--compile-backend``:
  ``inductor`` with mode reduce-overhead, generate's own default and what a user gets, or
  ``cudagraphs``, torch.compile's CUDA-graph backend without code generation, which copies every
  input it is not told is fixed, the weights included, before each replay).

Every method is run with cuDNN's SDPA on (PyTorch's default) and, with ``--cudnn off`` or
``both``, off. Roofline: (weights + the KV a step reads) / measured copy bandwidth.

    python benchmarks/generate.py --batches 1,8 --out benchmarks/results/generate_h200
    python benchmarks/generate.py --smoke     # tiny model, CPU or GPU: the script runs
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import CompileConfig, DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList
from transformers.generation.stopping_criteria import MaxLengthCriteria

from bench_common import LLAMA_8B, TINY, build_model, fmt, kv_bytes_per_token, measure_bandwidth, median
from bench_common import weight_bytes_read, write_outputs
from scope_kv import Adaptive, Discontinuous, ScopeCache, Slide, SnapKV, UnifiedH2O, UnifiedStreamingLLM
from scope_kv.accounting import kv_footprint
from scope_kv.attention import disable_scope_attention, enable_scope_attention
from scope_kv.compat import cache_kwargs, output_cache

ALL_METHODS = (
    "dynamic", "static-compiled", "scope-none", "scope-slide", "scope-adaptive", "scope-discontinuous",
    "scope-snapkv+slide", "scope-unified-h2o", "scope-unified-streamingllm", "captured-slide", "captured-adaptive",
    "captured-discontinuous", "captured-snapkv+slide", "captured-unified-h2o", "captured-unified-streamingllm",
    "scope-slide/per-layer-evictions", "scope-slide/backend-attention", "dynamic/routed",
)
# Eager Slide with one part of its decode path switched off (the layer's public switches), to
# find where its host time goes: each layer launches its own eviction instead of one launch a
# step for all (``batch_evictions``), or attention runs in the model's backend and candidates are
# scored from it instead of the grouped attention's log-sum-exp (``fast_decode``).
_VARIANTS = {"per-layer-evictions": ("batch_evictions", False), "backend-attention": ("fast_decode", False)}


class StepClock(LogitsProcessor):
    """Records a CUDA event (or a host clock on the CPU) once per generated token, in the stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.marks: list[Any] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())
        return scores

    def step_ms(self) -> list[float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:], strict=False)]


def compiled(method: str) -> bool:
    """Whether ``method`` decodes through torch.compile (its first call compiles and captures)."""
    return method.startswith("captured-") or method == "static-compiled"


def _strategy(name: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """(prefill, decoding) of a scope method name."""
    kind = name.split("-", 1)[1]
    b, r, t = args.budget, args.recent, args.new
    if kind == "none":
        return None, None
    if kind == "slide":
        return None, Slide(b, r)
    if kind == "adaptive":
        return None, Adaptive(b, r, max_new_tokens=max(t, b))
    if kind == "discontinuous":
        return None, Discontinuous(b, r, max_new_tokens=max(t, b))
    if kind == "snapkv+slide":
        return SnapKV(args.snap_budget), Slide(b, r)
    if kind == "unified-h2o":
        return None, UnifiedH2O(args.snap_budget + b, r)
    if kind == "unified-streamingllm":
        return None, UnifiedStreamingLLM(args.snap_budget + b, r)
    raise ValueError(f"unknown method {name!r}")


def _generate_kwargs(model, method: str, args: argparse.Namespace) -> dict[str, Any]:
    if method in ("dynamic", "static-compiled"):
        # transformers' caches on the model's own attention: nothing of scope_kv's in their path
        # (a ScopeCache built for an earlier method left the model routed through scope_kv)
        disable_scope_attention(model)
    if method == "dynamic/routed":
        enable_scope_attention(model)
    if method in ("dynamic", "dynamic/routed"):
        return cache_kwargs(DynamicCache(config=model.config))
    if method == "static-compiled":
        return dict(cache_implementation="static")
    method, _, variant = method.partition("/")
    prefill, decoding = _strategy(method, args)
    captured = method.startswith("captured-")
    cache = ScopeCache(model, decoding=decoding, prefill=prefill, static=captured)
    if variant:
        switch, value = _VARIANTS[variant]
        for layer in cache.layers:
            setattr(layer, switch, value)
    kwargs: dict[str, Any] = cache_kwargs(cache)
    if captured:
        config = CompileConfig(fullgraph=True, backend=args.compile_backend,
                               mode="reduce-overhead" if args.compile_backend == "inductor" else None)
        if model.device.type != "cuda":
            config._compile_all_devices = True
        kwargs["compile_config"] = config
    return kwargs


def run_once(model, method: str, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    device = ids.device
    kwargs = _generate_kwargs(model, method, args)
    clock = StepClock(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    produced = args.stop_after or args.new
    if args.stop_after:  # the caches are sized for --new tokens; the call ends after --stop-after
        kwargs["stopping_criteria"] = StoppingCriteriaList([MaxLengthCriteria(ids.shape[1] + produced)])
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                         min_new_tokens=produced, do_sample=False, logits_processor=LogitsProcessorList([clock]),
                         return_dict_in_generate=True, pad_token_id=0, **kwargs)
    wall = time.perf_counter() - start
    steps = clock.step_ms()
    cache = output_cache(out)
    footprint = kv_footprint(cache) if cache is not None else None
    row: dict[str, Any] = dict(
        wall_s=round(wall, 3),
        steps=len(steps),
        step_ms=round(median(steps[-args.window:]), 3) if steps else None,
        first_window_ms=round(median(steps[: args.window]), 3) if steps else None,
        # the median of each block of 256 steps: shows whether the step is flat along the call
        block_ms=[round(median(steps[i:i + 256]), 3) for i in range(0, len(steps), 256)],
        kv_allocated_bytes=footprint.allocated_bytes if footprint else None,
        kv_held_bytes=footprint.held_bytes if footprint else None,
    )
    if device.type == "cuda":
        row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    del out, cache, kwargs
    return row


def _one_method(model, method: str, ids: torch.Tensor, args: argparse.Namespace) -> tuple[Any, Any]:
    """(cold run, [warm run]) of one method, or (None, the error) when it ran out of memory."""
    if compiled(method):
        torch._dynamo.reset()
    try:
        cold = run_once(model, method, ids, args)
        # --calls 1 (long outputs): the one call's last steps are far past compilation
        return cold, [run_once(model, method, ids, args) if args.calls == 2 else cold]
    except torch.cuda.OutOfMemoryError as exc:
        return None, f"OOM: {exc}"[:200]


def _interleaved(model, methods: list[str], ids: torch.Tensor, args: argparse.Namespace) -> list[tuple[str, Any, Any]]:
    """--rounds R: a cold call of every method, then R rounds that call each method once in turn, so
    that the host's drift over minutes (the eager step is bound by it) falls on every method alike."""
    try:
        colds = {m: run_once(model, m, ids, args) for m in methods}
        warms: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for _ in range(args.rounds):
            for m in methods:
                warms[m].append(run_once(model, m, ids, args))
    except torch.cuda.OutOfMemoryError as exc:
        return [(m, None, f"OOM: {exc}"[:200]) for m in methods]
    return [(m, colds[m], warms[m]) for m in methods]


def _row(method: str, batch: int, use_cudnn: bool, cold: dict[str, Any], warms: list[dict[str, Any]],
         args: argparse.Namespace, weights: int, bandwidth: float, per_token: int) -> dict[str, Any]:
    """One table row: the warm call (the median one over rounds) against the roofline of the bytes it read."""
    warm = sorted(warms, key=lambda w: w["step_ms"] if w["step_ms"] is not None else float("inf"))[len(warms) // 2]
    held = (warm["kv_held_bytes"] or 0) / max(batch, 1)
    kv_read = warm["kv_held_bytes"] if warm["kv_held_bytes"] is not None else per_token * batch * (args.prompt + args.new)
    roofline = (weights + kv_read) / bandwidth * 1e3 if bandwidth == bandwidth else float("nan")
    row = dict(method=method, batch=batch, cudnn=use_cudnn, warm=warm, cold=cold,
               step_ms=warm["step_ms"], cold_step_ms=cold["step_ms"],
               tokens_per_s=round(batch * 1e3 / warm["step_ms"], 1) if warm["step_ms"] else None,
               roofline_ms=round(roofline, 3), x_roofline=round(warm["step_ms"] / roofline, 3)
               if warm["step_ms"] and roofline == roofline else None, kv_held_bytes_per_row=held)
    if len(warms) > 1:
        row["rounds_ms"] = [w["step_ms"] for w in warms]
    return row


def run(args: argparse.Namespace, on_row: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every (batch, cuDNN, method) row; ``on_row`` gets the result so far after each row (a run cut
    short by a time limit keeps what it measured)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(TINY if args.smoke else LLAMA_8B, device, dtype)
    model.generation_config.eos_token_id = None
    bandwidth = measure_bandwidth(device)
    weights = weight_bytes_read(model)
    per_token = kv_bytes_per_token(model)
    rows: list[dict[str, Any]] = []
    env = dict(torch=torch.__version__, transformers=transformers.__version__,
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", command=" ".join(sys.argv))

    def result() -> dict[str, Any]:
        return dict(rows=list(rows), env=env, settings={k: v for k, v in vars(args).items() if k != "out"},
                    bandwidth_bytes_per_s=bandwidth, weight_bytes=weights, kv_bytes_per_token=per_token)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS:
            raise SystemExit(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    cudnn = {"on": [True], "off": [False], "both": [True, False]}[args.cudnn]
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = torch.randint(3, model.config.vocab_size, (batch, args.prompt), device=device)
        for use_cudnn in cudnn:
            if device.type == "cuda":
                torch.backends.cuda.enable_cudnn_sdp(use_cudnn)
            if args.rounds > 1:
                measured = _interleaved(model, methods, ids, args)
            else:
                measured = ((m, *_one_method(model, m, ids, args)) for m in methods)
            for method, cold, warms in measured:
                if cold is None:
                    rows.append(dict(method=method, batch=batch, cudnn=use_cudnn, error=warms))
                    print(f"{method:>24} b={batch:<3} cudnn={use_cudnn}: out of memory", flush=True)
                    continue
                row = _row(method, batch, use_cudnn, cold, warms, args, weights, bandwidth, per_token)
                rows.append(row)
                warm = row["warm"]
                print(f"{method:>24} b={batch:<3} cudnn={'on' if use_cudnn else 'off'}: warm {fmt(warm['step_ms'], '.2f')} "
                      f"ms/step (first window {fmt(warm['first_window_ms'], '.2f')}), cold {fmt(cold['step_ms'], '.2f')}, "
                      f"x{fmt(row['x_roofline'], '.2f')} roofline, KV {fmt((warm['kv_allocated_bytes'] or 0) / 2**20, '.0f')} MiB",
                      flush=True)
                if on_row is not None:
                    on_row(result())
    return result()


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    timed = ("the second identical call (warm); cold = the first call" if s.get("calls", 2) == 2 else
             "one call per method (warm = cold: its last steps come long after compilation)")
    if s.get("rounds", 1) > 1:
        timed = (f"warm calls in {s['rounds']} interleaved rounds (every method once a round, after a cold call of "
                 "each); the table gives the median round and, in brackets, the fastest and slowest")
    if s.get("stop_after"):
        timed += (f"; each call is sized for {s['new']} new tokens (StaticCache allocates prompt + {s['new']} slots) "
                  f"and stopped after {s['stop_after']}")
    lines = [f"# `model.generate` decode step ({result['env']['device']}, torch {result['env']['torch']}, "
             f"transformers {result['env']['transformers']})", "",
             f"Prompt {s['prompt']}, {s['new']} new tokens, budget {s['budget']}/{s['recent']}; median of the last "
             f"{s['window']} steps of {timed}. Command: `{result['env']['command']}`.", "",
             "| method | batch | cuDNN SDPA | ms/step (warm) | ms/step (cold) | tokens/s | × roofline | KV held MiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['batch']} | {'on' if r['cudnn'] else 'off'} | {r['error']} | | | | |")
            continue
        spread = (f" ({fmt(min(r['rounds_ms']), '.2f')}-{fmt(max(r['rounds_ms']), '.2f')})"
                  if r.get("rounds_ms") and None not in r["rounds_ms"] else "")
        lines.append(f"| {r['method']} | {r['batch']} | {'on' if r['cudnn'] else 'off'} | {fmt(r['step_ms'], '.2f')}{spread} | "
                     f"{fmt(r['cold_step_ms'], '.2f')} | {fmt(r['tokens_per_s'], '.0f')} | {fmt(r['x_roofline'], '.2f')} | "
                     f"{fmt((r['warm']['kv_held_bytes'] or 0) / 2**20, '.0f')} |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in result["rows"] if "error" not in r and r["cudnn"]]
    batches = sorted({r["batch"] for r in rows})
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        ys = [next((r["step_ms"] for r in rows if r["method"] == m and r["batch"] == b), float("nan")) for b in batches]
        ax.bar([j + i * width for j in range(len(batches))], ys, width, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per decode step (warm)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="dynamic,static-compiled,scope-slide,captured-slide,captured-snapkv+slide",
                    help="comma-separated, from: " + ", ".join(ALL_METHODS))
    ap.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
    ap.add_argument("--prompt", type=int, default=4096, help="prompt tokens")
    ap.add_argument("--new", type=int, default=640, help="new tokens per generate call (> budget: time at budget)")
    ap.add_argument("--window", type=int, default=64, help="steps the median is taken over (the last ones)")
    ap.add_argument("--budget", type=int, default=512, help="decoding budget B")
    ap.add_argument("--recent", type=int, default=256, help="recent window r")
    ap.add_argument("--snap-budget", type=int, default=2048, help="SnapKV's prefill budget C")
    ap.add_argument("--cudnn", choices=["on", "off", "both"], default="on", help="cuDNN SDPA backend")
    ap.add_argument("--compile-backend", default="inductor", choices=["cudagraphs", "inductor"],
                    help="torch.compile backend for the captured methods")
    ap.add_argument("--calls", type=int, choices=[1, 2], default=2,
                    help="generate calls per method: 2 times the second (warm shapes); 1 times the last steps "
                         "of a single call (long outputs, where two calls do not fit the time)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="eager methods only: after a cold call of each, R rounds calling every method once in turn; "
                         "the median round is reported (the host's drift falls on all methods alike)")
    ap.add_argument("--stop-after", type=int, default=0,
                    help="end each generate call after this many tokens while the caches stay sized for --new "
                         "(a step whose KV is fixed-size costs the same at token 2,048 as at 8,192; the table's "
                         "per-block medians show whether it is flat)")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and short run (any device)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/generate"), help="output path stem")
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompt, args.new, args.window, args.budget, args.recent, args.snap_budget = 64, 48, 8, 16, 8, 32
        if args.batches == "1,8,32":
            args.batches = "1,2"
    if args.stop_after and not args.window < args.stop_after <= args.new:
        ap.error(f"--stop-after must be above --window ({args.window}) and at most --new ({args.new}); got {args.stop_after}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1; got {args.rounds}")
    traced = [m.strip() for m in args.methods.split(",") if compiled(m.strip())]
    if args.rounds > 1 and (traced or args.calls != 2):
        ap.error("--rounds interleaves warm calls of eager methods: calling compiled methods in turn would recompile "
                 f"between calls ({', '.join(traced) or 'none here'}), and it needs --calls 2; time those with --rounds 1")
    result = run(args, on_row=lambda partial: write_outputs(partial, args.out, markdown, lambda *_: False))
    write_outputs(result, args.out, markdown, plot)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
