"""Gold-output teacher forcing: how likely each cache keeps the reference answer, token by token.

After a LongGenBench prompt, the output the prompt asks for (:func:`~scope_kv.eval.longgenbench.gold_output`:
every ``Answer_<n>:``, worked solution and ``The answer is N``, in order) is fed one token per
forward through each method's cache, exactly as decoding would feed its own tokens (positions
and attention mask as ``generate`` builds them), and at every gold token we record

* the NLL of the gold token under the method,
* ``KL(full || method)`` of the next-token distributions,
* whether the method's most likely token is the full cache's (top-1 agreement) and the gold one.

The full cache is the reference: one teacher-forced pass of prompt + gold (transformers'
``DynamicCache``, in chunks of positions) gives its NLL and distribution at every gold token at
once (:func:`full_reference`), so it is never stepped. The
**answer tokens** (those of each ``N`` after ``The answer is``) are reported apart: they are the
closest proxy of accuracy a teacher-forced run has. Unlike greedy generation, this measures
long outputs on a model that cannot solve the task itself, and every method sees the same
tokens.

All examples of a set run as one batch (prompts left-padded, references right-padded); a method
whose budget depends on the prompt's length (``prompt+N``) runs rows of one prompt length per
cache, or one batch with the longest prompt's budget (:attr:`GoldSettings.prompt_budget`). Per-token statistics stay on the device until the
pass ends. Methods are sharded over processes (:class:`~scope_kv.eval.common.Shard`), so
several processes can share one GPU.

Results: ``<out>/gold.jsonl`` (one line per example and method: means overall, per output
quarter and on answer tokens, sums binned by output position), ``<out>/gold_summary.csv``.
"""

from __future__ import annotations

from .data import REFERENCE, RESULTS, GoldBatch, GoldItem, GoldSettings, plan_tokens, prepare_gold
from .forcing import GoldReference, TokenStats, full_reference, teacher_force
from .harness import run_gold
from .records import method_family, summarize_gold

__all__ = [
    "REFERENCE",
    "RESULTS",
    "GoldBatch",
    "GoldItem",
    "GoldReference",
    "GoldSettings",
    "TokenStats",
    "full_reference",
    "method_family",
    "plan_tokens",
    "prepare_gold",
    "run_gold",
    "summarize_gold",
    "teacher_force",
]
