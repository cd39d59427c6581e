"""The gold-output harness on SmolLM2-135M-Instruct (real weights, real tokenizer): one short
reference checked against an independent full-cache forward, and padded batches against one
example at a time. About a minute on 2 CPU cores."""

from __future__ import annotations

import pytest
import torch

from scope_kv.eval import GoldSettings, load_examples, parse_methods, prepare_gold, run_gold
from scope_kv.eval.gold import plan_tokens
from scope_kv.eval.longgenbench import truncate_example, without_demos
from scope_kv.models import ModelUnavailableError, load_smollm2

pytestmark = pytest.mark.real_model

GOLD_TOKENS = 28  # a few dozen reference tokens: the first answer's opening lines


@pytest.fixture(scope="module")
def smollm2():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core machine: one thread is faster than two
    try:
        yield load_smollm2()
    except ModelUnavailableError as error:
        pytest.fail(f"the real-model tests need SmolLM2 and its loaders:\n{error}", pytrace=False)
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def items(smollm2):
    _, tokenizer = smollm2
    # Two demos and one question (~300 prompt tokens) keep the CPU forwards short.
    examples = [without_demos(truncate_example(e, 1), range(3, 9)) for e in load_examples("gsm8k", limit=2)]
    return prepare_gold(examples, tokenizer, GoldSettings(max_gold_tokens=GOLD_TOKENS))


def test_reference_tokens_and_answer_tokens(smollm2):
    _, tokenizer = smollm2
    (item,) = prepare_gold(load_examples("gsm8k", limit=1), tokenizer, GoldSettings(max_questions=1))
    text = tokenizer.decode(item.gold_ids)
    assert text.startswith("Answer_9:\nJanet sells 16 - 3 - 4 = 9 duck eggs a day.") and text.endswith("The answer is 18.")
    assert tokenizer.decode(item.gold_ids[item.answer_of == 0]).strip() == "18"
    assert tokenizer.decode(item.prompt_ids).endswith("<|im_start|>assistant\n")


def test_stepped_full_cache_reproduces_one_forward(smollm2, items, tmp_path):
    model, tokenizer = smollm2
    methods, _ = parse_methods(["full", "slide:10000/64", "slide:8/4"], plan_tokens(items))
    rows = run_gold(model, tokenizer, items[:1], methods, tmp_path, GoldSettings(keep_per_token=True))
    by = {r["method"]: r for r in rows}
    # Independent computation: one plain forward of prompt + reference, no cache.
    item = items[0]
    ids = torch.cat([item.prompt_ids, item.gold_ids])[None]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    p = item.prompt_ids.numel()
    want = -logp[p - 1 : -1].gather(-1, item.gold_ids[:, None])[:, 0]
    for method in ("reference", "full", "slide:10000/64"):
        got = torch.tensor(by[method]["per_token"]["nll"])
        torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4, msg=method)
    for method in ("full", "slide:10000/64"):
        assert abs(by[method]["delta_nll"]) < 1e-4 and by[method]["kl"] < 1e-5 and by[method]["top1"] == 1
    slide = by["slide:8/4"]
    assert max(slide["per_token"]["kl"][:9]) < 1e-5 < max(slide["per_token"]["kl"][10:])  # drifts once full


def test_padded_batch_matches_one_example_at_a_time(smollm2, items, tmp_path):
    model, tokenizer = smollm2
    assert len({it.prompt_ids.numel() for it in items}) == 2  # the batch is padded
    methods, _ = parse_methods(["slide:8/4", "snapkv:prompt/4+slide:8/4", "unified-h2o:prompt+8/4"], plan_tokens(items))
    batched = run_gold(model, tokenizer, items, methods, tmp_path / "b", GoldSettings(keep_per_token=True))
    single = run_gold(model, tokenizer, items, methods, tmp_path / "s", GoldSettings(keep_per_token=True, batch_size=1))
    other = {(r["example"], r["method"]): r for r in single}
    for row in batched:
        mine, theirs = row["per_token"], other[(row["example"], row["method"])]["per_token"]
        for field in ("nll", "ref_nll", "kl"):
            torch.testing.assert_close(torch.tensor(mine[field]), torch.tensor(theirs[field]), atol=1e-3, rtol=1e-3,
                                       msg=f"{row['method']} {field}")
        assert mine["top1"] == theirs["top1"], row["method"]
