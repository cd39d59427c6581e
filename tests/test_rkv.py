"""R-KV on SCOPE's split and as a unified baseline: the brute-force reference (tests/window_reference.py)
on every tiny architecture, padded batches and masked spans included; the rule's parts; settings."""

from __future__ import annotations

import pytest
import torch

from conftest import make_model
from oracle import forced_decode
from window_reference import RKVRule, rkv_reference_logits
from scope_kv import RKV, ScopeCache, ScopeLayer, UnifiedRKV, make_cache
from scope_kv.rkv import rkv_scores
from scope_kv.spec import parse_spec

PROMPT, STEPS = 16, 30
CASES = [
    pytest.param(lambda: RKV(6, 3, buffer=4), RKVRule(6, 3, 4), id="rkv"),
    pytest.param(lambda: RKV(7, 2, buffer=3, mix=0.5, kernel=3, threshold=0.2), RKVRule(7, 2, 3, 0.5, 3, 0.2),
                 id="rkv-settings"),
    pytest.param(lambda: UnifiedRKV(14, 3, buffer=4), RKVRule(14, 3, 4, unified=True), id="unified-rkv"),
]


def _prompt(batch: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))


NEAR_TIE = 1e-6  # score gap below which float32 rounding may order two candidates either way


def _compare(model, strategy, rule, prompts):
    """Compare with the reference on the first of ``prompts`` (ids, mask) whose selections all cut
    between scores more than NEAR_TIE apart (at such a near-tie the run and the reference may keep
    different, equally good entries); at least one prompt must be free of near-ties."""
    for ids, mask in prompts:
        cache = ScopeCache(model, decoding=strategy)
        tokens, logits = forced_decode(model, cache, ids, mask, STEPS)
        for layer in cache.layers:
            if isinstance(layer, ScopeLayer):
                assert layer.selections > 0  # the rule really ran
        expected, state = rkv_reference_logits(model, rule, ids, mask, tokens)
        if state.margin < NEAR_TIE:
            continue
        assert len(expected) == len(logits)
        for step, (a, b) in enumerate(zip(logits, expected, strict=True)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
        return
    raise AssertionError(f"every prompt met a near-tie (score gap < {NEAR_TIE}); add prompts")


@pytest.mark.parametrize("strategy,rule", CASES)
def test_rkv_matches_the_brute_force_reference(arch, backend, strategy, rule):
    model = make_model(arch, backend)
    prompts = [(ids, torch.ones_like(ids)) for ids in (_prompt(batch=2, seed=s) for s in range(1, 6))]
    _compare(model, strategy(), rule, prompts)


@pytest.mark.parametrize("strategy,rule", CASES)
def test_rkv_matches_the_reference_on_a_padded_batch_with_a_masked_span(strategy, rule):
    model = make_model("llama", "sdpa")
    mask = torch.ones(3, PROMPT, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    mask[2, 6:9] = 0  # a masked span
    prompts = [(_prompt(batch=3, seed=s).masked_fill(mask == 0, 0), mask) for s in range(3, 8)]
    _compare(model, strategy(), rule, prompts)


def test_the_reference_comparison_has_teeth():
    model = make_model("llama")
    ids = _prompt(seed=2)
    mask = torch.ones_like(ids)
    tokens, logits = forced_decode(model, ScopeCache(model, decoding=RKV(6, 3, buffer=4)), ids, mask, STEPS)
    other, _ = rkv_reference_logits(model, RKVRule(6, 3, 4, mix=0.9), ids, mask, tokens)
    assert max((a - b).abs().max().item() for a, b in zip(logits, other, strict=True)) > 1e-3


def test_the_pool_grows_by_the_buffer_and_is_cut_back_to_the_budget():
    model = make_model("llama")
    ids = _prompt()
    cache = ScopeCache(model, decoding=RKV(6, 3, buffer=4))
    held = []
    forced_decode(model, cache, ids, torch.ones_like(ids), STEPS,
                  on_step=lambda s: held.append(cache.layers[0].length - cache.layers[0].prefill_length))
    assert max(held) <= 6 + 4 - 1 and held.count(6) >= 3  # budget + buffer - 1 between steps; cut to 6
    assert cache.layers[0].capacity <= PROMPT + RKV(6, 3, buffer=4).max_held


def test_of_near_duplicate_keys_the_newest_is_kept():
    """Redundancy: each key's newest look-alike does not count it, so of three copies the newest
    loses the most similarity (and is kept first), the oldest none (importance switched off)."""
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(1, 1, 9, 16, generator=g)
    keys[0, 0, 4] = keys[0, 0, 1] * 1.01  # slots 1, 4 and 6 are one key
    keys[0, 0, 6] = keys[0, 0, 1] * 0.99
    valid = torch.ones(1, 1, 9, dtype=torch.bool)
    candidates = valid.clone()
    candidates[..., 7:] = False
    window = torch.randn(1, 1, 2, 16, generator=g)
    scores = rkv_scores(keys, valid, candidates, window, torch.ones(1, 2, dtype=torch.bool), 0.25, 0.0, 7, 0.5)[0, 0]
    others = [s for i, s in enumerate(scores[:7].tolist()) if i not in (1, 4, 6)]
    assert scores[6] > scores[4] > scores[1]  # newest first
    assert scores[1] < min(others)  # the oldest copy is the most redundant entry


def test_importance_is_pooled_over_neighbouring_candidates():
    keys = torch.zeros(1, 1, 9, 4)
    keys[0, 0, :, 0] = torch.arange(9.0)  # (all alike: redundancy is flat)
    keys[0, 0, 4, 1] = 50.0  # the window attends to slot 4 alone
    window = torch.zeros(1, 1, 1, 4)
    window[0, 0, 0, 1] = 1.0
    valid = torch.ones(1, 1, 9, dtype=torch.bool)
    candidates = valid.clone()
    candidates[..., 8] = False
    scores = rkv_scores(keys, valid, candidates, window, torch.ones(1, 1, dtype=torch.bool), 1.0, 1.0, 3, 0.99)
    assert torch.allclose(scores[0, 0, 3:6], scores[0, 0, 4].expand(3))  # slots 3-5 share slot 4's peak
    assert scores[0, 0, 2] < scores[0, 0, 3] and scores[0, 0, 6] < scores[0, 0, 5]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(buffer=0), "buffer must be >= 1"),
        (dict(kernel=4), "kernel must be odd"),
        (dict(mix=1.5), r"mix must be a number in \[0, 1\]"),
        (dict(threshold=-2.0), r"threshold must be a number in \[-1, 1\]"),
        (dict(recent=8), "recent .* must be smaller than budget"),
    ],
)
def test_bad_settings_say_what_to_change(kwargs, message):
    with pytest.raises((TypeError, ValueError), match=message):
        RKV(8, **{"recent": 3, **kwargs})


