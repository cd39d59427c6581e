"""LongGenBench data, prompts and scoring: no model needed (crafted outputs)."""

from __future__ import annotations

import json

import pytest

from scope_kv.eval.longgenbench import (
    TASKS,
    build_examples,
    build_prompt,
    extract_answer,
    fit_to_tokens,
    load_examples,
    load_source_records,
    score_output,
    truncate_example,
    write_examples,
)


def _answers(example, golds, labels=None, fmt="{g}"):
    labels = labels or [example.first_label + j for j in range(len(golds))]
    return "".join(
        f"Answer_{lab}:\nLet's think. Some working here.\nThe answer is {fmt.format(g=g)}.\n\n" for lab, g in zip(labels, golds, strict=True)
    )


@pytest.mark.parametrize("task,rows,k,first", [("gsm8k", 43, 30, 9), ("mmlu", 57, 30, 6), ("csqa", 30, 40, 6)])
def test_shipped_files_load_with_labels(task, rows, k, first):
    examples = load_examples(task)
    assert len(examples) == rows
    assert {e.k for e in examples} == {k}
    assert {e.first_label for e in examples} == {first}
    assert len({e.id for e in examples}) == rows
    for e in examples[:3]:
        assert f"Question_{e.first_label + k - 1}:" in e.prompt
        assert f"Question_{e.first_label + k}:" not in e.prompt
        gold = e.gold()
        assert len(gold) == k
        assert all(isinstance(g, float) for g in gold) if task == "gsm8k" else all(g in "ABCDE" for g in gold)
    if task == "mmlu":
        assert examples[0].subject == "abstract_algebra"


def test_load_from_path_and_limit(tmp_path):
    ex = load_examples("gsm8k", limit=2)
    path = tmp_path / "gsm8k_30.jsonl"
    write_examples(ex, path)
    again = load_examples(path=path)
    assert [e.prompt for e in again] == [e.prompt for e in ex]
    assert [e.id for e in again] == [e.id for e in ex]
    assert load_examples("gsm8k", tmp_path)[0].answers == ex[0].answers
    with pytest.raises(ValueError, match="task"):
        load_examples("gsm9k")
    with pytest.raises(FileNotFoundError):
        load_examples("mmlu", tmp_path)


def test_label_score_is_exact_on_perfect_output():
    e = load_examples("gsm8k", limit=1)[0]
    golds = [int(g) if g == int(g) else g for g in e.gold()]
    s = score_output(e, _answers(e, golds))
    assert (s.correct, s.position_correct, s.answered, s.total) == (30, 30, 30, 30)
    assert s.accuracy == 1.0


def test_skipped_answer_shifts_position_score_but_not_label_score():
    e = truncate_example(load_examples("gsm8k", limit=1)[0], 6)
    golds = [int(g) for g in e.gold()]
    labels = [e.first_label + j for j in range(6)]
    # The model skips the second question and answers the rest correctly, under the right labels.
    out = _answers(e, golds[:1] + golds[2:], labels[:1] + labels[2:])
    s = score_output(e, out)
    assert s.correct == 5  # label pairing: only the skipped question is lost
    assert [v.correct for v in s.verdicts] == [True, False, True, True, True, True]
    assert s.verdicts[1].predicted is None
    assert s.position_correct == 1  # position pairing: every answer after the gap is shifted
    assert s.position_accuracy == pytest.approx(1 / 6)


def test_answers_out_of_order_and_repeated_labels():
    e = truncate_example(load_examples("csqa", limit=1)[0], 4)
    gold = e.gold()
    labels = [e.first_label + j for j in range(4)]
    out = _answers(e, list(reversed(gold)), list(reversed(labels)), fmt="({g})")
    s = score_output(e, out)
    assert s.correct == 4
    # A repeated label keeps the first block that carries a final answer.
    out2 = f"Answer_{labels[0]}:\nhmm\n\nAnswer_{labels[0]}:\nThe answer is {gold[0]}\n"
    assert score_output(e, out2).verdicts[0].correct


