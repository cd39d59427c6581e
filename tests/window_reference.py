"""Brute-force references of the window-scored rules, R-KV and MorphKV (docs/methods.md), built on a full `DynamicCache`.

As the SCOPE oracle (tests/oracle.py) does, the reference never evicts: the cache holds every
entry, attention is restricted to the entries the rule keeps (a ``kept`` mask per layer, row and
KV head over logical positions), and the attention is plain float32 math written here. The rule
is restated from docs/methods.md with Python loops over rows, heads, window queries and entries;
nothing is imported from ``scope_kv`` except to drive the run under test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from oracle import allowed_slots, reference_logits

NAME = "scope_test_rkv_reference"
_STATE = "scope_rkv_reference_state"


@dataclass
class RKVRule:
    budget: int
    window: int  # alpha: the newest entries kept, whose queries score the others
    buffer: int
    mix: float = 0.1
    kernel: int = 7
    threshold: float = 0.5
    unified: bool = False  # one budget over prompt and output (else the prompt is kept whole)


@dataclass
class MorphRule:
    """MorphKV (docs/methods.md): every step at budget, the newest ``window`` and the best
    ``budget - window`` others by the window queries' attention (group-summed logits, softmax over
    the candidates, fused by max or sum)."""

    budget: int
    window: int
    fusion: str = "max"
    unified: bool = False
    buffer: int = 0  # (selects whenever the pool holds `budget`)


@dataclass
class _State:
    rule: RKVRule | MorphRule
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, kv_heads, L) bool
    region: dict[int, int] = field(default_factory=dict)  # layer -> first position the rule may evict
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, q_heads, L, dim)
    real: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, L) bool: not padding
    # the smallest gap between the last kept and the first evicted score of any selection: below
    # float32's resolution of the scores, an implementation may break the near-tie either way
    margin: float = math.inf


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state: _State = kwargs.pop(_STATE)
    if getattr(module, "sliding_window", None) is not None or getattr(module, "is_sliding", False):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layer = module.layer_idx
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    allowed = allowed_slots(attention_mask, batch, q_len, length)
    real = allowed[:, 0, -1, :]  # the last query sees every real entry
    if q_len > 1:  # prefill: every real entry kept
        state.kept[layer] = real[:, None, :].expand(batch, kv_heads, length).clone()
        state.region[layer] = 0 if state.rule.unified else length
        state.queries[layer] = query.float()
        state.real[layer] = real.clone()
        decode = False
    else:
        state.kept[layer] = torch.cat([state.kept[layer], torch.ones(batch, kv_heads, 1, dtype=torch.bool)], -1)
        state.queries[layer] = torch.cat([state.queries[layer], query.float()], dim=2)
        state.real[layer] = torch.cat([state.real[layer], torch.ones(batch, 1, dtype=torch.bool)], -1)
        decode = True
    allowed = allowed & state.kept[layer].repeat_interleave(group, dim=1)[:, :, None, :]
    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, v).to(query.dtype).transpose(1, 2).contiguous()
    if decode:
        _select(state, layer, key.float(), group, scaling)
    return out, None


def _select(state: _State, layer: int, keys: torch.Tensor, group: int, scaling: float) -> None:
    rule = state.rule
    kept, queries, real = state.kept[layer], state.queries[layer], state.real[layer]
    batch, kv_heads, length = kept.shape
    for b in range(batch):
        # the observation window: the last `window` tokens fed, those that are real
        window = [p for p in range(length - rule.window, length) if p >= 0 and bool(real[b, p])]
        for h in range(kv_heads):
            region = [p for p in range(state.region[layer], length) if kept[b, h, p]]
            if len(region) < rule.budget + rule.buffer:
                continue
            candidates = region[: len(region) - rule.window]
            if len(candidates) <= rule.budget - rule.window:
                continue  # at budget: nothing to evict
            group_queries = queries[b, h * group : (h + 1) * group]
            if isinstance(rule, MorphRule):
                score = _morph(group_queries, keys[b, h], window, candidates, scaling, rule.fusion)
            else:
                importance = _importance(group_queries, keys[b, h], window, candidates, scaling, rule.kernel)
                redundancy = _redundancy(keys[b, h], region, rule.threshold)
                score = {p: rule.mix * importance[p] - (1 - rule.mix) * redundancy[p] for p in candidates}
            ranked = sorted(candidates, key=lambda p: -score[p])
            cut = rule.budget - rule.window
            state.margin = min(state.margin, score[ranked[cut - 1]] - score[ranked[cut]])
            for p in ranked[cut:]:
                kept[b, h, p] = False


def _window_probs(queries, keys, j, candidates, scaling, reduce):
    """Window query ``j``'s softmax over the candidates of its logits, reduced over the query group."""
    logits = {p: reduce(float(queries[g, j] @ keys[p]) for g in range(queries.shape[0])) * scaling
              for p in candidates}
    top = max(logits.values())
    total = sum(math.exp(x - top) for x in logits.values())
    return {p: math.exp(logits[p] - top) / total for p in candidates}


def _importance(queries, keys, window, candidates, scaling, kernel):
    """Per candidate: the window queries' attention (logits maxed over the query group, softmax over
    the candidates), averaged over the window, then the max over the ``kernel`` nearest candidates."""
    mean = {p: 0.0 for p in candidates}
    for j in window:
        for p, prob in _window_probs(queries, keys, j, candidates, scaling, max).items():
            mean[p] += prob / len(window)
    half = kernel // 2
    return {p: max(mean[candidates[i]] for i in range(max(0, n - half), min(len(candidates), n + half + 1)))
            for n, p in enumerate(candidates)}


def _morph(queries, keys, window, candidates, scaling, fusion):
    """Per candidate: each window query's softmax over the candidates of its logits summed over the
    query group, fused over the window by max or sum."""
    fused = {p: 0.0 for p in candidates}
    for j in window:
        for p, prob in _window_probs(queries, keys, j, candidates, scaling, sum).items():
            fused[p] = max(fused[p], prob) if fusion == "max" else fused[p] + prob
    return fused


def _redundancy(keys, region, threshold):
    """Per held entry: the softmax over the region of its mean cosine similarity to the others,
    where each entry's newest look-alike (similarity above ``threshold``) does not count it."""
    unit = {p: keys[p] / (keys[p].norm() + 1e-8) for p in region}
    sim = {(r, c): (float(unit[r] @ unit[c]) if r != c else 0.0) for r in region for c in region}
    for r in region:
        alike = [c for c in region if sim[(r, c)] > threshold]
        if alike:
            sim[(r, max(alike))] = 0.0
    mean = {c: sum(sim[(r, c)] for r in region) / len(region) for c in region}
    top = max(mean.values())
    total = sum(math.exp(x - top) for x in mean.values())
    return {c: math.exp(mean[c] - top) / total for c in region}


def rkv_reference_logits(model, rule: RKVRule | MorphRule, input_ids, attention_mask, tokens):
    """Teacher-force ``tokens`` through a copy of ``model`` whose attention obeys the rule."""
    state = _State(rule)
    return reference_logits(model, NAME, _attention, _STATE, state, input_ids, attention_mask, tokens), state
