"""The recipes a new user reaches for first: pipelines, many prompts, conversations, stop strings.

A tiny random Llama (tests/conftest.py) with a character-level tokenizer built here, so the file
runs in seconds. Each recipe is checked against calling ``generate`` once per prompt with a fresh
cache, and every misuse the cache can see (one cache for two unrelated prompts) must raise.
"""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import DynamicCache, PreTrainedTokenizerFast, pipeline

from conftest import make_model
from scope_kv import ScopeCache, Slide, make_cache
from scope_kv.compat import cache_kwargs
from scope_kv.spec import SpecError

SPEC = "slide:8/4"  # small enough that every generation below evicts
NEW = 24
PROMPTS = ["The cat sat on the mat.", "Hi", "Once upon a time, far away, there was a small red house."]


@pytest.fixture(scope="module")
def model():
    model = make_model("llama")
    model.generation_config.eos_token_id = None  # a random model: answers run to max_new_tokens
    return model


@pytest.fixture(scope="module")
def tokenizer(model):
    """One token per printable character; fillers up to the model's vocabulary; left padding."""
    chars = [c for c in string.printable if c not in "\r\x0b\x0c"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({c: len(vocab) + i for i, c in enumerate(chars)})
    vocab.update({f"<x{i}>": i for i in range(len(vocab), model.config.vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def _greedy(model, inputs, cache, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=NEW, do_sample=False, **kwargs)


def _alone(model, tokenizer, prompt: str) -> tuple[list[int], ScopeCache]:
    """The reference: ``generate`` on one prompt with a fresh cache."""
    inputs = tokenizer(prompt, return_tensors="pt")
    cache = make_cache(model, SPEC)
    out = _greedy(model, inputs, cache)
    return out[0, inputs["input_ids"].shape[-1] :].tolist(), cache


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def test_pipeline_with_a_fresh_cache_per_prompt_matches_generate(model, tokenizer):
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    # The recipe: one new cache for every prompt the pipeline answers.
    texts = [
        pipe(p, **cache_kwargs(make_cache(model, SPEC)), max_new_tokens=NEW, do_sample=False, return_full_text=False)[
            0
        ]["generated_text"]
        for p in PROMPTS
    ]
    for prompt, text in zip(PROMPTS, texts, strict=True):
        ids, cache = _alone(model, tokenizer, prompt)
        assert text == _decode(tokenizer, ids)
        assert cache.layers[0].selections > 0, "the cache must have compressed (the recipe would test nothing)"


def test_one_cache_for_a_list_of_prompts_is_refused(model, tokenizer):
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with pytest.raises(ValueError, match="new ScopeCache"):
        pipe(PROMPTS, **cache_kwargs(make_cache(model, SPEC)), max_new_tokens=NEW, do_sample=False)


def test_a_used_cache_refuses_an_unrelated_prompt(model, tokenizer):
    cache = make_cache(model, SPEC)
    _greedy(model, tokenizer(PROMPTS[0], return_tensors="pt"), cache)
    # the same prompt again (here the cache holds twice its length, so generate feeds no new token),
    # or another prompt shorter than what the cache holds
    for prompt in (PROMPTS[0], PROMPTS[1]):
        with pytest.raises(ValueError, match="new ScopeCache"):
            _greedy(model, tokenizer(prompt, return_tensors="pt"), cache)


def test_a_batch_of_unrelated_prompts_takes_one_fresh_cache_per_call(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)  # left padding (the fixture's)
    assert batch["attention_mask"][:, 0].tolist() == [0, 0, 1] and batch["attention_mask"][:, -1].all()
    out = _greedy(model, batch, make_cache(model, SPEC))
    new = out[:, batch["input_ids"].shape[-1] :]
    for row, prompt in enumerate(PROMPTS):
        ids, _ = _alone(model, tokenizer, prompt)
        assert _decode(tokenizer, new[row].tolist()) == _decode(tokenizer, ids), f"row {row} differs from alone"


def test_a_budget_set_from_the_prompt_needs_one_prompt_length_per_cache(model, tokenizer):
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(SpecError, match="one cache per prompt length"):
        make_cache(model, "unified-h2o:prompt+8/4", prompt_tokens=batch["attention_mask"])
    # grouped by length, each group gets its cache
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        cache = make_cache(model, "unified-h2o:prompt+8/4", prompt_tokens=inputs["attention_mask"])
        _greedy(model, inputs, cache)
        assert cache.kv_length(0) <= inputs["input_ids"].shape[-1] + 8


def test_a_conversation_continues_with_the_previous_output(model, tokenizer):
    cache = make_cache(model, SPEC)
    first = tokenizer(PROMPTS[0], return_tensors="pt")
    out = _greedy(model, first, cache)
    turn = tokenizer(" And then?", return_tensors="pt")["input_ids"]
    ids = torch.cat([out, turn], dim=-1)
    second = _greedy(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cache)
    assert second.shape[-1] == ids.shape[-1] + NEW
    assert cache.get_seq_length() == ids.shape[-1] + NEW - 1
    # Memory grows by the new turn plus at most the budget: turn 1 left prompt + B entries, which
    # join the prefill pool with the new input (turn 1's last token, never fed back, and the turn).
    budget = Slide(8, 4).budget
    assert cache.kv_length(0) == (first["input_ids"].shape[-1] + budget) + (1 + turn.shape[-1]) + budget


def test_what_cannot_be_detected_a_longer_unrelated_history(model, tokenizer):
    """Inputs longer than what the cache holds are taken as a continuation: transformers feeds only
    the tokens past the cache's length, so a different history of that length is not seen."""
    cache = make_cache(model, SPEC)
    first = tokenizer(PROMPTS[1], return_tensors="pt")
    _greedy(model, first, cache)
    other = tokenizer(PROMPTS[2], return_tensors="pt")  # longer than prompt + output held so far
    assert other["input_ids"].shape[-1] > cache.get_seq_length()
    _greedy(model, other, cache)  # accepted: the documented limit


def test_stop_strings_work(model, tokenizer):
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    full = _greedy(model, inputs, DynamicCache(config=model.config))
    text = _decode(tokenizer, full[0, inputs["input_ids"].shape[-1] :].tolist())
    stop = text[10:12]  # a string the greedy answer writes, after the budget is reached
    ref = _greedy(model, inputs, DynamicCache(config=model.config), stop_strings=[stop], tokenizer=tokenizer)
    got = _greedy(model, inputs, ScopeCache(model, decoding=Slide(10_000, 4)), stop_strings=[stop], tokenizer=tokenizer)
    assert torch.equal(got, ref) and got.shape[-1] < full.shape[-1]
    assert _decode(tokenizer, got[0, inputs["input_ids"].shape[-1] :].tolist()).endswith(stop)
    compressed = _greedy(model, inputs, make_cache(model, SPEC), stop_strings=[stop], tokenizer=tokenizer)
    new = _decode(tokenizer, compressed[0, inputs["input_ids"].shape[-1] :].tolist())
    at = new.find(stop)
    assert at == -1 or at + len(stop) == len(new)  # a compressed cache stops at the first occurrence too


def test_an_empty_prompt_gets_a_clear_error(model):
    ids = torch.zeros((1, 0), dtype=torch.long)
    with pytest.raises(ValueError, match="at least one"):
        _greedy(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, make_cache(model, SPEC))
