"""Property test: any valid setting runs without error or NaN, and memory bounds hold every step."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_model
from oracle import forced_decode
from scope_kv import Adaptive, Discontinuous, ScopeCache, ScopeLayer, Slide

MODEL = make_model("qwen3", "sdpa")


@st.composite
def scenarios(draw):
    kind = draw(st.sampled_from(["slide", "adaptive", "discontinuous", "none"]))
    budget = draw(st.integers(2, 24))
    recent = draw(st.integers(1, budget - 1))
    steps = draw(st.integers(1, 28))
    if kind == "slide":
        strategy = Slide(budget, recent)
    elif kind == "none":
        strategy = None
    else:
        cls = Adaptive if kind == "adaptive" else Discontinuous
        if draw(st.booleans()):
            strategy = cls(budget, recent, delta=draw(st.integers(1, 6)))
        else:
            strategy = cls(budget, recent, max_new_tokens=draw(st.integers(budget, 64)))
    batch = draw(st.integers(1, 3))
    lengths = [draw(st.integers(1, 20)) for _ in range(batch)]
    return strategy, lengths, steps, draw(st.integers(0, 2**16))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_any_setting_runs_bounded_and_finite(scenario):
    strategy, lengths, steps, seed = scenario
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, 128, (n,), generator=g)
        mask[row, width - n :] = 1
    cache = ScopeCache(MODEL, decoding=strategy)
    managed = [i for i, layer in enumerate(cache.layers) if isinstance(layer, ScopeLayer)]

    def check(step: int) -> None:
        for i in managed:
            layer = cache.layers[i]
            assert layer.seen == width + step + 1
            assert layer.prefill_length == width
            if strategy is None:
                assert layer.length == layer.seen
            else:
                assert layer.length <= width + strategy.budget_at(step) + strategy.slack
                assert layer.capacity <= width + strategy.max_held

    tokens, logits = forced_decode(MODEL, cache, ids, mask, steps, on_step=check)
    assert all(torch.isfinite(x).all() for x in logits)
    assert cache.get_seq_length() == width + steps
