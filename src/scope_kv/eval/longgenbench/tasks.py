"""LongGenBench's tasks (GSM8K, MMLU, CommonsenseQA): one :class:`TaskSpec` each, in :data:`TASKS`."""

from __future__ import annotations

import math
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

_LENGTHS = {"4k": 4096, "8k": 7950}

# Our wording of the instruction the paper gives the model (docs/method.md §10).
_INSTRUCTION = (
    "Answer each of the questions below step by step, following the format of the examples. "
    "Begin every response with 'Answer_' and its question number, and introduce the final "
    "response with 'The answer is'. Do not repeat the questions. Answer every question."
)
_MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}."

_QUESTION_RE = re.compile(r"Question_(\d+)\s*:")
_ANSWER_MARK_RE = re.compile(r"Answer_(\d+)\s*:?")
_BLOCK_MARK_RE = re.compile(r"(Question|Answer)_(\d+)(\s*:)")
_SEPARATOR_RE = re.compile(r"Following Question:")
_FINAL_RE = re.compile(r"the answer is", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\$?\s*-?\d[\d,]*(?:\.\d+)?")
_LETTER_RE = re.compile(r"^\W*\(?\s*([A-E])\s*(?:\)|\.|:|,|\s|$)")
_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")


# -- the tasks -------------------------------------------------------------------------------
def _to_number(text: str) -> float | None:
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    cleaned = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _gsm8k_gold(answer: str) -> float:
    value = _to_number(answer.rsplit("####", 1)[-1])
    if value is None:
        raise ValueError(f"GSM8K answer has no number after '####': {answer[-80:]!r}")
    return value


def _letter_gold(answer: str) -> str:
    letter = answer.strip().strip("()").upper()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"answers of this task must be option letters, got {answer!r}")
    return letter


def _gsm8k_extract(tail: str) -> float | None:
    return _to_number(tail.split("\n", 1)[0])


def _letter_extract(tail: str) -> str | None:
    letter = _LETTER_RE.match(tail)
    return letter.group(1).upper() if letter else None


def _same_number(predicted: float, gold: float) -> bool:
    return math.isclose(predicted, gold, rel_tol=0.0, abs_tol=1e-6)


def _same_letter(predicted: str, gold: str) -> bool:
    return predicted == gold


def _choices_text(labels: Sequence[str], texts: Sequence[str]) -> str:
    return " ".join(f"({lab}) {txt}" for lab, txt in zip(labels, texts, strict=False))


def _gsm8k_record(row: Any, path: pathlib.Path) -> tuple[str, str, str | None]:
    return row["question"].strip(), row["answer"].strip(), None


def _csqa_record(row: Any, path: pathlib.Path) -> tuple[str, str, str | None]:
    q = row["question"]
    if isinstance(q, dict):
        stem, ch = q["stem"], q["choices"]
        labels, texts = [c["label"] for c in ch], [c["text"] for c in ch]
    else:
        stem, labels, texts = q, row["choices"]["label"], row["choices"]["text"]
    return f"{stem.strip()}\n{_choices_text(labels, texts)}", row["answerKey"].strip(), None


def _mmlu_record(row: Any, path: pathlib.Path) -> tuple[str, str, str | None]:
    if isinstance(row, list):
        subject = re.sub(r"_(test|dev|val)$", "", path.stem)
        question, options, answer = row[0], row[1:5], row[5]
    else:
        subject = row.get("subject")
        question, options, answer = row["question"], row["choices"], row["answer"]
    if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit()):
        answer = "ABCD"[int(answer)]
    return f"{question.strip()}\n{_choices_text('ABCD', options)}", str(answer).strip(), subject


def _gsm8k_worked(answer: str) -> tuple[str, str]:
    """A GSM8K solution as the demos write one: (reasoning without the calculator annotations
    ``<<48/2=24>>``, the final answer after ``####``)."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer has no '####' line: {answer[-80:]!r}")
    reasoning, final = answer.rsplit("####", 1)
    lines = [line.rstrip() for line in _CALCULATOR_RE.sub("", reasoning).strip().splitlines()]
    return "\n".join(line for line in lines if line), final.strip()


@dataclass(frozen=True)
class TaskSpec:
    """Everything task-specific about one LongGenBench task.

    Attributes
    ----------
    name : str
        Task name (``--task``), also the prefix of its data files (``<name>_<K>.jsonl``).
    file : str
        The shipped 4K file in ``scope_kv/data/longgenbench``.
    parse_gold : callable
        ``answer string -> normalised gold`` (a number, an option letter...).
    extract : callable
        ``text after 'The answer is' -> value or None``.
    same : callable
        ``(predicted, gold) -> bool`` (``predicted`` is never ``None``).
    read_record : callable
        ``(row of an original dataset file, its path) -> (question, answer, subject)``.
    by_subject : bool
        Whether examples group questions by subject (MMLU: one subject per example).
    worked_answer : callable or None
        ``answer string -> (reasoning, final answer text)``, the reference output's pieces for
        the gold-output harness; ``None`` when the data carry no worked solutions.
    """

    name: str
    file: str
    parse_gold: Callable[[str], Any]
    extract: Callable[[str], Any]
    same: Callable[[Any, Any], bool]
    read_record: Callable[[Any, pathlib.Path], tuple[str, str, str | None]]
    by_subject: bool = False
    worked_answer: Callable[[str], tuple[str, str]] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z0-9]+", self.name):
            raise ValueError(f"task names are lower-case letters and digits (file prefix), got {self.name!r}.")
        if not self.file.startswith(self.name) or not self.file.endswith(".jsonl"):
            raise ValueError(f"task {self.name}: the file must be named {self.name}_<K>.jsonl, got {self.file!r}.")


# task name -> its spec (docs/method.md §10); read-only: a new task is one more entry here
TASKS: Mapping[str, TaskSpec] = MappingProxyType(
    {
        spec.name: spec
        for spec in (
            TaskSpec(
                "gsm8k",
                "gsm8k_30.jsonl",
                _gsm8k_gold,
                _gsm8k_extract,
                _same_number,
                _gsm8k_record,
                worked_answer=_gsm8k_worked,
            ),
            TaskSpec(
                "mmlu", "mmlu_30.jsonl", _letter_gold, _letter_extract, _same_letter, _mmlu_record, by_subject=True
            ),
            TaskSpec("csqa", "csqa_40.jsonl", _letter_gold, _letter_extract, _same_letter, _csqa_record),
        )
    }
)


def _spec(task: str) -> TaskSpec:
    try:
        return TASKS[task]
    except KeyError:
        raise ValueError(f"unknown LongGenBench task {task!r}; choose one of {sorted(TASKS)}.") from None


def default_max_new_tokens(length: str) -> int:
    """``"4k"`` -> 4096, ``"8k"`` -> 7950 (the paper's generation lengths)."""
    try:
        return _LENGTHS[length.lower()]
    except KeyError:
        raise ValueError(f"length must be one of {sorted(_LENGTHS)}, got {length!r}.") from None
