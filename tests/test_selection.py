"""Shared selection mechanics and a ScopeLayer driven with random tensors (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from scope_kv import Discontinuous, ScopeLayer, Slide
from scope_kv.masks import valid_slots
from scope_kv.selection import (
    Plan,
    attention_scores,
    compact_,
    evicted,
    evicted_one,
    keep_top_,
    kept_slots,
    select_heavy,
)
from scope_kv.testing import attend, load_state


def _brute_force_keep(query, keys, valid, scaling, start, end, recent, keep):
    """docs/method.md §3 from scratch in float64 with python loops: kept candidate indices per (b, h)."""
    batch, q_heads, _, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    result = {}
    for b in range(batch):
        for h in range(kv_heads):
            score = [0.0] * length
            for g in range(group):
                qv = query[b, h * group + g, -1].double()
                logits = [
                    float(qv @ keys[b, h, j].double()) * scaling if valid is None or valid[b, j] else -math.inf
                    for j in range(length)
                ]
                top = max(logits)
                z = sum(math.exp(x - top) for x in logits)
                for j in range(length):
                    score[j] += math.exp(logits[j] - top) / z
            candidates = list(range(start, end - recent))
            ranked = sorted(candidates, key=lambda j: -score[j])
            result[(b, h)] = sorted(j - start for j in ranked[:keep])
    return result


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 2), (6, 3), (2, 2)])
def test_kept_set_equals_brute_force(seed, q_heads, kv_heads):
    g = torch.Generator().manual_seed(seed)
    batch, length, dim, start, recent, keep = 2, 30, 8, 10, 4, 7
    query = torch.randn(batch, q_heads, 1, dim, generator=g) * 2
    keys = torch.randn(batch, kv_heads, length, dim, generator=g)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :3] = False  # left padding in row 1
    scores = attention_scores(query, keys, valid, dim**-0.5)
    assert scores.shape == (batch, kv_heads, length)
    # probabilities: each KV head's scores sum to its group size; pads get nothing
    torch.testing.assert_close(scores.sum(-1), torch.full((batch, kv_heads), float(q_heads // kv_heads)))
    assert scores[1, :, :3].abs().max() == 0
    heavy = select_heavy(scores[:, :, start : length - recent], keep)
    expected = _brute_force_keep(query, keys, valid, dim**-0.5, start, length, recent, keep)
    for (b, h), idx in expected.items():
        assert heavy[b, h].tolist() == idx


def _rule_by_hand(scores, candidates, arrival, count):
    """docs/method.md §9 with python loops: per pool, the `count` candidates of lowest score, among
    equal scores the newest arrival first."""
    gone = torch.zeros(scores.shape, dtype=torch.bool)
    for b in range(scores.shape[0]):
        for h in range(scores.shape[1]):
            slots = [j for j in range(scores.shape[2]) if candidates[b, h, j]]
            slots.sort(key=lambda j: (float(scores[b, h, j]), -int(arrival[b, h, j])))
            for j in slots[: int(count[b, h])]:
                gone[b, h, j] = True
    return gone


@pytest.mark.parametrize("seed", range(6))
def test_one_eviction_rule_for_every_layout(seed):
    """`evicted` (any count, slots in any arrival order: the static layout) and `evicted_one` (the
    same rule by reductions) choose what the rule written out by hand chooses, ties included."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, n = 3, 2, 17
    scores = torch.randint(0, 4, (batch, heads, n), generator=g).float()  # many exact ties
    candidates = torch.rand(batch, heads, n, generator=g) < 0.7
    arrival = torch.stack([torch.randperm(n, generator=g) for _ in range(batch * heads)]).view(batch, heads, n)
    count = torch.randint(0, 6, (batch, heads), generator=g)
    want = _rule_by_hand(scores, candidates, arrival, count)
    assert torch.equal(evicted(scores, count, candidates, arrival), want)
    in_order = torch.arange(n).expand(batch, heads, n)
    assert torch.equal(evicted(scores, count, candidates), _rule_by_hand(scores, candidates, in_order, count))
    one = torch.ones(batch, heads, dtype=torch.long)
    assert torch.equal(evicted_one(scores, candidates, arrival), _rule_by_hand(scores, candidates, arrival, one))
    assert torch.equal(evicted_one(scores), _rule_by_hand(scores, torch.ones_like(candidates), in_order, one))
    # select_heavy keeps what the rule leaves: among equal scores the older (lower) slot stays
    kept = select_heavy(scores, n - 3)
    left = ~_rule_by_hand(scores, torch.ones_like(candidates), in_order, torch.full((batch, heads), 3))
    assert torch.equal(kept, left.nonzero()[:, 2].view(batch, heads, n - 3))
    # one entry out (Slide at budget: no sort), the same rule
    kept = select_heavy(scores, n - 1)
    left = ~_rule_by_hand(scores, torch.ones_like(candidates), in_order, one)
    assert torch.equal(kept, left.nonzero()[:, 2].view(batch, heads, n - 1))


