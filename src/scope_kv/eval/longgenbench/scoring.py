"""Reading a LongGenBench output: each answer's verdict and the example's scores, and the reference output."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import tasks as task_table  # the table itself, read at call time (a test may extend it)
from .examples import Example
from .tasks import _ANSWER_MARK_RE, _FINAL_RE, _spec


# -- scoring ---------------------------------------------------------------------------------
def extract_answer(task: str, segment: str) -> Any:
    """The final answer in one answer block: what follows the first 'The answer is'.

    Returns what the task's ``extract`` gives (GSM8K: a float; MMLU/CSQA: an upper-case
    letter), or ``None``.
    """
    match = _FINAL_RE.search(segment)
    if match is None:
        return None
    return _spec(task).extract(segment[match.end() :].lstrip(" :"))


def _same(task: str, predicted: Any, gold: Any) -> bool:
    return predicted is not None and _spec(task).same(predicted, gold)


@dataclass(frozen=True)
class QuestionVerdict:
    """Verdict on one test question: its label, gold answer, what the model answered under that
    label (``None`` when it wrote no such block or no final answer), and whether it is right."""

    label: int
    gold: Any
    predicted: Any
    correct: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Score:
    """Scores of one output.

    Attributes
    ----------
    verdicts : list[QuestionVerdict]
        Per question, paired by ``Answer_<n>`` label.
    correct : int
        Questions answered right (label pairing).
    position_correct : int
        Right answers when the i-th answer block is paired with the i-th question (research code).
    answered : int
        Questions whose label block carries a final answer.
    """

    verdicts: list[QuestionVerdict] = field(default_factory=list)
    correct: int = 0
    position_correct: int = 0
    answered: int = 0

    @property
    def total(self) -> int:
        return len(self.verdicts)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def position_accuracy(self) -> float:
        return self.position_correct / self.total if self.total else 0.0


def _blocks(output: str) -> list[tuple[int, str]]:
    """``(label, text)`` for each ``Answer_<n>`` block of the output, in output order."""
    marks = list(_ANSWER_MARK_RE.finditer(output))
    blocks = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(output)
        blocks.append((int(mark.group(1)), output[mark.end() : end]))
    return blocks


def score_output(example: Example, output: str) -> Score:
    """Score one generated output against ``example`` (label and position pairing)."""
    gold = example.gold()
    blocks = _blocks(output)
    by_label: dict[int, Any] = {}
    for label, text in blocks:
        if label not in by_label or by_label[label] is None:  # first block with a final answer wins
            by_label[label] = extract_answer(example.task, text)
    verdicts = []
    for j, g in enumerate(gold):
        label = example.first_label + j
        predicted = by_label.get(label)
        verdicts.append(QuestionVerdict(label, g, predicted, _same(example.task, predicted, g)))
    in_order = [extract_answer(example.task, text) for _, text in blocks][: len(gold)]
    position_correct = sum(
        _same(example.task, p, g) for p, g in zip(in_order, gold, strict=False)
    )  # fewer blocks: fewer pairs
    return Score(
        verdicts=verdicts,
        correct=sum(v.correct for v in verdicts),
        position_correct=position_correct,
        answered=sum(v.predicted is not None for v in verdicts),
    )


# -- the reference output ----------------------------------------------------------------------
@dataclass(frozen=True)
class GoldOutput:
    """The output the prompt asks for, written out: every answer, in order, in the demos' format.

    Attributes
    ----------
    text : str
        ``Answer_<n>:`` + the worked solution + ``The answer is <X>.`` for every question,
        separated by blank lines.
    answer_spans : tuple[tuple[int, int], ...]
        Character span of each final answer ``<X>`` in ``text``, one per question.
    labels : tuple[int, ...]
        The ``Answer_<n>`` label of each question.
    """

    text: str
    answer_spans: tuple[tuple[int, int], ...]
    labels: tuple[int, ...]


def gold_output(example: Example) -> GoldOutput:
    """The reference output of ``example``: what a perfect answer to its prompt reads like.

    GSM8K+: for question ``j``, ``Answer_<first_label + j>:``, the gold solution with its
    calculator annotations (``<<48/2=24>>``) removed and its ``#### N`` line written as
    ``The answer is N.`` -- the format of the prompt's demos.

    Raises
    ------
    ValueError
        For a task whose data have no worked solutions (MMLU+, CSQA+ carry option letters only).
    """
    spec = _spec(example.task)
    if spec.worked_answer is None:
        with_solutions = sorted(name for name, s in task_table.TASKS.items() if s.worked_answer is not None)
        raise ValueError(
            f"{example.id}: {example.task} answers are option letters without worked solutions, so there is no "
            f"long reference output to teacher-force; use a task with worked solutions ({', '.join(with_solutions)})."
        )
    parts: list[str] = []
    spans = []
    labels = []
    offset = 0
    for j, answer in enumerate(example.answers):
        label = example.first_label + j
        reasoning, final = spec.worked_answer(answer)
        head = f"Answer_{label}:\n" + (reasoning + "\n" if reasoning else "") + "The answer is "
        block = head + final + "."
        spans.append((offset + len(head), offset + len(head) + len(final)))
        labels.append(label)
        parts.append(block)
        offset += len(block) + 2  # the blank line between answers
    return GoldOutput("\n\n".join(parts), tuple(spans), tuple(labels))