@pytest.mark.parametrize(
    "task,segment,expected",
    [
        ("gsm8k", "so 3 + 4 = 7.\nThe answer is 7.", 7.0),
        ("gsm8k", "The answer is $1,250.50 dollars", 1250.5),
        ("gsm8k", "The Answer is: -3", -3.0),
        ("gsm8k", "no final line", None),
        ("gsm8k", "The answer is unknown\n42", None),
        ("mmlu", "The answer is (C)", "C"),
        ("mmlu", "The answer is B.", "B"),
        ("csqa", "The answer is: E) bakery", "E"),
        ("csqa", "The answer is a refrigerator", None),
    ],
)
def test_extract_answer(task, segment, expected):
    assert extract_answer(task, segment) == expected


def test_gsm8k_gold_compares_numerically():
    e = truncate_example(load_examples("gsm8k", limit=1)[0], 1)
    gold = e.gold()[0]
    assert score_output(e, f"Answer_{e.first_label}: The answer is {gold:.2f}").correct == 1
    assert score_output(e, f"Answer_{e.first_label}: The answer is {gold + 1}").correct == 0


def test_truncate_keeps_demos_and_first_questions():
    e = load_examples("mmlu", limit=1)[0]
    t = truncate_example(e, 3)
    assert t.k == 3 and t.answers == e.answers[:3]
    assert e.prompt.startswith(t.prompt.rstrip())
    assert f"Question_{e.first_label + 2}:" in t.prompt and f"Question_{e.first_label + 3}:" not in t.prompt
    assert "Answer_1:" in t.prompt  # demos kept
    with pytest.raises(ValueError):
        truncate_example(e, 0)


