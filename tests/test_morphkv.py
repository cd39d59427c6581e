"""MorphKV on SCOPE's split and as a unified baseline: the brute-force reference
(tests/window_reference.py) on every tiny architecture, a padded batch with a masked span; settings."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from oracle import forced_decode
from scope_kv import MorphKV, ScopeCache, ScopeLayer, UnifiedMorphKV
from scope_kv.spec import parse_spec
from test_rkv import NEAR_TIE
from window_reference import MorphRule, rkv_reference_logits

PROMPT, STEPS = 16, 24
CASES = [
    pytest.param(lambda: MorphKV(7, 3), MorphRule(7, 3), id="morphkv"),
    pytest.param(lambda: MorphKV(6, 2, fusion="sum"), MorphRule(6, 2, "sum"), id="morphkv-sum"),
    pytest.param(lambda: UnifiedMorphKV(14, 3), MorphRule(14, 3, unified=True), id="unified-morphkv"),
]


def _compare(model, strategy, rule, prompts):
    """As tests/test_rkv.py: the first prompt whose selections are free of near-ties is compared."""
    for ids, mask in prompts:
        cache = ScopeCache(model, decoding=strategy)
        tokens, logits = forced_decode(model, cache, ids, mask, STEPS)
        assert all(layer.selections > 0 for layer in cache.layers if isinstance(layer, ScopeLayer))
        expected, state = rkv_reference_logits(model, rule, ids, mask, tokens)
        if state.margin < NEAR_TIE:
            continue
        for step, (a, b) in enumerate(zip(logits, expected, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        return
    raise AssertionError(f"every prompt met a near-tie (score gap < {NEAR_TIE}); add prompts")


def _prompt(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("strategy,rule", CASES)
def test_morphkv_matches_the_brute_force_reference(arch, backend, strategy, rule):
    model = make_model(arch, backend)
    prompts = [(ids, torch.ones_like(ids)) for ids in (_prompt(2, s) for s in range(1, 6))]
    _compare(model, strategy(), rule, prompts)


@pytest.mark.parametrize("strategy,rule", CASES)
def test_morphkv_matches_the_reference_on_a_padded_batch_with_a_masked_span(strategy, rule):
    model = make_model("llama", "sdpa")
    mask = torch.ones(3, PROMPT, dtype=torch.long)
    mask[0, :5] = 0
    mask[2, 6:9] = 0
    prompts = [(_prompt(3, s).masked_fill(mask == 0, 0), mask) for s in range(3, 8)]
    _compare(model, strategy(), rule, prompts)


def test_the_pool_is_held_at_its_budget_from_every_step():
    model = make_model("llama")
    ids = _prompt(1, 0)
    cache = ScopeCache(model, decoding=MorphKV(7, 3))
    held = []
    forced_decode(model, cache, ids, torch.ones_like(ids), STEPS,
                  on_step=lambda s: held.append(cache.layers[0].length - cache.layers[0].prefill_length))
    assert max(held) <= 7 and held[-1] == 7


def test_bad_fusion_says_what_to_write():
    with pytest.raises(ValueError, match=r"fusion must be one of \('max', 'sum'\)"):
        MorphKV(8, 3, fusion="mean")


@pytest.mark.parametrize("spec", ["morphkv:512/32", "morphkv:512/32,fusion=sum", "unified-morphkv:2048/200"])
def test_specs_round_trip(spec):
    decoding = parse_spec(spec).decoding
    assert decoding.describe() == spec and parse_spec(spec).decoding == decoding
