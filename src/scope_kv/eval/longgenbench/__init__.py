"""LongGenBench (docs/method.md §10): data, prompts, gold outputs and scoring.

A LongGenBench example packs K questions into one prompt after a few worked demos; the
model must answer them all, in order, in one long output, each answer opening with
``Answer_<n>:`` and closing with ``The answer is <X>``. The demos are numbered
``Question_1..m`` / ``Answer_1..m`` and the test questions continue at ``Question_<m+1>``,
so question ``j`` (0-based) of an example carries the label ``first_label + j``.

Everything that differs between the tasks (the shipped file, how a gold answer is read, how a
final answer is extracted and compared, how an original dataset row is read, and how the
reference output is written) is one :class:`TaskSpec` in :data:`TASKS`; adding a task is
adding one entry there.

Two scores per example:

* **label score** (ours): the answer under ``Answer_<n>`` is compared with question ``n``'s
  gold answer, whatever order the model wrote the answers in; a skipped answer costs one
  question.
* **position-paired score** (the research code's): the i-th answer block of the output is
  compared with the i-th gold answer, whatever its label; one skipped answer shifts every
  later one. Reported so numbers compare with published ones.
"""

from __future__ import annotations

from .build import build_examples, load_source_records, regroup, write_examples
from .examples import (
    Example,
    PromptSettings,
    build_prompt,
    encode_prompt,
    fit_to_tokens,
    instruction,
    load_examples,
    truncate_example,
    without_demos,
)
from .scoring import GoldOutput, QuestionVerdict, Score, extract_answer, gold_output, score_output
from .tasks import TASKS, TaskSpec, default_max_new_tokens

__all__ = [
    "TASKS",
    "TaskSpec",
    "Example",
    "GoldOutput",
    "PromptSettings",
    "QuestionVerdict",
    "Score",
    "load_examples",
    "truncate_example",
    "without_demos",
    "fit_to_tokens",
    "instruction",
    "build_prompt",
    "encode_prompt",
    "extract_answer",
    "score_output",
    "load_source_records",
    "build_examples",
    "regroup",
    "write_examples",
    "gold_output",
    "default_max_new_tokens",
]