@pytest.mark.parametrize("seed", range(4))
def test_a_plan_chooses_by_the_one_rule_in_every_form(seed):
    """`Plan.choose`, the choice every layout's pipeline makes: a count per pool among candidates
    in any arrival order (the static layout), the one-entry form (with pools that lose none), and
    an int count over slots in arrival order (the default layout); `kept_slots` lists what is left,
    with or without its sort."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, n = 3, 2, 13
    scores = torch.randint(0, 3, (batch, heads, n), generator=g).float()  # many exact ties
    candidates = torch.rand(batch, heads, n, generator=g) < 0.8
    candidates[..., 0] = True  # every pool has a candidate
    arrival = torch.stack([torch.randperm(n, generator=g) for _ in range(batch * heads)]).view(batch, heads, n)
    count = torch.randint(0, 4, (batch, heads), generator=g)
    plan = Plan(0, n, count, candidates, arrival)
    assert torch.equal(plan.choose(scores), _rule_by_hand(scores, candidates, arrival, count))
    some = count.clamp(max=1)
    one = Plan(0, n, some, candidates, arrival, one=True)
    assert torch.equal(one.choose(scores), _rule_by_hand(scores, candidates, arrival, some))
    in_order = torch.arange(n).expand(batch, heads, n)
    everything = torch.ones_like(candidates)
    for k in (1, 4):
        gone = Plan(0, n, k, one=k == 1).choose(scores)
        assert torch.equal(gone, _rule_by_hand(scores, everything, in_order, torch.full((batch, heads), k)))
        assert torch.equal(kept_slots(gone, n - k), (~gone).nonzero()[:, 2].view(batch, heads, n - k))


@pytest.mark.parametrize("seed", range(4))
def test_scores_that_are_not_numbers_never_evict_a_slot_that_is_not_a_candidate(seed):
    """A strategy's scorer may return NaN or infinities: every pool still loses exactly its count,
    only candidates go, both forms of the rule agree, and the rule ranks NaN and +inf highest
    (kept first, as a sort puts NaN) and -inf lowest."""
    g = torch.Generator().manual_seed(seed)
    batch, heads, n = 3, 2, 11
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), 0.0, 1.0, 2.0])
    scores = special[torch.randint(0, len(special), (batch, heads, n), generator=g)]
    candidates = torch.rand(batch, heads, n, generator=g) < 0.7
    candidates[..., :2] = True  # every pool has two candidates at least
    arrival = torch.stack([torch.randperm(n, generator=g) for _ in range(batch * heads)]).view(batch, heads, n)
    count = torch.minimum(torch.randint(0, 4, (batch, heads), generator=g), candidates.sum(-1))
    gone = evicted(scores, count, candidates, arrival)
    assert torch.equal(gone.sum(-1), count) and not (gone & ~candidates).any()
    keys = torch.nan_to_num(scores, nan=1e30, posinf=1e30, neginf=-1e30)  # the rule's ranking, by hand
    assert torch.equal(gone, _rule_by_hand(keys, candidates, arrival, count))
    one = torch.ones(batch, heads, dtype=torch.long)
    assert torch.equal(evicted_one(scores, candidates, arrival), evicted(scores, one, candidates, arrival))


def test_keep_top_moves_each_rows_kept_entries_behind_filler_in_order():
    g = torch.Generator().manual_seed(0)
    batch, heads, end, dim = 2, 2, 9, 3
    keys = torch.randn(batch, heads, end, dim, generator=g)
    values = torch.randn(batch, heads, end, dim, generator=g)
    scores = torch.randint(0, 3, (batch, heads, end), generator=g).float()
    scores[0, :, -1] = float("inf")  # forced to stay
    start, counts = torch.tensor([0, 4]), torch.tensor([5, 3])
    k0, v0 = keys.clone(), values.clone()
    n, new_start = keep_top_(keys, values, end, scores, counts, start)
    assert n == 5 and new_start.tolist() == [0, 2]
    valid = (torch.arange(end)[None, :] >= start[:, None])[:, None, :].expand(batch, heads, end)
    gone = _rule_by_hand(
        scores, valid, torch.arange(end).expand(batch, heads, end), (end - start - counts)[:, None].expand(batch, heads)
    )
    for b in range(batch):
        for h in range(heads):
            kept = [j for j in range(end) if valid[b, h, j] and not gone[b, h, j]]
            assert torch.equal(keys[b, h, n - len(kept) : n], k0[b, h, kept])
            assert torch.equal(values[b, h, n - len(kept) : n], v0[b, h, kept])
    assert end - 1 in [j for j in range(end) if not gone[0, 0, j]]


def test_compaction_keeps_key_value_pairs_and_order():
    batch, heads, cap, dim = 2, 3, 20, 4
    start, end, recent = 5, 17, 3
    ident = torch.arange(batch * heads * cap, dtype=torch.float32).view(batch, heads, cap, 1)
    keys = ident.expand(-1, -1, -1, dim).clone()
    values = (-ident).expand(-1, -1, -1, dim).clone()
    before_keys = keys.clone()
    g = torch.Generator().manual_seed(0)
    heavy = torch.stack(
        [torch.randperm(end - start - recent, generator=g)[:4].sort().values for _ in range(batch * heads)]
    )
    heavy = heavy.view(batch, heads, 4)
    new_end = compact_(keys, values, start, end, heavy, recent)
    assert new_end == start + 4 + recent
    # prefill region untouched
    assert torch.equal(keys[:, :, :start], before_keys[:, :, :start])
    for b in range(batch):
        for h in range(heads):
            expected = [start + int(i) for i in heavy[b, h]] + list(range(end - recent, end))
            got_k = keys[b, h, start:new_end, 0]
            got_v = values[b, h, start:new_end, 0]
            assert got_k.tolist() == before_keys[b, h, expected, 0].tolist()
            assert torch.equal(got_v, -got_k)  # every kept key still has its own value


class _FakeModule(torch.nn.Module):
    pass


def _drive(strategy, prompt=12, steps=60, batch=2, kv_heads=2, q_heads=4, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    module = _FakeModule()
    layer = ScopeLayer(0, strategy, frozenset({id(module)}))
    k = torch.randn(batch, kv_heads, prompt, dim, generator=g)
    layer.update(k, torch.randn_like(k))
    attend(layer, module, torch.randn(batch, q_heads, prompt, dim, generator=g))
    history = []
    for t in range(steps):
        k = torch.randn(batch, kv_heads, 1, dim, generator=g)
        keys, values = layer.update(k, -k)
        assert keys.shape[-2] == layer.length and torch.equal(keys[:, :, -1:], k)
        query = torch.randn(batch, q_heads, 1, dim, generator=g) * 3
        attend(layer, module, query)
        history.append((t, layer.length))
        # keys/values stay paired through every compaction (values were stored as -keys)
        assert torch.equal(layer.values[:, :, prompt : layer.length], -layer.keys[:, :, prompt : layer.length])
    return layer, history


@pytest.mark.parametrize("strategy", [Slide(8, 3), Discontinuous(10, 2, delta=3)], ids=["slide", "discontinuous"])
def test_layer_bounds_with_random_tensors(strategy):
    layer, history = _drive(strategy)
    for t, length in history:
        assert length <= 12 + strategy.budget_at(t) + strategy.slack
    assert layer.capacity == 12 + strategy.max_held
    assert layer.seen == 12 + 60 and layer.prefill_length == 12


def test_layer_rejects_another_model():
    layer = ScopeLayer(0, Slide(4, 2), frozenset({1}))
    k = torch.randn(1, 1, 3, 4)
    layer.update(k, k)
    with pytest.raises(ValueError, match="another model"):
        attend(layer, _FakeModule(), torch.randn(1, 1, 3, 4))


def test_layer_detects_attention_that_bypassed_scope():
    module = _FakeModule()
    layer = ScopeLayer(0, Slide(4, 2), frozenset({id(module)}))
    k = torch.randn(1, 1, 3, 4)
    layer.update(k, k)  # ... and the attention function never ran
    with pytest.raises(RuntimeError, match="never went through transformers. AttentionInterface"):
        layer.update(k[:, :, :1], k[:, :, :1])


@pytest.mark.parametrize(
    "strategy", [Slide(8, 3), Discontinuous(10, 2, delta=3), None], ids=["slide", "discontinuous", "unbounded"]
)
def test_load_state_continues_exactly_like_the_run_it_copies(strategy):
    """A layer put into a state with load_state behaves, step for step, as the layer that got there."""
    g = torch.Generator().manual_seed(7)
    module = _FakeModule()
    a = ScopeLayer(0, strategy, frozenset({id(module)}))
    k = torch.randn(2, 2, 12, 8, generator=g)
    a.update(k, -k)
    attend(a, module, torch.randn(2, 4, 12, 8, generator=g))
    steps = [(torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 4, 1, 8, generator=g) * 3) for _ in range(40)]
    for k, q in steps[:20]:
        a.update(k, -k)
        attend(a, module, q)
    b = ScopeLayer(0, strategy, frozenset({id(module)}))
    load_state(
        b,
        a.keys[:, :, : a.length],
        a.values[:, :, : a.length],
        prefill_length=a.prefill_length,
        seen=a.seen,
        step=a.step,
        skipped=a.skipped,
    )
    assert (b.length, b.seen, b.step, b.skipped, b.capacity) == (a.length, a.seen, a.step, a.skipped, a.capacity)
    for k, q in steps[20:]:
        for layer in (a, b):
            layer.update(k, -k)
            attend(layer, module, q)
        assert (a.length, a.seen, a.step, a.skipped) == (b.length, b.seen, b.step, b.skipped)
        assert torch.equal(a.keys[:, :, : a.length], b.keys[:, :, : b.length])
        assert torch.equal(a.values[:, :, : a.length], b.values[:, :, : b.length])


def test_load_state_refuses_states_the_strategy_cannot_be_in():
    module = _FakeModule()
    layer = ScopeLayer(0, Slide(8, 3), frozenset({id(module)}))
    kv = torch.randn(1, 2, 30, 8)
    with pytest.raises(ValueError, match="exceeds"):
        load_state(layer, kv, kv, prefill_length=12, step=100)  # 18 decoding entries > budget 8
    with pytest.raises(ValueError, match="exceeds"):
        load_state(layer, kv[:, :, :16], kv[:, :, :16], prefill_length=12, step=2)  # 4 entries after 2 steps
    with pytest.raises(ValueError, match="prefill_length"):
        load_state(layer, kv, kv, prefill_length=0)
    load_state(layer, kv[:, :, :20], kv[:, :, :20], prefill_length=12, seen=400, step=388)
    assert layer.capacity == 12 + Slide(8, 3).max_held
    with pytest.raises(ValueError, match="empty layer"):
        load_state(layer, kv, kv, prefill_length=12)
