"""Greedy generation on testbed examples under a given KV cache: item accuracy and KV footprint.

:func:`evaluate_caches` runs ``model.generate`` (greedy, batched, left padding) on fresh
examples with whatever cache ``make_cache`` builds for each batch, scores every item by exact
match (:func:`~.task.score`), and records the cache's footprint with
:func:`scope_kv.accounting.kv_footprint` after the last step and at its peak over the steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import compat
from ..accounting import kv_footprint
from .task import DEFAULT_MIX, TRAINED, Example, Mix, make_example, output_length, score
from .tokenizer import EOS, PAD

logger = logging.getLogger(__name__)

__all__ = ["CacheFactory", "SeedResult", "TestbedResult", "evaluate_caches", "generate_outputs"]

CacheFactory = Callable[[Any, torch.Tensor], Any]
"""``make_cache(model, prompt_ids) -> cache or None``; ``prompt_ids`` is the batch's
left-padded ``(B, P)`` prompt; ``None`` lets ``generate`` build transformers' default cache."""


@dataclass(frozen=True)
class SeedResult:
    """One example's outcome.

    Attributes
    ----------
    seed : int
    correct : tuple[bool, ...]
        Per item, in output order.
    generated : str
        The decoded output (up to ``</s>``).
    new_tokens : int
        Tokens generated (``</s>`` included, padding after it excluded).
    entries : tuple[int, ...]
        Entries the cache held per layer after the last step (per batch row and KV head).
    peak_entries : int
        Largest total over layers of held entries, over the steps.
    held_bytes : int
        Bytes of the held entries after the last step, for this row (the batch's held bytes
        divided by its rows).
    peak_allocated_bytes : int
        Largest allocated K/V storage over the steps, for this row.
    seconds : float
        Wall time of the batch's ``generate`` call (shared by its rows).
    kinds : tuple[str, ...]
        Per item, how its source was drawn (one of :data:`~.task.KINDS`: a prompt fact, a value
        written a few items back, or one written far back).
    """

    seed: int
    correct: tuple[bool, ...]
    generated: str
    new_tokens: int
    entries: tuple[int, ...]
    peak_entries: int
    held_bytes: int
    peak_allocated_bytes: int
    seconds: float
    kinds: tuple[str, ...] = ()

    @property
    def accuracy(self) -> float:
        """Fraction of items answered exactly."""
        return float(np.mean(self.correct)) if self.correct else 0.0


