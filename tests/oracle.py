"""An independent oracle of SCOPE's decoding rule (docs/method.md §3), built on a full `DynamicCache`.

The oracle never evicts anything: the cache holds every entry, and attention is restricted
to the set the spec's rule keeps (a boolean ``kept`` mask per layer, batch row and KV head
over *logical* positions). Attention is plain float32 math written here, the schedules are
written here from the spec, and selection is a brute-force sort per (row, KV head). Nothing
is imported from ``scope_kv`` except to drive the run under test.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, DynamicCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from scope_kv.compat import cache_kwargs

ORACLE_NAME = "scope_test_oracle"


@dataclass
class Rule:
    """The spec's rule, restated: kind in {"slide", "adaptive", "discontinuous"}."""

    kind: str
    budget: int
    recent: int
    delta: int | None = None
    # Score of one KV head's candidates: score(probs (group, L), keys (L, dim)) -> (L,) floats.
    # None: SCOPE's (the group's summed probabilities).
    score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    # The research code's behaviours (docs/method.md §11): no cap on B(t); selection per query head.
    cap: bool = True
    per_query_head: bool = False

    def budget_at(self, t: int) -> int:
        if self.kind == "slide":
            return self.budget
        # B(t) = r + t // delta, never above B (the documented maximum) unless uncapped.
        grown = self.recent + t // self.delta
        return min(self.budget, grown) if self.cap else grown


@dataclass
class OracleState:
    rule: Rule | None
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (batch, kv_heads, L) bool
    prefill: dict[int, int] = field(default_factory=dict)
    step: dict[int, int] = field(default_factory=dict)
    skipped: dict[int, int] = field(default_factory=dict)


_STATE_KWARG = "scope_oracle_state"


def _oracle_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    state: OracleState = kwargs.pop(_STATE_KWARG)
    if getattr(module, "sliding_window", None) is not None or getattr(module, "is_sliding", False):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    layer = module.layer_idx
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling

    owners = q_heads if state.rule is not None and state.rule.per_query_head else kv_heads
    if q_len > 1 or layer not in state.kept:
        state.kept[layer] = torch.ones(batch, owners, length, dtype=torch.bool)
        state.prefill[layer] = length
        state.step[layer] = 0
        state.skipped[layer] = 0
        decode = False
    else:
        new = torch.ones(batch, owners, 1, dtype=torch.bool)
        state.kept[layer] = torch.cat([state.kept[layer], new], dim=-1)
        decode = True
    kept = state.kept[layer]

    allowed = allowed_slots(attention_mask, batch, q_len, length) & kept.repeat_interleave(q_heads // owners, dim=1)[:, :, None, :]  # (batch, q_heads, q, L)

    k = key.float().repeat_interleave(group, dim=1)
    v = value.float().repeat_interleave(group, dim=1)
    logits = torch.matmul(query.float(), k.transpose(-1, -2)) * scaling
    if kwargs.get("softcap") is not None:
        logits = torch.tanh(logits / kwargs["softcap"]) * kwargs["softcap"]
    logits = logits.masked_fill(~allowed, float("-inf"))
    # Pad queries attend to nothing; give them zeros instead of NaN (their outputs are unused).
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, v).to(query.dtype).transpose(1, 2).contiguous()

    if decode and state.rule is not None:
        if state.rule.per_query_head:  # each query head owns its entries: a group of one
            _select(state, layer, probs[:, :, -1, :], key.float().repeat_interleave(group, dim=1), 1)
        else:
            _select(state, layer, probs[:, :, -1, :], key.float(), group)
    return out, None


def allowed_slots(attention_mask, batch: int, q_len: int, length: int) -> torch.Tensor:
    """``(batch, 1, q_len, length)`` bool: what each query may attend (the model's 4-D mask, else causal)."""
    if attention_mask is not None:
        return attention_mask[:, :, :, :length].to(torch.bool).expand(batch, 1, q_len, length)
    i = torch.arange(q_len)[:, None]
    j = torch.arange(length)[None, :]
    return (j <= length - q_len + i)[None, None].expand(batch, 1, q_len, length)


