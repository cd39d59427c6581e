"""KV entries held by every method on SmolLM2-135M-Instruct with a LongGenBench GSM8K+ prompt.

For each method (full cache, SCOPE's three decoding strategies on the whole prompt, the four
prefill-only compressors, SCOPE over SnapKV / PyramidKV, the two unified baselines, and a
kvpress press through the adapter when kvpress is installed) this prefills the prompt, records
the KV entries held per layer and KV head right after prefill compression, greedily decodes a
fixed number of tokens (no early stop), and records the entries held at the end.

Settings: the paper's LongGenBench-4K setting (docs/method.md §2, §6) is prefill budget C = 2048,
decoding budget B = 512, recent r = 256, T = 4096 new tokens, SnapKV/PyramidKV window 8,
kernel 7, max pooling. Scaled here:

* the prefill budget to the prompt: C = round(2048 * P / P_full), where P is the prompt's
  length and P_full that of the full 30-question GSM8K+ prompt (C = 2048 with the full prompt;
  ``--questions K`` keeps K questions and shrinks C in proportion);
* the decoding side to the generation length T run here (4096 is hours on a CPU):
  B = 512 T / 4096, r = 256 T / 4096, so delta = (T - r) // (B - r) = 15 as in the paper.

    python benchmarks/prefill_methods.py                   # full prompt, 128 new tokens
    python benchmarks/prefill_methods.py --new-tokens 256 --questions 10
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import pathlib
import statistics
import sys
import time
import types
from typing import Any, Callable

import torch
import transformers

import scope_kv
from scope_kv import (
    H2O,
    Adaptive,
    Discontinuous,
    PyramidKV,
    ScopeCache,
    ScopeLayer,
    Slide,
    SnapKV,
    StreamingLLM,
    UnifiedH2O,
    UnifiedStreamingLLM,
)
from scope_kv.compat import cache_kwargs
from scope_kv.eval.longgenbench import build_prompt, load_examples, truncate_example
from scope_kv.models import load_smollm2

PAPER = dict(prefill=2048, budget=512, recent=256, new_tokens=4096)


def _kvpress_snapkv(ratio: float) -> Any | None:
    """kvpress's SnapKVPress, imported without kvpress's package __init__ (see tests/test_kvpress.py)."""
    if "kvpress" not in sys.modules:
        spec = importlib.util.find_spec("kvpress")
        if spec is None:
            return None
        package = types.ModuleType("kvpress")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kvpress"] = package
    module = importlib.import_module("kvpress.presses.snapkv_press")
    return module.SnapKVPress(compression_ratio=ratio, window_size=8, kernel_size=7)


def methods(prompt: int, prefill: int, budget: int, recent: int, new_tokens: int) -> dict[str, Callable[[Any], ScopeCache]]:
    snap = dict(window=8, kernel=7, pooling="max")
    out: dict[str, Callable[[Any], ScopeCache]] = {
        "full": lambda m: ScopeCache(m),
        "SCOPE slide": lambda m: ScopeCache(m, decoding=Slide(budget, recent)),
        "SCOPE adaptive": lambda m: ScopeCache(m, decoding=Adaptive(budget, recent, max_new_tokens=new_tokens)),
        "SCOPE discontinuous": lambda m: ScopeCache(m, decoding=Discontinuous(budget, recent, max_new_tokens=new_tokens)),
        "SnapKV": lambda m: ScopeCache(m, prefill=SnapKV(prefill, **snap)),
        "PyramidKV": lambda m: ScopeCache(m, prefill=PyramidKV(prefill, beta=20, **snap)),
        "H2O (prefill)": lambda m: ScopeCache(m, prefill=H2O(prefill, recent=8)),
        "StreamingLLM (prefill)": lambda m: ScopeCache(m, prefill=StreamingLLM(prefill, sinks=4)),
        "SnapKV + SCOPE slide": lambda m: ScopeCache(m, prefill=SnapKV(prefill, **snap), decoding=Slide(budget, recent)),
        "PyramidKV + SCOPE adaptive": lambda m: ScopeCache(
            m, prefill=PyramidKV(prefill, beta=20, **snap), decoding=Adaptive(budget, recent, max_new_tokens=new_tokens)
        ),
        "unified H2O": lambda m: ScopeCache(m, decoding=UnifiedH2O(prefill + budget, recent)),
        "unified StreamingLLM": lambda m: ScopeCache(m, decoding=UnifiedStreamingLLM(prefill + budget, recent)),
    }
    press = _kvpress_snapkv(1 - prefill / prompt)
    if press is not None:
        from scope_kv.integrations.kvpress import KVPressPrefill

        out["kvpress SnapKVPress + SCOPE slide"] = lambda m: ScopeCache(
            m, prefill=KVPressPrefill(press, budget=prefill), decoding=Slide(budget, recent)
        )
    return out


def held(cache: ScopeCache) -> dict[str, float]:
    """Entries held per layer and KV head (valid entries; pads/filler excluded), over layers."""
    counts = []
    for layer in cache.layers:
        if isinstance(layer, ScopeLayer):
            start = 0 if layer.start is None else int(layer.start.max())
            counts.append(layer.length - start)
    return {"mean": statistics.fmean(counts), "min": min(counts), "max": max(counts)}


def run(model: Any, ids: torch.Tensor, make: Callable[[Any], ScopeCache], new_tokens: int) -> dict[str, Any]:
    cache = make(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(input_ids=ids, **cache_kwargs(cache))
        cache.finish_prefill()  # what the first decoding step would do; measured before it
        after_prefill = held(cache)
        t1 = time.perf_counter()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(new_tokens - 1):
            out = model(input_ids=token, **cache_kwargs(cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    t2 = time.perf_counter()
    return {
        "cache": repr(cache),
        "after_prefill": after_prefill,
        "at_end": held(cache),
        "seen": cache.get_seq_length(),
        "bytes_at_end": cache.nbytes(),
        "prefill_s": round(t1 - t0, 2),
        "decode_tok_s": round((new_tokens - 1) / (t2 - t1), 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per method (forced)")
    parser.add_argument("--questions", type=int, default=None, help="keep only the first K questions of the prompt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" / "prefill_methods.json"))
    parser.add_argument("--only", action="append", default=None, metavar="METHOD",
                        help="run only this method (repeatable) and replace its row in an existing --out")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_smollm2()
    example = load_examples("gsm8k", limit=1)[0]

    def encode(ex: Any) -> torch.Tensor:
        return tokenizer(build_prompt(ex, tokenizer), return_tensors="pt", add_special_tokens=False).input_ids

    full_prompt = encode(example).shape[1]
    if args.questions is not None:
        example = truncate_example(example, args.questions)
    ids = encode(example)
    prompt = ids.shape[1]
    scale = args.new_tokens / PAPER["new_tokens"]
    prefill = round(PAPER["prefill"] * prompt / full_prompt)
    budget, recent = round(PAPER["budget"] * scale), round(PAPER["recent"] * scale)
    settings = dict(prompt_tokens=prompt, full_prompt_tokens=full_prompt, new_tokens=args.new_tokens,
                    prefill_budget=prefill, decoding_budget=budget, recent=recent,
                    delta=(args.new_tokens - recent) // (budget - recent))

    out = pathlib.Path(args.out)
    rows = []
    if args.only:
        previous = json.loads(out.read_text())
        if previous["settings"] != settings:
            raise SystemExit(f"--only: {out} was measured with other settings ({previous['settings']}); rerun all methods.")
        rows = previous["rows"]
    for name, make in methods(prompt, prefill, budget, recent, args.new_tokens).items():
        if args.only and name not in args.only:
            continue
        result = {"method": name, **run(model, ids, make, args.new_tokens)}
        rows = [result if row["method"] == name else row for row in rows] if args.only else rows + [result]
        print(f"done: {name}", file=sys.stderr, flush=True)

    lines = [
        f"SmolLM2-135M-Instruct, LongGenBench GSM8K+ example 0: prompt {prompt} tokens, {args.new_tokens} new tokens; "
        f"C={prefill}, B={budget}, r={recent}, delta={settings['delta']} (paper C=2048, B=512, r=256, T=4096, scaled)",
        "",
        "| method | KV entries after prefill (mean / min-max over layers) | KV entries at end | bytes at end | decode tok/s |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        a, e = row["after_prefill"], row["at_end"]
        lines.append(
            f"| {row['method']} | {a['mean']:.0f} ({a['min']}-{a['max']}) | {e['mean']:.0f} ({e['min']}-{e['max']}) | "
            f"{row['bytes_at_end'] / 2**20:.1f} MiB | {row['decode_tok_s']} |"
        )
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(torch=torch.__version__, transformers=transformers.__version__, scope_kv=scope_kv.__version__,
                threads=torch.get_num_threads())
    out.write_text(json.dumps({"settings": settings, "environment": info, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
