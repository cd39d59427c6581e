"""Building LongGenBench-style example sets with any K from an original dataset."""

from __future__ import annotations

import csv
import json
import logging
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ..._checks import check_int
from .examples import Example, load_examples
from .tasks import _QUESTION_RE, _spec

logger = logging.getLogger(__name__)


# -- building sets from the original datasets ----------------------------------------------
def _read_rows(path: pathlib.Path) -> list[Any]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.reader(fh))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        return data if isinstance(data, list) else data.get("data", data.get("rows", []))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_source_records(task: str, path: str | pathlib.Path) -> list[tuple[str, str, str | None]]:
    """Read an original dataset file into ``(question, answer, subject)`` records.

    Accepted layouts:

    * GSM8K: ``.jsonl`` rows ``{"question", "answer"}`` (the answer ends ``#### <number>``).
    * CommonsenseQA: ``.jsonl`` rows ``{"question": {"stem", "choices": [{"label", "text"}]},
      "answerKey"}``, or flat ``{"question", "choices": {"label": [...], "text": [...]}, "answerKey"}``.
    * MMLU: headerless ``.csv`` rows ``question, A, B, C, D, answer`` (the subject is the
      file name without ``_test``/``_dev``), or ``.jsonl`` rows ``{"question", "choices": [4],
      "answer": 0-3 or letter, "subject"}``.
    """
    spec = _spec(task)
    path = pathlib.Path(path)
    records: list[tuple[str, str, str | None]] = []
    for i, row in enumerate(_read_rows(path)):
        try:
            records.append(spec.read_record(row, path))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(
                f"{path}, row {i + 1}: not a {task} record ({exc!r}); see load_source_records' docstring."
            ) from exc
    return records


def _demo_prefix(task: str) -> tuple[str, int]:
    """The shipped demos (everything before the first test question) and the first test label."""
    first = load_examples(task, limit=1)[0]
    match = re.search(rf"Question_{first.first_label}\s*:", first.prompt)
    if match is None:
        raise ValueError(f"{first.id}: no 'Question_{first.first_label}:' marker after the demos.")
    return first.prompt[: match.start()], first.first_label


def build_examples(
    task: str,
    records: Iterable[tuple[str, str, str | None]],
    k: int,
    demos: str | None = None,
    first_label: int | None = None,
) -> list[Example]:
    """Pack records into LongGenBench-style examples of ``k`` questions each.

    Parameters
    ----------
    task : str
        A key of :data:`TASKS`.
    records : iterable of (question, answer, subject)
        E.g. from :func:`load_source_records`. MMLU examples group records by subject.
    k : int
        Questions per example (the shipped 4K sets use 30, or 40 for CSQA).
    demos : str or None
        Few-shot demos ending just before the first test question; ``None`` reuses the shipped
        set's demos (for MMLU those of its first subject).
    first_label : int or None
        Label of the first test question; defaults to one past the demos' last ``Question_<n>``.

    Records are packed in order; remainders shorter than ``k`` are dropped.
    """
    spec = _spec(task)
    check_int("k", k, 1)
    if demos is None:
        demos, shipped_label = _demo_prefix(task)
        first_label = first_label or shipped_label
    if first_label is None:
        labels = [int(m.group(1)) for m in _QUESTION_RE.finditer(demos)]
        first_label = (max(labels) + 1) if labels else 1
    groups: dict[str | None, list[tuple[str, str]]] = {}
    for question, answer, subject in records:
        groups.setdefault(subject if spec.by_subject else None, []).append((question, answer))
    examples: list[Example] = []
    for subject, items in groups.items():
        for start in range(0, len(items) - k + 1, k):
            chunk = items[start : start + k]
            body = "".join(f"Question_{first_label + j}:\n{q}\n\n" for j, (q, _) in enumerate(chunk))
            examples.append(
                Example(
                    id=f"{task}-k{k}-{len(examples)}",
                    task=task,
                    prompt=demos + body,
                    questions=tuple(q for q, _ in chunk),
                    answers=tuple(a for _, a in chunk),
                    first_label=first_label,
                    subject=subject,
                )
            )
    if not examples:
        logger.warning("no %s example of %d questions could be built (too few records)", task, k)
    return examples


def regroup(examples: Sequence[Example], k: int) -> list[Example]:
    """The questions of ``examples``, in order, packed into examples of ``k`` questions.

    Question ``i`` of the result set is question ``i`` of the concatenated input examples
    (e.g. ``k = 60`` joins rows 0 and 1, 2 and 3, ... of a 30-question file); the shipped demos
    come first (:func:`build_examples`), and a remainder shorter than ``k`` is dropped.
    Deterministic: the same input gives the same examples and ids (``<task>-k<k>-<i>``).
    """
    if not examples:
        return []
    tasks = {ex.task for ex in examples}
    if len(tasks) != 1:
        raise ValueError(f"regroup takes examples of one task, got {sorted(tasks)}.")
    records = [(q, a, ex.subject) for ex in examples for q, a in zip(ex.questions, ex.answers, strict=True)]
    return build_examples(tasks.pop(), records, k)


def write_examples(examples: Iterable[Example], path: str | pathlib.Path) -> int:
    """Write examples in the shipped files' layout (one JSON object per line); returns the count."""
    n = 0
    with pathlib.Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            row = {"id": ex.id, "prompt": ex.prompt, "questions": list(ex.questions), "answers": list(ex.answers)}
            if ex.subject is not None:
                row["task"] = ex.subject
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n
