"""What scope_kv's routing costs another cache: DynamicCache on a model a ScopeCache switched.

Building a ScopeCache switches the model to ``scope_<backend>`` and puts a forward pre-hook on
every attention module (scope_kv.attention). For any other cache both pass through, token for
token, but each layer of each step still runs torch's hooked call path and the pass-through
function. This script times eager DynamicCache decode steps on a thin many-layer model (CPU,
float32, tiny widths: host time, not arithmetic) with the model *routed* (a ScopeCache was
built on it) and *stock* (:func:`scope_kv.attention.disable_scope_attention`), in interleaved
pairs so that the host's drift falls on both alike::

    python benchmarks/passthrough_cpu.py --out benchmarks/results/passthrough_cpu

A step's time is the difference of two ``generate`` calls that differ only in their number of new
tokens, divided by that difference. The table gives each side's median and the median of the
paired differences per layer, and the Python calls a step makes on each side (Python's profiler,
the same difference of two calls), which do not drift as times do.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from bench_common import TINY, build_model, python_calls, write_outputs
from scope_kv import ScopeCache
from scope_kv.attention import disable_scope_attention
from scope_kv.compat import cache_kwargs


def _step_ms(model, ids: torch.Tensor, short: int, long: int) -> float:
    def call(new: int) -> float:
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       **cache_kwargs(DynamicCache(config=model.config)))
        return time.perf_counter() - start

    return (call(long) - call(short)) / (long - short) * 1e3


def _calls_per_step(model, ids: torch.Tensor, short: int, long: int) -> tuple[float, float]:
    """(Python calls, calls into scope_kv) per decode step."""

    def calls(new: int) -> tuple[int, int]:
        return python_calls(model, ids, new, **cache_kwargs(DynamicCache(config=model.config)))

    (a, a_ours), (b, b_ours) = calls(short), calls(long)
    return (b - a) / (long - short), (b_ours - a_ours) / (long - short)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_model({**TINY, "num_hidden_layers": args.layers}, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, TINY["vocab_size"], (args.batch, args.prompt))
    _step_ms(model, ids, 2, 4)  # warm-up: lazy imports, first-call caches
    stock, routed = [], []
    for _ in range(args.pairs):
        disable_scope_attention(model)
        stock.append(_step_ms(model, ids, args.short, args.new))
        ScopeCache(model)  # switches the model and installs the routing hooks
        routed.append(_step_ms(model, ids, args.short, args.new))
    per_layer = [(r - s) * 1e3 / args.layers for s, r in zip(stock, routed, strict=True)]
    routed_calls = _calls_per_step(model, ids, args.short, args.new)  # (the model is routed here)
    disable_scope_attention(model)
    stock_calls = _calls_per_step(model, ids, args.short, args.new)
    return dict(
        calls_per_step=dict(stock=stock_calls[0], routed=routed_calls[0]),
        scope_kv_calls_per_step=dict(stock=stock_calls[1], routed=routed_calls[1]),
        extra_calls_per_layer=(routed_calls[0] - stock_calls[0]) / args.layers,
        stock_ms=statistics.median(stock),
        routed_ms=statistics.median(routed),
        extra_us_per_layer=statistics.median(per_layer),
        pairs=dict(stock_ms=stock, routed_ms=routed),
        settings=vars(args) | {"out": str(args.out)},
        env=dict(torch=torch.__version__, transformers=transformers.__version__, python=sys.version.split()[0],
                 command="passthrough_cpu.py " + " ".join(sys.argv[1:])),
    )


def markdown(result: dict[str, Any]) -> str:
    s, env = result["settings"], result["env"]
    calls, ours = result["calls_per_step"], result["scope_kv_calls_per_step"]
    return "\n".join([
        f"# DynamicCache on a routed model (CPU; Python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']})",
        "",
        f"{s['layers']} layers of width {TINY['hidden_size']}, batch {s['batch']}, prompt {s['prompt']}; per step = "
        f"difference of {s['new']}- and {s['short']}-token generate calls; {s['pairs']} interleaved pairs. "
        f"Command: `{env['command']}`.",
        "",
        "| model | ms/step (median) | Python calls/step | of them into scope_kv |",
        "| --- | ---: | ---: | ---: |",
        f"| stock (`disable_scope_attention`) | {result['stock_ms']:.3f} | {calls['stock']:.0f} "
        f"| {ours['stock']:.0f} |",
        f"| routed (a ScopeCache was built on it) | {result['routed_ms']:.3f} | {calls['routed']:.0f} "
        f"| {ours['routed']:.0f} |",
        "",
        f"Median of the paired differences: **{result['extra_us_per_layer']:.1f} µs a layer**; "
        f"{result['extra_calls_per_layer']:.1f} more Python calls a layer.",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--short", type=int, default=24)
    ap.add_argument("--new", type=int, default=104)
    ap.add_argument("--pairs", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/passthrough_cpu"))
    args = ap.parse_args(argv)
    if args.new <= args.short:
        raise SystemExit(f"--new ({args.new}) must exceed --short ({args.short})")
    result = run(args)
    print(markdown(result))
    write_outputs(result, args.out, markdown, lambda result, path: False)  # (a table, no plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
