"""Where a decode step's time goes: torch.profiler over real ``model.generate`` calls.

For each method of ``benchmarks/generate.py`` (same model, prompt and cache settings) this runs
the identical ``generate`` call twice: the first pays compilation and capture, the second is
profiled. A logits processor advances the profiler once per generated token, so the profiler's
active window is ``--active`` whole decode steps near the end of the call (the pool is at budget
there). Kernels launched from CUDA graphs are recorded too.

Per method it reports: the step time (CUDA events, as generate.py), GPU kernel time per step,
kernels per step, the idle share (step time not covered by kernels: host stalls and launch gaps),
and the kernels sorted by time per step, with the top CPU-side operators for the eager methods.

    python benchmarks/profile_decode.py --methods static-compiled,captured-slide,scope-slide,dynamic \
        --batch 1 --out benchmarks/results/profile_h100_b1
    python benchmarks/profile_decode.py --smoke     # tiny model, CPU or GPU: the script runs

``--python`` profiles the second call with Python's own profiler instead: the host time a step
spends in each Python function (self and total, per step), and per package (scope_kv,
transformers, torch, builtins), for eager steps that the host, not the GPU, paces.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from torch.profiler import ProfilerActivity, profile, schedule
from transformers import LogitsProcessor, LogitsProcessorList

from bench_common import LLAMA_8B, TINY, build_model, fmt, median
from generate import ALL_METHODS, StepClock, _generate_kwargs, compiled


class ProfilerStep(LogitsProcessor):
    """Advances a torch profiler once per generated token."""

    def __init__(self, prof: profile) -> None:
        self.prof = prof

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.prof.step()
        return scores


def _generate(model, method: str, ids: torch.Tensor, args: argparse.Namespace, extra: list[Any],
              kwargs: dict[str, Any] | None = None) -> list[float]:
    clock = StepClock(ids.device)
    if kwargs is None:
        kwargs = _generate_kwargs(model, method, args)
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                   min_new_tokens=args.new, do_sample=False, pad_token_id=0,
                   logits_processor=LogitsProcessorList([clock, *extra]), **kwargs)
    return clock.step_ms()


def _cold_call(model, method: str, ids: torch.Tensor, args: argparse.Namespace) -> None:
    """The first of the two identical calls: it pays compilation, capture and cuDNN plans."""
    if compiled(method):
        torch._dynamo.reset()
    _generate(model, method, ids, args, [])


def profile_method(model, method: str, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    cuda = ids.device.type == "cuda"
    _cold_call(model, method, ids, args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    wait = max(args.new - args.active - 8, 1)
    with profile(activities=activities, schedule=schedule(wait=wait, warmup=4, active=args.active)) as prof:
        steps = _generate(model, method, ids, args, [ProfilerStep(prof)])
    step_ms = median(steps[-args.active - 4:])
    events = prof.key_averages()
    kernels = []
    for e in events:
        device_us = getattr(e, "self_device_time_total", 0.0) or 0.0
        if cuda and device_us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels.append(dict(name=e.key[:160], us_per_step=device_us / args.active, calls_per_step=e.count / args.active))
    cpu_ops = sorted(
        (dict(name=e.key[:120], us_per_step=e.self_cpu_time_total / args.active, calls_per_step=e.count / args.active)
         for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.self_cpu_time_total > 0),
        key=lambda k: -k["us_per_step"])
    row = dict(method=method, batch=int(ids.shape[0]), step_ms=round(step_ms, 3), kernels=kernels, cpu_ops=cpu_ops[: args.top])
    return summarise(row, args.top)


def _package(filename: str) -> str:
    """Which package a profiled function belongs to (by its file)."""
    path = filename.replace("\\", "/")
    if path == "~" or path.startswith("<"):
        return "builtins"
    for package in ("scope_kv", "transformers", "torch"):
        if f"/{package}/" in path:
            return package
    return "other"


def python_profile(model, method: str, ids: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    """Python's profiler over the second identical call: host time per step by function and package."""
    _cold_call(model, method, ids, args)
    kwargs = _generate_kwargs(model, method, args)  # the cache is built outside the profiled call
    profiler = cProfile.Profile()
    profiler.enable()
    steps = _generate(model, method, ids, args, [], kwargs)
    profiler.disable()
    tokens = len(steps) + 1
    functions, packages = [], {}
    for (filename, line, name), (_, calls, self_s, total_s, _) in pstats.Stats(profiler).stats.items():  # type: ignore[attr-defined]
        package = _package(filename)
        packages[package] = packages.get(package, 0.0) + self_s * 1e6 / tokens
        short = filename.replace("\\", "/").rsplit("/site-packages/", 1)[-1].rsplit("/src/", 1)[-1]
        functions.append(dict(name=f"{short}:{line}({name})", package=package, calls_per_step=calls / tokens,
                              self_us_per_step=self_s * 1e6 / tokens, total_us_per_step=total_s * 1e6 / tokens))
    functions.sort(key=lambda f: -f["self_us_per_step"])
    return dict(method=method, batch=int(ids.shape[0]), step_ms=round(median(steps[-64:]), 3), profiler="python",
                self_us_per_step_by_package={k: round(v, 1) for k, v in sorted(packages.items(), key=lambda kv: -kv[1])},
                functions=functions[: args.top])


