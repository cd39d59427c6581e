"""Python calls an eager decode step makes, per cache (what eager decoding's host time is made of).

At small batches an eager decode step is bound by the host: the GPU waits while Python issues
the step's kernels (benchmarks/NOTES.md, "Eager ScopeCache against DynamicCache"). Wall time on
a busy host is noisy; the number of Python-level calls a step makes is not. This script counts
them with Python's profiler on a thin many-layer model (CPU, float32, tiny widths, so the counts
and not the arithmetic matter), per decode step, for DynamicCache and ScopeCache::

    python benchmarks/host_calls.py --out benchmarks/results/host_calls

Each row: every profiled call per step (functions, builtins and tensor methods alike), the
calls into scope_kv's own code, and the calls per layer above DynamicCache's. A step's count is
the difference between two ``generate`` calls that differ only in their number of new tokens,
divided by that difference: prefill, cache construction and generate's set-up cancel out.
``scope-slide`` at ``--budget`` below ``--new`` evicts every step; ``scope-slide/no-eviction``
has a budget above the output (it stores, attends and plans, but never selects). The grouped
decode attention is switched on as on a GPU (``fast_decode``); on the CPU it runs its plain-torch
reference, so its rows count that reference's few extra tensor calls too. Likewise Slide's
evicting step runs the plain-torch eviction on the CPU (most of what its row adds over the
no-eviction row), where a GPU queues every layer's eviction into one launch a step: that column
overstates the GPU's path.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from bench_common import TINY, build_model, python_calls
from scope_kv import ScopeCache, Slide
from scope_kv.attention import disable_scope_attention

METHODS = ("dynamic", "scope-none", "scope-slide/no-eviction", "scope-slide")


def _cache(model, method: str, args: argparse.Namespace) -> Any:
    if method == "dynamic":
        disable_scope_attention(model)  # the stock attention, whichever method ran before
        return DynamicCache(config=model.config)
    if method == "scope-none":
        cache = ScopeCache(model)
    else:
        budget = 2 * args.new if method == "scope-slide/no-eviction" else args.budget
        cache = ScopeCache(model, decoding=Slide(budget, args.recent))
    for layer in cache.layers:
        layer.fast_decode = True  # the GPU's decode path (here: its CPU reference)
    return cache


def _calls(model, method: str, ids: torch.Tensor, new: int, args: argparse.Namespace) -> tuple[int, int]:
    """(all calls, calls into scope_kv) of one generate call of ``new`` tokens, the cache built
    outside the profiled region."""
    return python_calls(model, ids, new, cache=_cache(model, method, args))


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = build_model({**TINY, "num_hidden_layers": args.layers}, torch.device("cpu"), torch.float32)
    ids = torch.randint(3, TINY["vocab_size"], (args.batch, args.prompt))
    short = args.budget + 2  # past the budget: the short call's steps evict too, so they cancel out
    if args.new <= short:
        raise SystemExit(f"--new must exceed --budget + 2 ({short}) so that both calls reach the evicting steps")
    rows = []
    for method in METHODS:
        _calls(model, method, ids, 2, args)  # warm-up: lazy imports, first-call caches
        long_total, long_ours = _calls(model, method, ids, args.new, args)
        short_total, short_ours = _calls(model, method, ids, short, args)
        steps = args.new - short
        rows.append(dict(method=method, calls_per_step=(long_total - short_total) / steps,
                         scope_kv_calls_per_step=(long_ours - short_ours) / steps))
    base = rows[0]["calls_per_step"]
    for row in rows:
        row["extra_per_layer"] = (row["calls_per_step"] - base) / args.layers
    return dict(rows=rows, settings=vars(args) | {"out": str(args.out)},
                env=dict(torch=torch.__version__, transformers=transformers.__version__,
                         python=sys.version.split()[0], command="host_calls.py " + " ".join(sys.argv[1:])))


def markdown(result: dict[str, Any]) -> str:
    s, env = result["settings"], result["env"]
    lines = [
        f"# Python calls per eager decode step (CPU; Python {env['python']}, torch {env['torch']}, "
        f"transformers {env['transformers']})",
        "",
        f"{s['layers']} layers of width {TINY['hidden_size']}, batch {s['batch']}, prompt {s['prompt']}, Slide budget "
        f"{s['budget']}/{s['recent']}; per step = difference of two generate calls. Command: `{env['command']}`.",
        "",
        "| method | calls/step | scope_kv calls/step | extra calls/layer vs DynamicCache |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['calls_per_step']:.0f} | {r['scope_kv_calls_per_step']:.0f} "
                     f"| {r['extra_per_layer']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--budget", type=int, default=16)
    ap.add_argument("--recent", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/host_calls"))
    args = ap.parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
