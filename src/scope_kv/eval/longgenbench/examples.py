"""LongGenBench examples: loading, truncating, dropping demos, and the prompt a model is given."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import logging
import pathlib
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch

from ..._checks import check_int
from . import tasks as task_table  # the table itself, read at call time (a test may extend it)
from .tasks import _BLOCK_MARK_RE, _INSTRUCTION, _MMLU_HEADER, _QUESTION_RE, _SEPARATOR_RE, _spec

logger = logging.getLogger(__name__)


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
    for task in task_table.TASKS:
        if path.name.startswith(task):
            return task
    raise ValueError(
        f"cannot tell the task of {path}: name the file <task>_<K>.jsonl with task one of {sorted(task_table.TASKS)}, "
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
            raise ValueError(f"load_examples needs task= (one of {sorted(task_table.TASKS)}) or path=.")
        name = task_table.TASKS[task].file
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