def summarise(row: dict[str, Any], top: int) -> dict[str, Any]:
    """Totals over a row's kernels, then the ``top`` of them. The profiler's step markers
    (``ProfilerStep*``) carry a device time of their own, the whole step, and are not kernels."""
    kernels = sorted((k for k in row["kernels"] if not k["name"].startswith("ProfilerStep")), key=lambda k: -k["us_per_step"])
    kernel_ms = sum(k["us_per_step"] for k in kernels) / 1e3
    step_ms = row["step_ms"]
    return dict(row, kernel_ms_per_step=round(kernel_ms, 3), kernels_per_step=round(sum(k["calls_per_step"] for k in kernels), 1),
                idle_share=round(1 - kernel_ms / step_ms, 3) if kernels and step_ms else None, kernels=kernels[:top])


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Decode-step profile ({result['env']['device']}, torch {result['env']['torch']}, "
             f"transformers {result['env']['transformers']})", "",
             f"Prompt {s['prompt']}, {s['new']} new tokens, batch {s['batch']}, budget {s['budget']}/{s['recent']}; "
             f"{s['active']} profiled steps near the end of the second identical `generate` call. "
             f"Command: `{result['env']['command']}`.", "",
             "| method | ms/step | kernel ms/step | kernels/step | idle share |", "| --- | --- | --- | --- | --- |"]
    if s.get("python"):
        return _python_markdown(result, lines[:2])
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['error']} | | | |")
            continue
        lines.append(f"| {r['method']} | {fmt(r['step_ms'], '.2f')} | {fmt(r['kernel_ms_per_step'], '.2f')} | "
                     f"{fmt(r['kernels_per_step'], '.0f')} | {fmt(r['idle_share'], '.2f')} |")
    for r in result["rows"]:
        if "error" in r:
            continue
        lines += ["", f"## {r['method']}: kernels by time per step", "", "| kernel | µs/step | calls/step |", "| --- | --- | --- |"]
        lines += [f"| `{k['name'][:100]}` | {k['us_per_step']:.1f} | {k['calls_per_step']:.1f} |" for k in r["kernels"]]
        lines += ["", f"## {r['method']}: host operators by self time per step", "", "| operator | µs/step | calls/step |",
                  "| --- | --- | --- |"]
        lines += [f"| `{k['name'][:100]}` | {k['us_per_step']:.1f} | {k['calls_per_step']:.1f} |" for k in r["cpu_ops"][:15]]
    return "\n".join(lines) + "\n"


def _python_markdown(result: dict[str, Any], head: list[str]) -> str:
    s = result["settings"]
    lines = head + [f"Prompt {s['prompt']}, {s['new']} new tokens, batch {s['batch']}, budget {s['budget']}/{s['recent']}; "
                    "Python's profiler over the whole second identical `generate` call (the profiler slows every "
                    "Python call alike: compare methods, not absolute times). Command: "
                    f"`{result['env']['command']}`.", "",
                    "| method | ms/step (profiled) | " + " | ".join(f"{p} µs/step" for p in _PACKAGES) + " |",
                    "| --- | --- | " + " | ".join("---" for _ in _PACKAGES) + " |"]
    rows = [r for r in result["rows"] if "error" not in r]
    for r in rows:
        by = r["self_us_per_step_by_package"]
        lines.append(f"| {r['method']} | {fmt(r['step_ms'], '.2f')} | " + " | ".join(f"{by.get(p, 0.0):.0f}" for p in _PACKAGES) + " |")
    for r in rows:
        lines += ["", f"## {r['method']}: Python functions by self time per step", "",
                  "| function | self µs/step | total µs/step | calls/step |", "| --- | --- | --- | --- |"]
        lines += [f"| `{f['name'][:110]}` | {f['self_us_per_step']:.1f} | {f['total_us_per_step']:.1f} | {f['calls_per_step']:.1f} |"
                  for f in r["functions"][:30]]
    return "\n".join(lines) + "\n"


_PACKAGES = ("scope_kv", "transformers", "torch", "builtins", "other")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default="static-compiled,captured-slide,scope-slide,dynamic",
                    help="comma-separated, from: " + ", ".join(ALL_METHODS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--new", type=int, default=640)
    ap.add_argument("--active", type=int, default=16, help="profiled decode steps")
    ap.add_argument("--top", type=int, default=40, help="kernels and operators kept per method")
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--snap-budget", type=int, default=2048)
    ap.add_argument("--compile-backend", default="inductor", choices=["cudagraphs", "inductor"])
    ap.add_argument("--python", action="store_true",
                    help="Python's profiler instead of torch's: host time per step by function and package")
    ap.add_argument("--smoke", action="store_true", help="a tiny model and short run (any device)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/profile"), help="output path stem")
    args = ap.parse_args(argv)
    if args.smoke:
        args.prompt, args.new, args.active, args.budget, args.recent, args.snap_budget = 64, 40, 4, 16, 8, 32
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(TINY if args.smoke else LLAMA_8B, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), device=device)
    env = dict(torch=torch.__version__, transformers=transformers.__version__,
               device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", command=" ".join(sys.argv))
    result: dict[str, Any] = dict(rows=[], env=env, settings={k: v for k, v in vars(args).items() if k != "out"})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for method in methods:
        try:
            row = (python_profile if args.python else profile_method)(model, method, ids, args)
        except torch.cuda.OutOfMemoryError as exc:
            row = dict(method=method, error=f"OOM: {exc}"[:200])
        result["rows"].append(row)
        detail = (f"Python self µs/step by package {row.get('self_us_per_step_by_package')}" if args.python else
                  f"kernels {fmt(row.get('kernel_ms_per_step'), '.2f')} ms in {fmt(row.get('kernels_per_step'), '.0f')} launches")
        print(f"{method:>24}: {fmt(row.get('step_ms'), '.2f')} ms/step, {detail}", flush=True)
        # written after every method, so that a call cut short keeps what it measured
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
