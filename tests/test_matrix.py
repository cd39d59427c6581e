"""Every prefill compressor x every decoding strategy, on tiny random models.

For each pair: (1) with small budgets a padded batch runs, each layer keeps exactly what the
compressor promises after prefill, and the decoding bound holds at every step; (2) with
budgets above every length the logits equal the full cache's (DynamicCache) at every step.
A manual greedy loop (positions from the padding mask, as generate computes them) keeps this fast.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import kvpress_module, make_model
from scope_kv import (
    H2O,
    Adaptive,
    Discontinuous,
    PyramidKV,
    ScopeCache,
    ScopeLayer,
    Slide,
    SnapKV,
    StreamingLLM,
    UnifiedH2O,
    UnifiedStreamingLLM,
)
from scope_kv.compat import cache_kwargs
from scope_kv.integrations.kvpress import KVPressPrefill

PROMPT, STEPS = 28, 10
HUGE = 4096


def _kvpress(budget: int):
    press = kvpress_module("snapkv_press").SnapKVPress(compression_ratio=0.5, window_size=4, kernel_size=3)
    return KVPressPrefill(press, budget=budget)


PREFILLS = {
    "full": lambda b: None,
    "snapkv": lambda b: SnapKV(budget=b, window=4, kernel=5),
    "pyramidkv": lambda b: PyramidKV(budget=b, window=4, kernel=5, beta=2),
    "h2o": lambda b: H2O(budget=b, recent=4, block=8),
    "streamingllm": lambda b: StreamingLLM(budget=b, sinks=2),
    "kvpress_snapkv": _kvpress,
}
DECODINGS = {
    "none": lambda b: None,
    "slide": lambda b: Slide(b, 2),
    # Adaptive budgets start at `recent`: above every length only with recent near the budget.
    "adaptive": lambda b: Adaptive(b, 2 if b < HUGE else b - 1, delta=2),
    "discontinuous": lambda b: Discontinuous(b, 2 if b < HUGE else b - 1, delta=2),
    "unified_h2o": lambda b: UnifiedH2O(3 * b, 2),
    "unified_streamingllm": lambda b: UnifiedStreamingLLM(3 * b, 2),
}


def _batch(seed: int):
    torch.manual_seed(seed)
    ids = torch.randint(3, 128, (2, PROMPT))
    mask = torch.ones_like(ids)
    ids[1, :10], mask[1, :10] = 0, 0  # 18 real tokens in row 1
    return ids, mask


def _greedy(model, cache, ids, mask, on_step=None):
    """Prefill then STEPS greedy decoding forwards; returns the logits of every forward."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
        logits.append(out.logits[:, -1])
        if on_step is not None:
            on_step(-1)
        for step in range(STEPS):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = positions[:, -1:] + 1 + step
            out = model(input_ids=token, attention_mask=mask, position_ids=position, **cache_kwargs(cache))
            logits.append(out.logits[:, -1])
            if on_step is not None:
                on_step(step)
    return torch.stack(logits)


CASES = [(p, d) for p in PREFILLS for d in DECODINGS]
MODELS = [("llama", "sdpa"), ("gemma3", "eager")]


@pytest.mark.parametrize("arch,backend", MODELS, ids=[f"{a}-{b}" for a, b in MODELS])
@pytest.mark.parametrize("prefill_name,decoding_name", CASES, ids=[f"{p}-{d}" for p, d in CASES])
def test_small_budgets_run_and_bounds_hold(arch, backend, prefill_name, decoding_name):
    model = make_model(arch, backend)
    ids, mask = _batch(seed=1)
    prefill, decoding = PREFILLS[prefill_name](12), DECODINGS[decoding_name](6)
    cache = ScopeCache(model, prefill=prefill, decoding=decoding)
    managed = [layer for layer in cache.layers if isinstance(layer, ScopeLayer)]
    real = mask.sum(-1)
    after_prefill: dict[int, int] = {}

    def check(step: int) -> None:
        for layer in managed:
            if step == -1:
                layer.finish_prefill()  # what the first decoding step would do; checked before it
                held = (layer.length - layer.start).tolist() if layer.start is not None else [layer.length] * 2
                if prefill is None:
                    expected = real.tolist() if layer.start is not None else [PROMPT, PROMPT]
                else:
                    expected = prefill.keep_counts(real, layer.layer_idx, len(cache.layers)).clamp(max=real).tolist()
                assert held == expected, f"layer {layer.layer_idx} after prefill"
                after_prefill[layer.layer_idx] = layer.length
                continue
            n = step + 1  # decoding entries appended so far
            if decoding is None:
                assert layer.length == after_prefill[layer.layer_idx] + n
            elif decoding.evicts_prompt:
                assert int((layer.length - layer.start).max()) <= decoding.budget
            else:
                assert layer.prefill_length == after_prefill[layer.layer_idx]
                assert layer.length - layer.prefill_length <= decoding.budget + decoding.slack

    logits = _greedy(model, cache, ids, mask, on_step=check)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("prefill_name,decoding_name", CASES, ids=[f"{p}-{d}" for p, d in CASES])
def test_budgets_above_every_length_equal_the_full_cache(prefill_name, decoding_name):
    model = make_model("llama", "sdpa")
    ids, mask = _batch(seed=2)
    expected = _greedy(model, DynamicCache(config=model.config), ids, mask)
    cache = ScopeCache(model, prefill=PREFILLS[prefill_name](HUGE), decoding=DECODINGS[decoding_name](HUGE))
    torch.testing.assert_close(_greedy(model, cache, ids, mask), expected, rtol=1e-5, atol=1e-5)
