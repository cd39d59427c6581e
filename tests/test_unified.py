"""Unified baselines (docs/method.md §7): one budget over prompt and generated entries."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import DynamicCache

import prefill_reference as ref
from conftest import make_model
from scope_kv import ScopeCache, ScopeLayer, SnapKV, UnifiedH2O, UnifiedStreamingLLM
from scope_kv.compat import cache_kwargs
from scope_kv.testing import attend

DIM = 8


class _Attention(torch.nn.Module):
    pass


def _held_positions(layer, k_all, b=0):
    valid = layer.keys[b, :, int(layer.start[b]) : layer.length]
    out = []
    for h in range(k_all.shape[1]):
        distance = (valid[h][:, None, :] - k_all[b, h][None, :, :]).abs().amax(dim=-1)
        assert torch.all(distance.min(dim=-1).values < 1e-6)
        out.append(distance.argmin(dim=-1).tolist())
    return out


def _drive(strategy, prompt=24, steps=30, q_heads=4, kv_heads=2, seed=0):
    """Prefill `prompt` random entries, then decode `steps`; yields (layer, q, k, t) after each step."""
    g = torch.Generator().manual_seed(seed)
    n = prompt + steps
    q = torch.randn(1, q_heads, n, DIM, generator=g) * 1.5
    k = torch.randn(1, kv_heads, n, DIM, generator=g) * 1.5
    v = torch.randn(1, kv_heads, n, DIM, generator=g)
    module = _Attention()
    layer = ScopeLayer(0, strategy, frozenset({id(module)}))
    keys, _ = layer.update(k[:, :, :prompt], v[:, :, :prompt])
    attend(layer, module, q[:, :, :prompt], scaling=ref.default_scale(DIM))
    for t in range(steps):
        pos = prompt + t
        keys, _ = layer.update(k[:, :, pos : pos + 1], v[:, :, pos : pos + 1])
        attend(layer, module, q[:, :, pos : pos + 1], scaling=ref.default_scale(DIM))  # the layer's own mask
        yield layer, q, k, pos


@pytest.mark.parametrize("budget,recent", [(16, 4), (20, 1), (30, 10)])
def test_unified_h2o_matches_the_spec_rule_step_by_step(budget, recent):
    held = None
    for layer, q, k, pos in _drive(UnifiedH2O(budget, recent)):
        if held is None:
            held = [list(range(pos)) for _ in range(k.shape[1])]
        held = ref.unified_h2o_step(q[0, :, pos], k[0], [h + [pos] for h in held], budget, recent, ref.default_scale(DIM))
        assert _held_positions(layer, k) == held
        assert layer.length == min(budget, pos + 1)


class _NaNOlder(UnifiedH2O):
    """A scorer that returns NaN for the older three quarters of what it scores."""

    def score(self, step, first, last):
        scores = super().score(step, first, last).clone()
        scores[..., : 3 * scores.shape[-1] // 4] = float("nan")
        return scores


def test_a_scorer_returning_nan_still_keeps_the_budget_and_the_newest():
    budget, recent = 16, 4
    for layer, _q, k, pos in _drive(_NaNOlder(budget, recent)):
        assert int(layer.start[0]) == 0 and layer.length == min(budget, pos + 1)
        held = _held_positions(layer, k)
        assert all(set(range(pos + 1 - recent, pos + 1)) <= set(h) for h in held)


@pytest.mark.parametrize("budget,recent", [(16, 4), (10, 9)])
def test_unified_streamingllm_keeps_the_first_and_the_newest(budget, recent):
    for layer, q, k, pos in _drive(UnifiedStreamingLLM(budget, recent)):
        n = pos + 1
        expected = list(range(n)) if n <= budget else list(range(budget - recent)) + list(range(n - recent, n))
        assert _held_positions(layer, k) == [expected, expected]


@pytest.mark.parametrize("strategy", [UnifiedH2O(4096, 8), UnifiedStreamingLLM(4096, 8)], ids=["h2o", "streamingllm"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_budget_above_the_total_equals_the_full_cache(strategy, backend):
    model = make_model("llama", backend)
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 30))
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 0, 0
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False)
    full = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(DynamicCache(config=model.config)), **gen)
    ours = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(ScopeCache(model, decoding=strategy)), **gen)
    assert torch.equal(full, ours)


@pytest.mark.parametrize("strategy", [UnifiedH2O(20, 6), UnifiedStreamingLLM(20, 6)], ids=["h2o", "streamingllm"])
def test_one_budget_bounds_everything_and_padded_rows_decode_alone(strategy):
    model = make_model("qwen3", "sdpa")
    torch.manual_seed(2)
    ids = torch.randint(3, 128, (3, 30))
    mask = torch.ones_like(ids)
    pads = [0, 12, 24]  # the last row's prompt (6 tokens) is far below the budget
    for b, pad in enumerate(pads):
        ids[b, :pad], mask[b, :pad] = 0, 0
    gen = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)
    cache = ScopeCache(model, decoding=strategy)
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), **gen)
    for idx in range(2):
        layer = cache.layers[idx]
        assert layer.length == 20
        held = (layer.length - layer.start).tolist()
        assert held == [20, 20, 6 + 9]  # the newest entry of the last step is not in the cache yet
        assert layer.capacity <= strategy.budget + 1  # the storage the prompt needed was given back
    for b, pad in enumerate(pads):
        alone = model.generate(input_ids=ids[b : b + 1, pad:], **cache_kwargs(ScopeCache(model, decoding=strategy)), **gen)
        assert torch.equal(alone[0, 30 - pad :], out[b, 30:]), f"row {b}"


def test_unified_over_a_compressed_prefill():
    """Prefill compression first, then one unified budget over what is left plus the output."""
    model = make_model("llama")
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (1, 40))
    cache = ScopeCache(model, prefill=SnapKV(budget=16, window=4), decoding=UnifiedH2O(24, 4))
    model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert cache.kv_length(0) == 16 + 2  # compressed prompt plus two decoded entries, below 24
    cache = ScopeCache(model, prefill=SnapKV(budget=16, window=4), decoding=UnifiedH2O(24, 4))
    model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert cache.kv_length(0) == cache.kv_length(1) == 24


def test_unified_budget_must_exceed_recent():
    with pytest.raises(ValueError, match="recent"):
        UnifiedH2O(8, 8)
    with pytest.raises(ValueError, match="recent"):
        UnifiedStreamingLLM(4, 5)


@pytest.mark.parametrize("fast", [False, True], ids=["default", "grouped-decode"])
def test_eager_decode_steps_never_wait_for_the_device(monkeypatch, fast):
    """An eager decode step reads nothing back from the device for any built-in strategy, the
    unified baselines included: they plan each row's pool on the host from held counts they keep
    there, so the only reads are one per layer when prefill ends (on a GPU each read would stall
    the host until the device caught up, every layer of every step)."""
    from scope_kv import Adaptive, Discontinuous, Slide

    reads: list[str] = []
    decoding_started = [False]
    for name in ("tolist", "item", "__bool__", "__int__", "__index__", "__float__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename.replace("\\", "/")
            if decoding_started[0] and "/scope_kv/" in caller:
                reads.append(f"{_name} in {caller.rsplit('/scope_kv/', 1)[1]}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def first_step(input_ids, scores):
        decoding_started[0] = True
        return scores

    model = make_model("llama")
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, 100, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row: rows hold different numbers of entries
    strategies = [Slide(8, 4), Adaptive(8, 4, max_new_tokens=24), Discontinuous(8, 4, max_new_tokens=24),
                  UnifiedH2O(16, 4), UnifiedStreamingLLM(16, 4)]
    for strategy in strategies:
        reads.clear()
        decoding_started[0] = False
        cache = ScopeCache(model, decoding=strategy)
        for layer in cache.layers:
            layer.fast_decode = fast
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                       logits_processor=[first_step], **cache_kwargs(cache))
        assert cache.layers[0].selections > 0, strategy
        expected = 2 * layers if strategy.evicts_prompt else 0  # the starts, once per layer
        assert len(reads) == expected, (strategy, reads)
