"""LongGenBench (SCOPE_SPEC §6): data, prompts and scoring.

A LongGenBench example packs K questions into one prompt after a few worked demos; the
model must answer them all, in order, in one long output, each answer opening with
``Answer_<n>:`` and closing with ``The answer is <X>``. The demos are numbered
``Question_1..m`` / ``Answer_1..m`` and the test questions continue at ``Question_<m+1>``,
so question ``j`` (0-based) of an example carries the label ``first_label + j``.

Two scores per example:

* **label score** (ours): the answer under ``Answer_<n>`` is compared with question ``n``'s
  gold answer, whatever order the model wrote the answers in; a skipped answer costs one
  question.
* **position-paired score** (the research code's): the i-th answer block of the output is
  compared with the i-th gold answer, whatever its label; one skipped answer shifts every
  later one. Reported so numbers compare with published ones.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.resources
import json
import logging
import math
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

logger = logging.getLogger(__name__)

__all__ = [
    "TASKS",
    "Example",
    "QuestionVerdict",
    "Score",
    "load_examples",
    "truncate_example",
    "fit_to_tokens",
    "instruction",
    "build_prompt",
    "extract_answer",
    "score_output",
    "load_source_records",
    "build_examples",
    "write_examples",
    "default_max_new_tokens",
]

# task -> shipped 4K file (SCOPE_SPEC §6)
TASKS = {"gsm8k": "gsm8k_30.jsonl", "mmlu": "mmlu_30.jsonl", "csqa": "csqa_40.jsonl"}
_LENGTHS = {"4k": 4096, "8k": 7950}

# Our wording of the instruction the paper gives the model (SCOPE_SPEC §6).
_INSTRUCTION = (
    "Answer each of the questions below step by step, following the format of the examples. "
    "Begin every response with 'Answer_' and its question number, and introduce the final "
    "response with 'The answer is'. Do not repeat the questions. Answer every question."
)
_MMLU_HEADER = "The following are multiple choice questions (with answers) about {subject}."

_QUESTION_RE = re.compile(r"Question_(\d+)\s*:")
_ANSWER_MARK_RE = re.compile(r"Answer_(\d+)\s*:?")
_FINAL_RE = re.compile(r"the answer is", re.IGNORECASE)
_NUMBER_RE = re.compile(r"-?\$?\s*-?\d[\d,]*(?:\.\d+)?")
_LETTER_RE = re.compile(r"^\W*\(?\s*([A-E])\s*(?:\)|\.|:|,|\s|$)")


def default_max_new_tokens(length: str) -> int:
    """``"4k"`` -> 4096, ``"8k"`` -> 7950 (the paper's generation lengths)."""
    try:
        return _LENGTHS[length.lower()]
    except KeyError:
        raise ValueError(f"length must be one of {sorted(_LENGTHS)}, got {length!r}.") from None


@dataclass(frozen=True)
class Example:
    """One LongGenBench example.

    Attributes
    ----------
    id : str
        ``"<task>-<row>"``, stable across runs (resuming keys on it).
    task : str
        ``gsm8k``, ``mmlu`` or ``csqa``.
    prompt : str
        Demos then the K test questions (the data file's ``prompt``), without the instruction.
    questions, answers : tuple[str, ...]
        The K test questions and their gold answers (GSM8K: worked solution ending
        ``#### <number>``; MMLU/CSQA: the option letter).
    first_label : int
        The ``Question_<n>`` label of the first test question.
    subject : str or None
        MMLU's task (subject), used in the instruction.
    """

    id: str
    task: str
    prompt: str
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    first_label: int
    subject: str | None = None

    @property
    def k(self) -> int:
        return len(self.questions)

    def gold(self) -> list[Any]:
        """Normalised gold answers: numbers for GSM8K, upper-case letters otherwise."""
        return [_gold_value(self.task, a) for a in self.answers]


def _gold_value(task: str, answer: str) -> Any:
    if task == "gsm8k":
        tail = answer.rsplit("####", 1)[-1]
        value = _to_number(tail)
        if value is None:
            raise ValueError(f"GSM8K answer has no number after '####': {answer[-80:]!r}")
        return value
    letter = answer.strip().strip("()").upper()
    if len(letter) != 1 or not letter.isalpha():
        raise ValueError(f"{task} answers must be option letters, got {answer!r}")
    return letter


def _to_number(text: str) -> float | None:
    match = _NUMBER_RE.search(text)
    if match is None:
        return None
    cleaned = match.group(0).replace("$", "").replace(",", "").replace(" ", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def _first_label(prompt: str, k: int, where: str) -> int:
    labels = [int(m.group(1)) for m in _QUESTION_RE.finditer(prompt)]
    if len(labels) < k:
        raise ValueError(f"{where}: the prompt has {len(labels)} 'Question_<n>:' markers, fewer than its {k} questions.")
    tail = labels[-k:]
    if tail != list(range(tail[0], tail[0] + k)):
        raise ValueError(f"{where}: the last {k} question labels are not consecutive: {tail[:5]}...")
    return tail[0]


def _task_of(path: pathlib.Path) -> str:
    for task in TASKS:
        if path.name.startswith(task):
            return task
    raise ValueError(
        f"cannot tell the task of {path}: name the file <task>_<K>.jsonl with task one of {sorted(TASKS)}, "
        "or pass task= explicitly."
    )


def load_examples(
    task: str | None = None, path: str | pathlib.Path | None = None, limit: int | None = None
) -> list[Example]:
    """Load LongGenBench examples from the shipped 4K files or from ``path``.

    Parameters
    ----------
    task : str or None
        ``gsm8k``, ``mmlu`` or ``csqa``; may be left out when ``path`` names a file whose
        name starts with the task.
    path : path or None
        A ``.jsonl`` file, or a directory holding ``<task>_<K>.jsonl``; ``None`` uses the data
        shipped with scope_kv.
    limit : int or None
        Keep the first ``limit`` examples.
    """
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown LongGenBench task {task!r}; choose one of {sorted(TASKS)}.")
    if path is None:
        if task is None:
            raise ValueError("load_examples needs task= (gsm8k, mmlu or csqa) or path=.")
        resource = importlib.resources.files("scope_kv") / "data" / "longgenbench" / TASKS[task]
        text = resource.read_text(encoding="utf-8")
        where = f"scope_kv/data/longgenbench/{TASKS[task]}"
    else:
        path = pathlib.Path(path)
        if path.is_dir():
            if task is None:
                raise ValueError(f"{path} is a directory: pass task= to pick <task>_<K>.jsonl in it.")
            found = sorted(path.glob(f"{task}_*.jsonl"))
            if not found:
                raise FileNotFoundError(f"no {task}_<K>.jsonl in {path}.")
            path = found[0]
        task = task or _task_of(path)
        text = path.read_text(encoding="utf-8")
        where = str(path)
    examples = []
    for row_idx, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        if limit is not None and len(examples) >= limit:
            break
        row = json.loads(line)
        missing = {"prompt", "questions", "answers"} - set(row)
        if missing:
            raise ValueError(f"{where}, line {row_idx + 1}: missing field(s) {sorted(missing)}.")
        if len(row["questions"]) != len(row["answers"]):
            raise ValueError(f"{where}, line {row_idx + 1}: {len(row['questions'])} questions but {len(row['answers'])} answers.")
        k = len(row["questions"])
        examples.append(
            Example(
                id=row.get("id", f"{task}-{row_idx}"),
                task=task,
                prompt=row["prompt"],
                questions=tuple(row["questions"]),
                answers=tuple(str(a) for a in row["answers"]),
                first_label=_first_label(row["prompt"], k, f"{where}, line {row_idx + 1}"),
                subject=row.get("task"),
            )
        )
    return examples


def truncate_example(example: Example, k: int) -> Example:
    """The same example with only its first ``k`` test questions (prompt cut before question k+1)."""
    if not 1 <= k <= example.k:
        raise ValueError(f"k must be in 1..{example.k} for {example.id}, got {k}.")
    if k == example.k:
        return example
    label = example.first_label + k
    match = re.search(rf"Question_{label}\s*:", example.prompt)
    if match is None:
        raise ValueError(f"{example.id}: no 'Question_{label}:' marker to cut the prompt at.")
    return dataclasses.replace(
        example,
        prompt=example.prompt[: match.start()].rstrip() + "\n\n",
        questions=example.questions[:k],
        answers=example.answers[:k],
    )


def instruction(example: Example) -> str:
    """The instruction put before the example's prompt (MMLU names its subject)."""
    if example.task == "mmlu" and example.subject:
        return _MMLU_HEADER.format(subject=example.subject.replace("_", " ")) + " " + _INSTRUCTION
    return _INSTRUCTION


def build_prompt(example: Example, tokenizer: Any = None, chat_template: bool = True) -> str:
    """The full prompt text: instruction + demos + K questions, in the model's chat format.

    With ``chat_template`` and a tokenizer that has one, the text is one user turn followed by
    the assistant's generation prompt; otherwise plain text ending with a newline.
    """
    content = instruction(example) + "\n\n" + example.prompt
    if chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content.rstrip() + "\n"


def fit_to_tokens(
    example: Example, tokenizer: Any, max_prompt_tokens: int, chat_template: bool = True
) -> Example:
    """The example with as many leading questions as fit in ``max_prompt_tokens`` prompt tokens.

    Raises
    ------
    ValueError
        If even one question (with the instruction and demos) does not fit.
    """

    # A chat-templated text already holds the special tokens the template wants.
    templated = chat_template and bool(getattr(tokenizer, "chat_template", None))

    def length(ex: Example) -> int:
        return len(tokenizer(build_prompt(ex, tokenizer, chat_template), add_special_tokens=not templated)["input_ids"])

    if length(example) <= max_prompt_tokens:
        return example
    lo, hi = 1, example.k - 1  # largest k that fits, by bisection
    if length(truncate_example(example, 1)) > max_prompt_tokens:
        raise ValueError(
            f"{example.id}: the instruction, demos and one question take "
            f"{length(truncate_example(example, 1))} tokens, more than max_prompt_tokens={max_prompt_tokens}; raise it."
        )
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(truncate_example(example, mid)) <= max_prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    return truncate_example(example, lo)


# -- scoring ---------------------------------------------------------------------------------
def extract_answer(task: str, segment: str) -> Any:
    """The final answer in one answer block: what follows the first 'The answer is'.

    Returns a float (GSM8K), an upper-case letter (MMLU/CSQA) or ``None``.
    """
    match = _FINAL_RE.search(segment)
    if match is None:
        return None
    tail = segment[match.end() :].lstrip(" :")
    if task == "gsm8k":
        line = tail.split("\n", 1)[0]
        return _to_number(line)
    letter = _LETTER_RE.match(tail)
    return letter.group(1).upper() if letter else None


def _same(task: str, predicted: Any, gold: Any) -> bool:
    if predicted is None:
        return False
    if task == "gsm8k":
        return math.isclose(predicted, gold, rel_tol=0.0, abs_tol=1e-6)
    return predicted == gold


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
    position_correct = sum(_same(example.task, p, g) for p, g in zip(in_order, gold))
    return Score(
        verdicts=verdicts,
        correct=sum(v.correct for v in verdicts),
        position_correct=position_correct,
        answered=sum(v.predicted is not None for v in verdicts),
    )


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


def _choices_text(labels: Sequence[str], texts: Sequence[str]) -> str:
    return " ".join(f"({lab}) {txt}" for lab, txt in zip(labels, texts))


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
    path = pathlib.Path(path)
    rows = _read_rows(path)
    records: list[tuple[str, str, str | None]] = []
    for i, row in enumerate(rows):
        where = f"{path}, row {i + 1}"
        try:
            if task == "gsm8k":
                records.append((row["question"].strip(), row["answer"].strip(), None))
            elif task == "csqa":
                q = row["question"]
                if isinstance(q, dict):
                    stem, ch = q["stem"], q["choices"]
                    labels, texts = [c["label"] for c in ch], [c["text"] for c in ch]
                else:
                    stem, labels, texts = q, row["choices"]["label"], row["choices"]["text"]
                records.append((f"{stem.strip()}\n{_choices_text(labels, texts)}", row["answerKey"].strip(), None))
            elif task == "mmlu":
                if isinstance(row, list):
                    subject = re.sub(r"_(test|dev|val)$", "", path.stem)
                    question, options, answer = row[0], row[1:5], row[5]
                else:
                    subject = row.get("subject")
                    question, options, answer = row["question"], row["choices"], row["answer"]
                if isinstance(answer, int) or (isinstance(answer, str) and answer.isdigit()):
                    answer = "ABCD"[int(answer)]
                records.append((f"{question.strip()}\n{_choices_text('ABCD', options)}", str(answer).strip(), subject))
            else:
                raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}.")
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where}: not a {task} record ({exc!r}); see load_source_records' docstring.") from exc
    return records