@pytest.mark.parametrize(
    "spec", ["rkv:512/8", "rkv:512/8,buffer=64,mix=0.2,kernel=3,threshold=0.4", "unified-rkv:2048/8,buffer=32"]
)
def test_specs_round_trip(spec):
    decoding = parse_spec(spec).decoding
    assert decoding.describe() == spec
    assert parse_spec(decoding.describe()).decoding == decoding


def test_a_prompt_relative_unified_budget():
    model = make_model("llama")
    cache = make_cache(model, "unified-rkv:prompt+6/3,buffer=4", prompt_tokens=PROMPT)
    assert cache.decoding == UnifiedRKV(PROMPT + 6, 3, buffer=4)


@pytest.mark.parametrize("strategy", [RKV(10_000, 8), UnifiedRKV(10_000, 8)], ids=["rkv", "unified-rkv"])
def test_a_budget_that_evicts_nothing_gives_dynamic_cache_tokens_with_beams_and_padding(strategy):
    from transformers import DynamicCache

    from conftest import left_pad
    from scope_kv.compat import cache_kwargs

    model = make_model("qwen3")
    g = torch.Generator().manual_seed(4)
    ids, mask = left_pad([torch.randint(3, 128, (n,), generator=g) for n in (14, 9)])
    kwargs = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, num_beams=2, pad_token_id=0)
    reference = model.generate(ids, attention_mask=mask, **cache_kwargs(DynamicCache(config=model.config)), **kwargs)
    out = model.generate(ids, attention_mask=mask, **cache_kwargs(ScopeCache(model, decoding=strategy)), **kwargs)
    assert torch.equal(out, reference)


def test_per_query_head_selection_runs_and_stays_bounded():
    model = make_model("llama")
    ids = _prompt(batch=2)
    cache = ScopeCache(model, decoding=RKV(6, 3, buffer=4), per_query_head=True)
    forced_decode(model, cache, ids, torch.ones_like(ids), STEPS)
    for layer in cache.layers:
        assert layer.selections > 0 and layer.length - layer.prefill_length <= 6 + 4 - 1
