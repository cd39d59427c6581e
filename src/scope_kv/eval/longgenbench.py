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

import csv
import dataclasses
import importlib.resources
import json
import logging
import math
import pathlib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from .._checks import check_int

logger = logging.getLogger(__name__)

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


# -- examples --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One LongGenBench example.

    Attributes
    ----------
    id : str
        ``"<task>-<row>"``, stable across runs (resuming keys on it).
    task : str
        A key of :data:`TASKS`.
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

    @property
    def n_demos(self) -> int:
        """Worked demos before the test questions (labels ``1..first_label - 1``)."""
        return self.first_label - 1

    def gold(self) -> list[Any]:
        """Normalised gold answers: numbers for GSM8K, upper-case letters otherwise."""
        parse = _spec(self.task).parse_gold
        return [parse(a) for a in self.answers]


def _first_label(prompt: str, k: int, where: str) -> int:
    labels = [int(m.group(1)) for m in _QUESTION_RE.finditer(prompt)]
    if len(labels) < k:
        raise ValueError(
            f"{where}: the prompt has {len(labels)} 'Question_<n>:' markers, fewer than its {k} questions."
        )
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
        A key of :data:`TASKS`; may be left out when ``path`` names a file whose name starts
        with the task.
    path : path or None
        A ``.jsonl`` file, or a directory holding ``<task>_<K>.jsonl``; ``None`` uses the data
        shipped with scope_kv.
    limit : int or None
        Keep the first ``limit`` examples.
    """
    if task is not None:
        _spec(task)
    if path is None:
        if task is None:
            raise ValueError(f"load_examples needs task= (one of {sorted(TASKS)}) or path=.")
        name = TASKS[task].file
        text = (importlib.resources.files("scope_kv") / "data" / "longgenbench" / name).read_text(encoding="utf-8")
        where = f"scope_kv/data/longgenbench/{name}"
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
    examples: list[Example] = []
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
            raise ValueError(
                f"{where}, line {row_idx + 1}: {len(row['questions'])} questions but {len(row['answers'])} answers."
            )
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


def _demo_blocks(example: Example) -> tuple[list[tuple[str, int, int, int]], int]:
    """The demo section's ``Question_i`` / ``Answer_i`` blocks as ``(kind, label, start, end)``
    character spans of ``example.prompt``, and where the demo section ends (the
    ``Following Question:`` line, or the first test question)."""
    first = re.search(rf"Question_{example.first_label}\s*:", example.prompt)
    if first is None:
        raise ValueError(f"{example.id}: no 'Question_{example.first_label}:' marker after the demos.")
    separator = _SEPARATOR_RE.search(example.prompt, 0, first.start())
    end = separator.start() if separator else first.start()
    marks = [m for m in _BLOCK_MARK_RE.finditer(example.prompt, 0, end)]
    blocks = []
    for i, mark in enumerate(marks):
        stop = marks[i + 1].start() if i + 1 < len(marks) else end
        blocks.append((mark.group(1), int(mark.group(2)), mark.start(), stop))
    return blocks, end


def without_demos(example: Example, drop: Collection[int]) -> Example:
    """The example without the worked demos labelled ``drop``; every later label moves down.

    The demo's ``Question_i`` and ``Answer_i`` blocks are cut out of the prompt text and the
    remaining demos and test questions are renumbered consecutively from 1, so the prompt keeps
    the shipped layout (demo questions, demo answers, ``Following Question:``, test questions).

    Raises
    ------
    ValueError
        If a label in ``drop`` is not a demo of the example, or no demo would be left.
    """
    drop = set(drop)
    if not drop:
        return example
    blocks, _ = _demo_blocks(example)
    demos = {label for kind, label, _, _ in blocks if kind == "Answer"}
    if not drop <= demos:
        raise ValueError(f"{example.id}: {sorted(drop - demos)} are not demo labels (demos: {sorted(demos)}).")
    if drop == demos:
        raise ValueError(f"{example.id}: at least one worked demo must stay.")
    text = example.prompt
    for _, _, start, stop in sorted((b for b in blocks if b[1] in drop), key=lambda b: -b[2]):
        text = text[:start] + text[stop:]
    dropped = sorted(drop)

    def renumber(match: re.Match[str]) -> str:
        label = int(match.group(2))
        return f"{match.group(1)}_{label - sum(d < label for d in dropped)}{match.group(3)}"

    return dataclasses.replace(
        example, prompt=_BLOCK_MARK_RE.sub(renumber, text), first_label=example.first_label - len(dropped)
    )


def instruction(example: Example) -> str:
    """The instruction put before the example's prompt (MMLU names its subject)."""
    if example.task == "mmlu" and example.subject:
        return _MMLU_HEADER.format(subject=example.subject.replace("_", " ")) + " " + _INSTRUCTION
    return _INSTRUCTION


def _templated(tokenizer: Any, chat_template: bool) -> bool:
    """Whether prompts are wrapped in the tokenizer's chat template (which then holds the
    special tokens itself, so encoding must not add them again)."""
    return chat_template and tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def build_prompt(example: Example, tokenizer: Any = None, chat_template: bool = True) -> str:
    """The full prompt text: instruction + demos + K questions, in the model's chat format.

    With ``chat_template`` and a tokenizer that has one, the text is one user turn followed by
    the assistant's generation prompt; otherwise plain text ending with a newline.
    """
    content = instruction(example) + "\n\n" + example.prompt
    if _templated(tokenizer, chat_template):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    return content.rstrip() + "\n"