def _demo_prefix(task: str) -> tuple[str, int]:
    """The shipped demos (everything before the first test question) and the first test label."""
    first = load_examples(task, limit=1)[0]
    match = re.search(rf"Question_{first.first_label}\s*:", first.prompt)
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
        ``gsm8k``, ``mmlu`` or ``csqa``.
    records : iterable of (question, answer, subject)
        E.g. from :func:`load_source_records`. MMLU examples group records by subject.
    k : int
        Questions per example (the shipped 4K sets use 30, or 40 for CSQA).
    demos : str or None
        Few-shot demos ending just before the first test question; ``None`` reuses the shipped
        set's demos (for MMLU those of its first subject).
    first_label : int or None
        Label of the first test question; defaults to one past the demos' last ``Question_<n>``.

    Remainders shorter than ``k`` are dropped.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if demos is None:
        demos, shipped_label = _demo_prefix(task)
        first_label = first_label or shipped_label
    if first_label is None:
        labels = [int(m.group(1)) for m in _QUESTION_RE.finditer(demos)]
        first_label = (max(labels) + 1) if labels else 1
    groups: dict[str | None, list[tuple[str, str]]] = {}
    for question, answer, subject in records:
        groups.setdefault(subject if task == "mmlu" else None, []).append((question, answer))
    examples = []
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