@dataclass(frozen=True)
class TestbedResult:
    """Outcome over several seeds (same lengths).

    Attributes
    ----------
    n_bindings, n_items : int
    seeds : tuple[SeedResult, ...]
    """

    __test__ = False  # not a pytest class

    n_bindings: int
    n_items: int
    seeds: tuple[SeedResult, ...]

    @property
    def correct(self) -> np.ndarray:
        """``(n_seeds, n_items)`` bool."""
        return np.array([s.correct for s in self.seeds], dtype=bool).reshape(len(self.seeds), self.n_items)

    @property
    def accuracy(self) -> float:
        """Item accuracy over every seed and item."""
        return float(self.correct.mean()) if self.seeds else 0.0

    @property
    def accuracy_by_position(self) -> np.ndarray:
        """``(n_items,)`` accuracy of each output position over the seeds."""
        return self.correct.mean(axis=0)

    @property
    def mean_entries(self) -> float:
        """Mean over seeds of the total entries held after the last step (summed over layers)."""
        return float(np.mean([sum(s.entries) for s in self.seeds])) if self.seeds else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (per-seed correctness included)."""
        return {
            "n_bindings": self.n_bindings,
            "n_items": self.n_items,
            "accuracy": self.accuracy,
            "mean_entries": self.mean_entries,
            "seeds": [
                {
                    "seed": s.seed,
                    "accuracy": s.accuracy,
                    "correct": [int(c) for c in s.correct],
                    "new_tokens": s.new_tokens,
                    "entries": list(s.entries),
                    "peak_entries": s.peak_entries,
                    "held_bytes": s.held_bytes,
                    "peak_allocated_bytes": s.peak_allocated_bytes,
                    "seconds": s.seconds,
                }
                for s in self.seeds
            ],
        }


class _PeakFootprint:
    """Forward hook recording the largest footprint of the cache passed to each forward."""

    def __init__(self) -> None:
        self.entries = 0
        self.allocated = 0

    def __call__(self, module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        cache = compat.cache_argument(kwargs)
        if cache is None:
            cache = compat.output_cache(output)
        if cache is None or not hasattr(cache, "layers"):
            return
        fp = kv_footprint(cache)
        self.entries = max(self.entries, fp.total_entries)
        self.allocated = max(self.allocated, fp.allocated_bytes)


def generate_outputs(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    make_cache: CacheFactory | None = None,
    *,
    max_new_tokens: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> tuple[list[str], list[int], Any, _PeakFootprint, float]:
    """Greedy outputs for one batch of examples (one ``generate`` call).

    Parameters
    ----------
    model : LlamaForCausalLM
    tokenizer : PreTrainedTokenizerFast
        Left padding.
    examples : Sequence[Example]
        The batch (``B`` rows).
    make_cache : CacheFactory, optional
    max_new_tokens : int, optional
        The longest gold output (``</s>`` included) by default.
    generate_kwargs : dict, optional
        More arguments for ``model.generate`` (e.g. ``min_new_tokens``).

    Returns
    -------
    texts : list[str]
        Decoded outputs, cut at ``</s>``.
    new_tokens : list[int]
        Tokens generated per row (``</s>`` included).
    cache : transformers.Cache
        The cache after the last step.
    peak : _PeakFootprint
        Largest total entries / allocated bytes seen over the steps (whole batch).
    seconds : float
    """
    device = next(model.parameters()).device
    enc = tokenizer([ex.prompt for ex in examples], return_tensors="pt", padding=True)
    input_ids = enc["input_ids"].to(device)  # (B, P)
    attention_mask = enc["attention_mask"].to(device)  # (B, P)
    if max_new_tokens is None:
        max_new_tokens = max(output_length(ex.n_items) for ex in examples)
    cache = make_cache(model, input_ids) if make_cache is not None else None
    peak = _PeakFootprint()
    handle = model.register_forward_hook(peak, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                **compat.cache_kwargs(cache),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=PAD,
                return_dict_in_generate=True,
                **(generate_kwargs or {}),
            )
    finally:
        handle.remove()
    seconds = time.perf_counter() - t0
    gen = out.sequences[:, input_ids.shape[1] :].cpu()  # (B, T)
    texts, lengths = [], []
    for row in gen.tolist():
        n = row.index(EOS) + 1 if EOS in row else len(row)
        lengths.append(n)
        texts.append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return texts, lengths, compat.output_cache(out), peak, seconds


def evaluate_caches(
    model: Any,
    tokenizer: Any,
    seeds: Iterable[int],
    make_cache: CacheFactory | None = None,
    *,
    n_bindings: int = TRAINED.n_bindings,
    n_items: int = TRAINED.n_items,
    mix: Mix = DEFAULT_MIX,
    batch_size: int = 8,
    max_new_tokens: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> TestbedResult:
    """Greedy item accuracy and KV footprint of one cache method over ``seeds``.

    Parameters
    ----------
    model : LlamaForCausalLM
        E.g. from :func:`~.model.load_testbed`.
    tokenizer : PreTrainedTokenizerFast
        Left padding and a pad token (``load_testbed`` sets both).
    seeds : Iterable[int]
        One example per seed (:func:`~.task.make_example`).
    make_cache : CacheFactory, optional
        Builds the cache of each batch; ``None`` for transformers' default (``DynamicCache``).
        E.g. ``lambda model, ids: ScopeCache(model, decoding=Slide(256, 128))``.
    n_bindings, n_items : int
        Example lengths.
    mix : Mix
        Source mix of the examples.
    batch_size : int
        Rows per ``generate`` call.
    max_new_tokens : int, optional
        The gold output length by default (``6 n_items + 1``).
    generate_kwargs : dict, optional
        More arguments for ``model.generate``.

    Returns
    -------
    TestbedResult
    """
    if getattr(tokenizer, "padding_side", "left") != "left":
        raise ValueError("batched generation needs a left-padding tokenizer (tokenizer.padding_side = 'left')")
    seeds = [int(s) for s in seeds]
    results: list[SeedResult] = []
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        examples = [make_example(s, n_bindings, n_items, mix) for s in chunk]
        texts, lengths, cache, peak, seconds = generate_outputs(
            model, tokenizer, examples, make_cache, max_new_tokens=max_new_tokens, generate_kwargs=generate_kwargs
        )
        fp = kv_footprint(cache)
        rows = len(chunk)
        for ex, text, n in zip(examples, texts, lengths, strict=True):
            correct = tuple(score(ex, text))
            results.append(
                SeedResult(
                    seed=ex.seed,
                    correct=correct,
                    generated=text,
                    new_tokens=n,
                    entries=fp.entries,
                    peak_entries=peak.entries,
                    held_bytes=fp.held_bytes // rows,
                    peak_allocated_bytes=peak.allocated // rows,
                    seconds=seconds,
                    kinds=tuple(item.kind for item in ex.items),
                )
            )
        batch_acc = np.mean([np.mean(r.correct) for r in results[-rows:]])
        logger.info("seeds %s: item accuracy %.4f, %d entries held, %.1f s", chunk, batch_acc, sum(fp.entries), seconds)
    return TestbedResult(n_bindings=n_bindings, n_items=n_items, seeds=tuple(results))