def encode_prompt(
    text: str, tokenizer: Any, chat_template: bool = True, device: str | torch.device | None = None
) -> dict[str, torch.Tensor]:
    """Tokenise a prompt built by :func:`build_prompt` for the model.

    Parameters
    ----------
    text : str
        The prompt text.
    tokenizer
        The model's tokenizer.
    chat_template : bool
        As given to :func:`build_prompt` (a templated text gets no extra special tokens).
    device : str, torch.device or None
        Where the tensors go (default: the CPU).

    Returns
    -------
    dict
        ``input_ids`` and ``attention_mask``, each ``(1, n_tokens)``.
    """
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not _templated(tokenizer, chat_template))
    return {
        k: v.to(device) if device is not None else v for k, v in enc.items() if k in ("input_ids", "attention_mask")
    }


def _prompt_tokens(example: Example, tokenizer: Any, chat_template: bool) -> int:
    text = build_prompt(example, tokenizer, chat_template)
    return len(tokenizer(text, add_special_tokens=not _templated(tokenizer, chat_template))["input_ids"])


def fit_to_tokens(
    example: Example, tokenizer: Any, max_prompt_tokens: int, chat_template: bool = True, drop_demos: bool = False
) -> Example:
    """The example cut to fit in ``max_prompt_tokens`` prompt tokens.

    By default every demo stays and the largest number of leading questions that fits is
    kept. With ``drop_demos`` (short prompts that should still ask many questions), questions
    go first, from the end; once no more questions than demos are left, a question and the
    longest demo go in turn; then questions are taken back while they fit. At least one demo
    and one question always stay, numbered consecutively (:func:`without_demos`).

    Raises
    ------
    ValueError
        If even the smallest such prompt does not fit.
    """

    def length(ex: Example) -> int:
        return _prompt_tokens(ex, tokenizer, chat_template)

    if length(example) <= max_prompt_tokens:
        return example
    if drop_demos:
        return _fit_dropping_demos(example, tokenizer, max_prompt_tokens, length)
    smallest = length(truncate_example(example, 1))
    if smallest > max_prompt_tokens:
        raise ValueError(
            f"{example.id}: max_prompt_tokens={max_prompt_tokens} is too short: the instruction, demos and one "
            f"question take {smallest} tokens; raise it."
        )
    lo, hi = 1, example.k - 1  # largest k that fits, by bisection
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if length(truncate_example(example, mid)) <= max_prompt_tokens:
            lo = mid
        else:
            hi = mid - 1
    return truncate_example(example, lo)


def _fit_dropping_demos(
    example: Example, tokenizer: Any, max_prompt_tokens: int, length: Callable[[Example], int]
) -> Example:
    blocks, _ = _demo_blocks(example)
    size = {label: 0 for kind, label, _, _ in blocks}
    for _, label, start, stop in blocks:
        size[label] += len(tokenizer(example.prompt[start:stop], add_special_tokens=False)["input_ids"])
    kept, n = sorted(size), example.k
    dropped: list[int] = []

    def build(n_questions: int) -> Example:
        return truncate_example(without_demos(example, dropped), n_questions)

    current = build(n)
    while length(current) > max_prompt_tokens and len(kept) + n > 2:
        if n > len(kept) or len(kept) == 1:
            n -= 1
        else:
            longest = max(kept, key=lambda label: (size[label], -label))
            kept.remove(longest)
            dropped.append(longest)
        current = build(n)
    while n < example.k and length(build(n + 1)) <= max_prompt_tokens:
        n += 1  # dropping a demo may have freed room for more questions
        current = build(n)
    tokens = length(current)
    if tokens > max_prompt_tokens:
        raise ValueError(
            f"{example.id}: max_prompt_tokens={max_prompt_tokens} is too short: the instruction, one demo and one "
            f"question take {tokens} tokens; ask for at least {tokens}."
        )
    return current


@dataclass(frozen=True, kw_only=True)
class PromptSettings:
    """How the harnesses cut and format LongGenBench prompts (shared by every harness).

    Attributes
    ----------
    max_questions : int or None
        Keep only the first questions of each example.
    max_prompt_tokens : int or None
        Keep as many leading questions as fit in this many prompt tokens (demos kept).
    chat_template : bool
        Wrap the prompt in the tokenizer's chat template when it has one.
    """

    max_questions: int | None = None
    max_prompt_tokens: int | None = None
    chat_template: bool = True

    def __post_init__(self) -> None:
        for name in ("max_questions", "max_prompt_tokens"):
            check_int(name, getattr(self, name), 1, optional=True)

    def prepare(self, example: Example, tokenizer: Any) -> Example:
        """The example cut as these settings say (first questions, then the token budget)."""
        if self.max_questions is not None and self.max_questions < example.k:
            example = truncate_example(example, self.max_questions)
        if self.max_prompt_tokens is not None:
            example = fit_to_tokens(example, tokenizer, self.max_prompt_tokens, self.chat_template)
        return example

    def encode(
        self, example: Example, tokenizer: Any, device: str | torch.device | None = None
    ) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` ``(1, n_tokens)`` of an (already prepared) example's prompt."""
        return encode_prompt(
            build_prompt(example, tokenizer, self.chat_template), tokenizer, self.chat_template, device
        )


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
        with_solutions = sorted(name for name, s in TASKS.items() if s.worked_answer is not None)
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