def _select(state: OracleState, layer: int, probs: torch.Tensor, keys: torch.Tensor, group: int) -> None:
    rule = state.rule
    t = state.step[layer]
    state.step[layer] += 1
    kept = state.kept[layer]
    start = state.prefill[layer]
    batch, kv_heads, _ = kept.shape
    n_decoding = int(kept[0, 0, start:].sum())
    budget = rule.budget_at(t)
    if n_decoding < budget:
        return
    if rule.kind == "discontinuous":
        if state.skipped[layer] < rule.delta:
            state.skipped[layer] += 1
            return
        state.skipped[layer] = 0
    for b in range(batch):
        for h in range(kv_heads):
            positions = [p for p in range(start, kept.shape[-1]) if kept[b, h, p]]
            assert len(positions) == n_decoding
            candidates = positions[: len(positions) - rule.recent]
            if rule.score is None:
                score = {p: float(probs[b, h * group : (h + 1) * group, p].sum()) for p in candidates}
            else:
                values = rule.score(probs[b, h * group : (h + 1) * group], keys[b, h])
                score = {p: float(values[p]) for p in candidates}
            ranked = sorted(candidates, key=lambda p: -score[p])
            for p in ranked[budget - rule.recent :]:
                kept[b, h, p] = False


def positions_from_mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]


def forced_decode(model, cache, input_ids, attention_mask, steps, tokens=None, on_step=None):
    """Prefill then ``steps`` decode forwards; greedy unless ``tokens`` (batch, steps) are forced.

    Returns (tokens, logits) with logits a list of (batch, vocab) float tensors, one per
    forward (the prefill's last position first).
    """
    with torch.no_grad():
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions_from_mask(attention_mask, input_ids.shape[1]),
            **cache_kwargs(cache),
            use_cache=True,
        )
        all_logits = [out.logits[:, -1].float()]
        chosen = []
        for s in range(steps):
            nxt = all_logits[-1].argmax(-1) if tokens is None else tokens[:, s]
            chosen.append(nxt)
            attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], dim=-1)
            out = model(
                input_ids=nxt[:, None],
                attention_mask=attention_mask,
                position_ids=positions_from_mask(attention_mask, 1),
                **cache_kwargs(cache),
                use_cache=True,
            )
            all_logits.append(out.logits[:, -1].float())
            if on_step is not None:
                on_step(s)
    return torch.stack(chosen, dim=1), all_logits


def oracle_logits(model, rule: Rule | None, input_ids, attention_mask, tokens):
    """Teacher-force ``tokens`` through a copy of ``model`` whose attention obeys the spec's rule."""
    state = OracleState(rule)
    return reference_logits(model, ORACLE_NAME, _oracle_attention, _STATE_KWARG, state, input_ids, attention_mask,
                            tokens), state


def reference_logits(model, name, attention, state_kwarg, state, input_ids, attention_mask, tokens):
    """Teacher-force ``tokens`` through a copy of ``model`` whose attention is ``attention``
    (registered as ``name``), handed ``state`` through the call's kwargs under ``state_kwarg``, as
    the library hands its layer; returns the logits of every forward."""
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, sdpa_mask)
    reference = copy.deepcopy(model)
    reference.set_attn_implementation(name)

    def hand_state(module, args, kwargs):
        return args, {**kwargs, state_kwarg: state}

    # the attention modules: the innermost modules that carry a layer_idx (any architecture)
    indexed = [m for m in reference.modules() if getattr(m, "layer_idx", None) is not None]
    for module in indexed:
        if not any(c is not module and getattr(c, "layer_idx", None) is not None for c in module.modules()):
            module.register_forward_pre_hook(hand_state, with_kwargs=True)
    cache = DynamicCache(config=reference.config)
    _, logits = forced_decode(reference, cache, input_ids, attention_mask, tokens.shape[1], tokens=tokens)
    return logits
