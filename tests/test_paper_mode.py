"""Reproducing the SCOPE authors' research code (docs/method.md §11): an uncapped adaptive budget
and selection per query head, both opt-in, checked against a brute-force reference."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from oracle import Rule, forced_decode, oracle_logits
from scope_kv import Adaptive, Discontinuous, ScopeCache, Slide
from scope_kv.compat import cache_kwargs

PROMPT, STEPS = 24, 48


def _model(kv_heads: int, backend: str = "sdpa") -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation=backend)
    # Sharper attention than the random init gives, so selections are well separated (no ties).
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
    return model.eval()


def _prompt(batch: int = 2, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


def test_uncapped_schedule_grows_past_the_budget():
    capped = Adaptive(12, 4, delta=2)
    uncapped = Adaptive(12, 4, delta=2, cap_budget=False)
    assert [capped.budget_at(t) for t in (0, 16, 40)] == [4, 12, 12]
    assert [uncapped.budget_at(t) for t in (0, 16, 40)] == [4, 12, 24]
    assert capped.bounded and not uncapped.bounded
    planned = Adaptive(12, 4, max_new_tokens=40, cap_budget=False)  # delta = (40 - 4) // 8 = 4
    assert planned.max_held == planned.budget_at(40) + 1 == 4 + 10 + 1  # reserved up front; grows beyond
    assert Discontinuous(12, 4, max_new_tokens=40, cap_budget=False).max_held == 14 + 4 + 1
    with pytest.raises(TypeError, match="cap_budget"):
        Adaptive(12, 4, delta=2, cap_budget="no")


RULES = [
    pytest.param(lambda: Slide(8, 3), Rule("slide", 8, 3), id="slide"),
    pytest.param(
        lambda: Adaptive(8, 3, delta=3, cap_budget=False), Rule("adaptive", 8, 3, 3, cap=False), id="adaptive-uncapped"
    ),
    pytest.param(
        lambda: Discontinuous(8, 3, delta=3, cap_budget=False),
        Rule("discontinuous", 8, 3, 3, cap=False),
        id="discontinuous-uncapped",
    ),
]


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("per_query_head", [False, True], ids=["per-kv-head", "per-query-head"])
@pytest.mark.parametrize("strategy,rule", RULES)
def test_paper_behaviours_match_the_brute_force_rule(strategy, rule, per_query_head, kv_heads):
    model = _model(kv_heads)
    ids, mask = _prompt()
    cache = ScopeCache(model, decoding=strategy(), per_query_head=per_query_head)
    tokens, logits = forced_decode(model, cache, ids, mask, STEPS)
    rule.per_query_head = per_query_head
    expected, _ = oracle_logits(model, rule, ids, mask, tokens)
    for step, (a, b) in enumerate(zip(logits, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    layer = cache.layers[0]
    stored_heads = 4 if per_query_head else kv_heads
    assert layer.keys.shape[1] == stored_heads  # the memory cost: one copy per query head
    if rule.kind != "slide":  # uncapped: the pool outgrew B
        assert layer.length - layer.prefill_length > 8


def test_per_query_head_on_gqa_equals_per_kv_head_on_the_model_with_kv_heads_duplicated():
    gqa = _model(kv_heads=2)
    mha_config = copy.deepcopy(gqa.config)
    mha_config.num_key_value_heads = 4
    mha = transformers.LlamaForCausalLM._from_config(mha_config, attn_implementation="sdpa").eval()
    state = gqa.state_dict()
    dim = gqa.config.hidden_size // gqa.config.num_attention_heads
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            # (kv_heads * dim, hidden) -> each KV head's rows once per query head of its group
            state[name] = tensor.reshape(2, dim, -1).repeat_interleave(2, dim=0).reshape(4 * dim, -1)
    mha.load_state_dict(state)
    ids, mask = _prompt()
    strategy = lambda: Adaptive(8, 3, delta=3, cap_budget=False)  # noqa: E731
    a = gqa.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **cache_kwargs(ScopeCache(gqa, decoding=strategy(), per_query_head=True)),
    )
    b = mha.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **cache_kwargs(ScopeCache(mha, decoding=strategy())),
    )
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)
    # ... and it is not what per-KV-head selection on the GQA model keeps
    c = gqa.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=STEPS,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        **cache_kwargs(ScopeCache(gqa, decoding=strategy())),
    )
    assert (torch.stack(a.logits) - torch.stack(c.logits)).abs().max() > 1e-3


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_per_query_head_with_a_huge_budget_is_the_full_cache(backend):
    model = _model(kv_heads=2, backend=backend)
    ids, mask = _prompt()
    full = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    mine = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=20,
        do_sample=False,
        **cache_kwargs(ScopeCache(model, decoding=Slide(4096, 8), per_query_head=True)),
    )
    assert torch.equal(full, mine)