class _CharTokenizer:
    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        return {"input_ids": list(range(len(text) // 4))}


def test_fit_to_tokens_and_prompt_text():
    e = load_examples("gsm8k", limit=1)[0]
    tok = _CharTokenizer()
    full = len(build_prompt(e, tok)) // 4
    demos_only = len(build_prompt(truncate_example(e, 1), tok)) // 4
    fitted = fit_to_tokens(e, tok, (full + demos_only) // 2)
    assert 1 < fitted.k < e.k
    assert len(build_prompt(fitted, tok)) // 4 <= (full + demos_only) // 2
    assert len(build_prompt(truncate_example(e, fitted.k + 1), tok)) // 4 > (full + demos_only) // 2
    assert fit_to_tokens(e, tok, full + 10) is e
    with pytest.raises(ValueError, match="max_prompt_tokens"):
        fit_to_tokens(e, tok, 10)
    text = build_prompt(e, tok)
    assert "The answer is" in text and "Answer_" in text and text.endswith(e.prompt.rstrip() + "\n")
    mmlu = load_examples("mmlu", limit=1)[0]
    assert "about abstract algebra" in build_prompt(mmlu, tok)


def test_chat_template_is_used_when_present():
    class Chat(_CharTokenizer):
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "<user>" + messages[0]["content"] + "<assistant>"

    e = load_examples("csqa", limit=1)[0]
    assert build_prompt(e, Chat()).startswith("<user>")
    assert not build_prompt(e, Chat(), chat_template=False).startswith("<user>")


def test_build_sets_with_any_k_from_original_datasets(tmp_path):
    gsm = tmp_path / "gsm8k_test.jsonl"
    gsm.write_text(
        "".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n" for i in range(7))
    )
    examples = build_examples("gsm8k", load_source_records("gsm8k", gsm), k=3)
    assert len(examples) == 2 and all(e.k == 3 for e in examples)  # the 7th record is dropped
    e = examples[1]
    assert e.first_label == 9 and "Answer_8:" in e.prompt  # shipped demos reused
    assert "Question_11:\nWhat is 5 + 1?" in e.prompt
    assert e.gold() == [4.0, 5.0, 6.0]
    assert score_output(e, "".join(f"Answer_{9 + j}: The answer is {g:g}.\n" for j, g in enumerate(e.gold()))).correct == 3
    path = tmp_path / "gsm8k_3.jsonl"
    write_examples(examples, path)
    assert [x.questions for x in load_examples(path=path)] == [x.questions for x in examples]

    csqa = tmp_path / "csqa.jsonl"
    row = {"question": {"stem": "Where is ice?", "choices": [{"label": c, "text": c.lower() * 3} for c in "ABCDE"]}, "answerKey": "C"}
    csqa.write_text((json.dumps(row) + "\n") * 2)
    (c,) = build_examples("csqa", load_source_records("csqa", csqa), k=2)
    assert "(A) aaa (B) bbb" in c.questions[0] and c.gold() == ["C", "C"]

    mmlu = tmp_path / "anatomy_test.csv"
    mmlu.write_text("What bone?,skull,femur,rib,ulna,B\nWhich organ?,heart,lung,liver,skin,D\n")
    (m,) = build_examples("mmlu", load_source_records("mmlu", mmlu), k=2)
    assert m.subject == "anatomy" and m.gold() == ["B", "D"] and "(B) femur" in m.questions[0]
    with pytest.raises(ValueError, match="not a gsm8k record"):
        load_source_records("gsm8k", csqa)


def test_tasks_cover_the_spec():
    assert set(TASKS) == {"gsm8k", "mmlu", "csqa"}


def test_dropping_demos_renumbers_and_fits_short_budgets():
    from scope_kv.eval.longgenbench import without_demos

    e = truncate_example(load_examples("gsm8k", limit=1)[0], 3)
    fewer = without_demos(e, {2, 5})
    assert fewer.first_label == e.first_label - 2 == 7 and fewer.n_demos == 6
    labels = [int(n) for n in __import__("re").findall(r"Question_(\d+)\s*:", fewer.prompt)]
    assert labels == list(range(1, 10))  # 6 demos and 3 questions, consecutive
    assert "If there are 3 cars in the parking lot" not in fewer.prompt  # demo 2 is gone, question and answer
    assert "There are originally 3 cars." not in fewer.prompt and "Following Question:" in fewer.prompt
    assert fewer.questions == e.questions and fewer.gold() == e.gold()
    with pytest.raises(ValueError, match="not demo labels"):
        without_demos(e, {9})
    with pytest.raises(ValueError, match="at least one"):
        without_demos(e, range(1, 9))
    tok = _CharTokenizer()
    full = load_examples("gsm8k", limit=1)[0]
    short = fit_to_tokens(full, tok, 700, drop_demos=True)
    assert len(build_prompt(short, tok)) // 4 <= 700 and 1 <= short.n_demos < 8 and short.k > 1
    assert [int(n) for n in __import__("re").findall(r"Question_(\d+)\s*:", short.prompt)] == list(
        range(1, short.n_demos + short.k + 1))
    with pytest.raises(ValueError, match="too short"):
        fit_to_tokens(full, tok, 50, drop_demos=True)


def test_a_new_task_is_one_entry(tmp_path, monkeypatch):
    from scope_kv.eval.longgenbench import TaskSpec

    toy = TaskSpec(
        "toy", "toy_2.jsonl", parse_gold=lambda a: a.strip().lower(), extract=lambda tail: tail.split()[0].strip(".").lower(),
        same=lambda p, g: p == g, read_record=lambda row, path: (row["q"], row["a"], None),
    )
    from types import MappingProxyType

    from scope_kv.eval.longgenbench import tasks

    # The task table is read-only; a new task is one more entry in it (scope_kv/eval/longgenbench/tasks.py).
    monkeypatch.setattr(tasks, "TASKS", MappingProxyType({**TASKS, "toy": toy}))
    src = tmp_path / "toy.jsonl"
    src.write_text("".join(json.dumps({"q": f"Colour {i}?", "a": c}) + "\n" for i, c in enumerate(["Red", "Blue"])))
    (example,) = build_examples("toy", load_source_records("toy", src), k=2, demos="Question_1:\nSky?\n\nAnswer_1:\nThe answer is blue.\n\n")
    assert example.first_label == 2 and example.gold() == ["red", "blue"]
    path = tmp_path / "toy_2.jsonl"
    write_examples([example], path)
    (loaded,) = load_examples(path=path)
    assert loaded.task == "toy"
    assert score_output(loaded, "Answer_2: The answer is red.\nAnswer_3: The answer is Green.").correct == 1
