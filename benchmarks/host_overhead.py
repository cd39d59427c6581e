"""Host time of the selection call in an eager decode step (where eager selection time goes).

In eager decoding the GPU waits on the host whenever the host takes longer to issue a step's
kernels than the GPU takes to run them (benchmarks/NOTES.md: batch 8-32 on Llama-8B geometry).
Selection then costs what its *host* work costs. This script times, per call, the host side of
the pieces one layer's Slide selection runs (CUDA, Llama-3.1-8B layer shapes, a pool at budget),
with a plain torch launch for scale::

    python benchmarks/host_overhead.py --out benchmarks/results/host_overhead

Each row: ``calls`` calls issued back to back after a warm-up, ``host_us`` = host wall time per
call before the final synchronisation, ``gpu_us`` = CUDA-event time per call (when it is below
``host_us`` the GPU idles: the host is the limit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import transformers

from bench_common import LLAMA_8B, build_model, random_kv
from scope_kv import ScopeCache, Slide
from scope_kv.kernels import evict_one_
from scope_kv.testing import attend, load_state


def per_call(fn: Callable[[], None], calls: int) -> dict[str, float]:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    a.record()
    for _ in range(calls):
        fn()
    b.record()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return dict(host_us=host / calls * 1e6, gpu_us=a.elapsed_time(b) / calls * 1e3)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/host_overhead"))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("host_overhead.py times CUDA launches: run it on a GPU machine")
    dev = torch.device("cuda")
    geometry = dict(LLAMA_8B, num_hidden_layers=1)
    model = build_model(geometry, dev, torch.bfloat16)
    c = model.config
    b, heads, qh, dim = args.batch, c.num_key_value_heads, c.num_attention_heads, c.head_dim
    p, budget = args.prompt, args.budget
    cache = ScopeCache(model, decoding=Slide(budget, args.recent))
    layer = cache.layers[0]
    ref = next(model.parameters())
    # A Slide layer at budget, deep into a generation, through the layer's public load_state.
    shape = (b, heads, p + budget, dim)
    load_state(layer, random_kv(shape, ref), random_kv(shape, ref), prefill_length=p, seen=p + 4 * budget,
                     step=4 * budget)
    module = model.model.layers[0].self_attn
    query = random_kv((b, qh, 1, dim), ref)
    lse = torch.randn(b, qh, device=dev, dtype=torch.float32) + 10
    new_k, new_v = random_kv((b, heads, 1, dim), ref), random_kv((b, heads, 1, dim), ref)
    ring = torch.zeros(b, heads, dtype=torch.int32, device=dev)
    out = torch.empty(b, heads, dtype=torch.long, device=dev)
    tiny = torch.zeros(16, device=dev)
    end = p + budget + 1

    def decode_step() -> None:
        # One Slide step at budget: the step's entry is appended (the pool holds budget + 1), the
        # attention's record is handed over, one entry goes (the layer is at budget again).
        layer.update(new_k, new_v)
        attend(layer, module, query, scaling=dim**-0.5, lse=lse)

    def device_switch() -> None:
        with torch.cuda.device(dev):
            pass

    cases = {
        "torch launch (tensor.add_)": lambda: tiny.add_(1),
        "torch.cuda.device(...) enter/exit": device_switch,
        "evict_one_ (Triton), reused output": lambda: evict_one_(query, layer.keys, layer.values, lse, ring, p, end,
                                                                   args.recent, dim**-0.5, out=out),
        "evict_one_ (Triton), fresh output": lambda: evict_one_(query, layer.keys, layer.values, lse, ring, p, end,
                                                                  args.recent, dim**-0.5),
        "evict_one_reference_ (plain torch)": lambda: evict_one_(query, layer.keys, layer.values, lse, ring, p, end,
                                                                   args.recent, dim**-0.5, use_triton=False),
        "ScopeLayer.update + after_attention (Slide at budget)": decode_step,
    }
    rows = []
    with torch.inference_mode():
        for name, fn in cases.items():
            try:
                r = per_call(fn, args.calls)
            except Exception as exc:  # recorded; the other cases still run
                rows.append(dict(case=name, error=f"{type(exc).__name__}: {exc}"[:300]))
                print(f"{name:>46}: {rows[-1]['error']}", flush=True)
                continue
            rows.append(dict(case=name, **r))
            print(f"{name:>46}: host {r['host_us']:8.1f} us/call, GPU {r['gpu_us']:8.1f} us/call", flush=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    result = dict(rows=rows, settings=vars(args) | dict(out=str(args.out)),
                  env=dict(torch=torch.__version__, transformers=transformers.__version__, triton=triton_version,
                           device=torch.cuda.get_device_name(), command=" ".join(sys.argv)))
    lines = [f"# Host time per call ({result['env']['device']}, torch {torch.__version__}, triton {triton_version})", "",
             f"batch {b}, {heads} KV heads, {qh} query heads, dim {dim}, pool {p} + {budget}; {args.calls} calls; "
             f"command `{result['env']['command']}`.", "", "| call | host us/call | GPU us/call |", "| --- | --- | --- |"]
    lines += [f"| {r['case']} | {r['host_us']:.1f} | {r['gpu_us']:.1f} |" if "error" not in r
              else f"| {r['case']} | {r['error']} | - |" for r in rows]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
