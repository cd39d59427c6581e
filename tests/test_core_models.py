"""Every architecture x backend: equality with the stock cache, and the spec's oracle."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import make_model
from oracle import Rule, forced_decode, oracle_logits
from scope_kv import Adaptive, Discontinuous, ScopeCache, ScopeLayer, Slide
from scope_kv.compat import cache_kwargs

PROMPT, STEPS = 24, 40


def _prompt(batch: int = 1, length: int = PROMPT, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, length), generator=g)


def _managed(cache: ScopeCache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, ScopeLayer)]


@pytest.mark.parametrize("decoding", [None, Slide(10_000, 16)], ids=["none", "huge-slide"])
def test_huge_budget_is_token_identical_to_dynamic_cache(arch, backend, decoding):
    model = make_model(arch, backend)
    ids = _prompt()
    kwargs = dict(max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False)
    reference = model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)
    cache = ScopeCache(model, decoding=decoding)
    out = model.generate(ids, **cache_kwargs(cache), **kwargs)
    assert torch.equal(out, reference)
    assert cache.get_seq_length() == ids.shape[1] + STEPS - 1
    # After ScopeCache(model) the model still runs the stock cache token for token.
    again = model.generate(ids, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)
    assert torch.equal(again, reference)


def _rules():
    steps = STEPS
    return [
        (Slide(8, 3), Rule("slide", 8, 3)),
        (Slide(12, 4), Rule("slide", 12, 4)),
        (Adaptive(10, 4, max_new_tokens=steps), Rule("adaptive", 10, 4, (steps - 4) // (10 - 4))),
        (Adaptive(9, 2, delta=3), Rule("adaptive", 9, 2, 3)),
        (Discontinuous(10, 4, max_new_tokens=steps), Rule("discontinuous", 10, 4, (steps - 4) // (10 - 4))),
        (Discontinuous(8, 3, delta=2), Rule("discontinuous", 8, 3, 2)),
    ]


def _check_bounds(cache, rule: Rule, prompt_slots: int, slack: int):
    def check(step: int) -> None:
        # `step` decode forwards have now completed; the last one ran at t = step.
        allowed = prompt_slots + rule.budget_at(step) + slack
        for i in _managed(cache):
            held = cache.kv_length(i)
            assert held <= allowed, f"layer {i} holds {held} > {allowed} after decode step {step}"
            layer = cache.layers[i]
            assert layer.capacity <= prompt_slots + rule.budget + slack + 1

    return check


@pytest.mark.parametrize("strategy,rule", _rules(), ids=lambda x: getattr(x, "kind", None) or repr(x))
def test_small_budget_matches_oracle(arch, backend, strategy, rule):
    model = make_model(arch, backend)
    ids = _prompt(batch=2, seed=1)
    mask = torch.ones_like(ids)
    cache = ScopeCache(model, decoding=strategy)
    slack = rule.delta if rule.kind == "discontinuous" else 0
    tokens, logits = forced_decode(
        model, cache, ids, mask, STEPS, on_step=_check_bounds(cache, rule, ids.shape[1], slack)
    )
    # Compression really happened in every managed layer.
    for i in _managed(cache):
        assert cache.layers[i].selections > 0
        assert cache.kv_length(i) < ids.shape[1] + STEPS
    expected, _ = oracle_logits(model, rule, ids, mask, tokens)
    assert len(expected) == len(logits)
    for step, (a, b) in enumerate(zip(logits, expected)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")


def test_oracle_detects_a_wrong_rule():
    """The oracle comparison has teeth: a different budget gives different logits."""
    model = make_model("llama")
    ids = _prompt(seed=2)
    mask = torch.ones_like(ids)
    tokens, logits = forced_decode(model, ScopeCache(model, decoding=Slide(8, 3)), ids, mask, STEPS)
    wrong, _ = oracle_logits(model, Rule("slide", 9, 3), ids, mask, tokens)
    assert max((a - b).abs().max().item() for a, b in zip(logits, wrong)) > 1e-3


@pytest.mark.parametrize("strategy,rule", _rules()[::2], ids=["slide", "adaptive", "discontinuous"])
def test_left_padded_batch_matches_oracle(strategy, rule):
    model = make_model("llama", "sdpa")
    ids = _prompt(batch=3, seed=3)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :11] = 0
    ids = ids.masked_fill(mask == 0, 0)
    cache = ScopeCache(model, decoding=strategy)
    tokens, logits = forced_decode(model, cache, ids, mask, STEPS)
    expected, _ = oracle_logits(model, rule, ids, mask, tokens)
    for step, (a, b) in enumerate(zip(logits, expected)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
