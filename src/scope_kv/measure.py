"""Measured generation, shared by ``scope-kv demo --smollm2``, ``examples/quickstart.py``, the CPU
benchmark and the real-model tests.

:func:`gsm8k_prompt` (a LongGenBench prompt cut to a token budget, built by
:mod:`scope_kv.eval.longgenbench`), :func:`timed_generate` (greedy generation with prefill/decode
timing), :class:`LiveProgress` (a ``generate`` streamer showing tokens/s and KV memory while it
runs, and sampling the KV footprint after every token), :func:`memory_projection` (KV bytes of
longer answers, from the pool sizes) and :func:`plot_kv_over_tokens`. KV entries and bytes come
from :mod:`scope_kv.accounting`.
"""

from __future__ import annotations

import math
import os
import pathlib
import sys
import time
from dataclasses import dataclass
from typing import IO, Any

import torch
from transformers.generation.streamers import BaseStreamer

from .accounting import bytes_per_entry, kv_footprint
from .compat import cache_kwargs
from .decoding import Slide
from .eval.longgenbench import build_prompt, encode_prompt, fit_to_tokens, load_examples

__all__ = [
    "GenerationRun",
    "KVSample",
    "LiveProgress",
    "LongGenPrompt",
    "MemoryRow",
    "format_duration",
    "format_mib",
    "gsm8k_prompt",
    "kv_held",
    "memory_projection",
    "plot_kv_over_tokens",
    "timed_generate",
]


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
                parts.append(f"~{format_duration((self.total - n) / speed)} left")
        else:
            parts.append(f"prefill {self.stamps[1] - self.stamps[0]:.1f} s")
        if self.samples:
            parts.append(f"KV {format_mib(self.samples[-1].allocated_bytes)}")
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


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min"


def format_mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.2f} MiB"


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
