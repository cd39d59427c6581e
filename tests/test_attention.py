"""The attention-interface plumbing: registration, idempotence, how the attention function finds its layer."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import ARCHS, make_model
from scope_kv import ScopeCache, ScopeLayer, Slide
from scope_kv.attention import attention_modules, disable_scope_attention, enable_scope_attention
from scope_kv.compat import cache_argument, cache_kwargs


def test_enable_is_idempotent_and_keeps_the_backend():
    for backend in ("sdpa", "eager"):
        model = make_model("llama", backend)
        assert enable_scope_attention(model) == f"scope_{backend}"
        assert enable_scope_attention(model) == f"scope_{backend}"
        ScopeCache(model, decoding=Slide(8, 3))
        assert model.config._attn_implementation == f"scope_{backend}"


@pytest.mark.parametrize("arch", ARCHS)
def testattention_modules_receive_the_cache_by_keyword(arch):
    """The one fact the layer routing rests on (scope_kv.attention): every decoder layer calls its
    attention module with the cache as a keyword argument, so a forward pre-hook can hand the
    module's ScopeLayer to the attention function. Fails if a transformers release changes it."""
    model = make_model(arch, "sdpa")
    cache = ScopeCache(model, decoding=Slide(8, 3))
    seen = []
    modules = attention_modules(model)
    assert len(modules) == model.config.num_hidden_layers
    handles = [m.register_forward_pre_hook(lambda m, a, kw: seen.append((m.layer_idx, cache_argument(kw) is cache)),
                                           with_kwargs=True) for m in modules]
    try:
        ids = torch.randint(3, 100, (1, 12))
        model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        model(input_ids=ids[:, :1], **cache_kwargs(cache), use_cache=True)
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == sorted((i, True) for i in range(len(modules)) for _ in range(2))
    for layer in cache.layers:
        if isinstance(layer, ScopeLayer):
            assert layer.step == 1 and layer.attending is None  # each forward reached after_attention


def test_attention_on_keys_the_layer_did_not_return_is_refused():
    model = make_model("llama", "sdpa")
    cache = ScopeCache(model, decoding=Slide(8, 3))
    layer = cache.layers[0]
    k = torch.randn(1, 2, 5, 16)
    layer.update(k, k)
    with pytest.raises(RuntimeError, match=r"other keys than the ones this layer.s update\(\) returned"):
        layer.check_attended(k.clone())
    layer.check_attended(layer.attending)


def test_routing_is_a_pass_through_for_other_caches():
    model = make_model("llama", "sdpa")
    ScopeCache(model, decoding=Slide(8, 3))  # model now routes through scope_sdpa
    ids = torch.randint(3, 100, (1, 12))
    with torch.no_grad():
        a = model(input_ids=ids, **cache_kwargs(DynamicCache(config=model.config)), use_cache=True).logits
        b = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_disabling_puts_the_model_back_on_its_own_attention_until_the_next_cache(backend):
    model = make_model("llama", backend)
    ids = torch.randint(3, 100, (1, 12), generator=torch.Generator().manual_seed(0))

    def tokens(cache):
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6,
                              do_sample=False, pad_token_id=0, **cache_kwargs(cache))

    stock = tokens(DynamicCache(config=model.config))
    before = ScopeCache(model, decoding=Slide(8, 3))
    routed = {m: len(m._forward_pre_hooks) for m in attention_modules(model)}
    assert set(routed.values()) == {1}
    assert disable_scope_attention(model) == backend == model.config._attn_implementation
    assert disable_scope_attention(model) == backend  # idempotent
    assert all(len(m._forward_pre_hooks) == 0 for m in attention_modules(model))
    assert torch.equal(tokens(DynamicCache(config=model.config)), stock)
    with pytest.raises(RuntimeError, match="attention never went through"):
        tokens(before)  # built for the routed model: refused, not silently unmanaged
    after = ScopeCache(model)  # switches the model back
    assert model.config._attn_implementation == f"scope_{backend}"
    assert torch.equal(tokens(after), stock)


def test_falcon_is_managed_on_a_transformers_that_routes_its_attention_and_refused_before():
    """Falcon joins the architecture suites where its attention goes through AttentionInterface
    (transformers 5.25 does); on older releases ScopeCache refuses it when the cache is built."""
    from conftest import routes_attention
    from scope_kv import compat

    if compat.TRANSFORMERS_VERSION[:2] >= (5, 25):
        assert routes_attention("falcon") and "falcon" in ARCHS
    if not routes_attention("falcon"):
        with pytest.raises(ValueError, match="does not dispatch attention through transformers' AttentionInterface"):
            ScopeCache(make_model("falcon"), decoding=Slide(8, 3))


class _Spy:
    """A managed layer seen through the attention routing: records what is asked of it."""

    def __init__(self, layer: ScopeLayer, asked: list[str]) -> None:
        self._layer, self._asked = layer, asked

    def __getattr__(self, name: str):
        self._asked.append(name)
        return getattr(self._layer, name)


@pytest.mark.parametrize("fast_decode", [False, True])
def test_the_attention_function_makes_two_calls_into_the_layer(monkeypatch, fast_decode):
    """Before and after the backend runs (open_step, after_attention), plus the pre-hook's look at
    the module's input: everything else the attention needs (its mask, whether to take the grouped
    decode attention and with which kernel, the stored heads per query head) is on the step record."""
    model = make_model("llama", "sdpa")
    cache = ScopeCache(model, decoding=Slide(8, 3))
    for layer in cache.layers:
        layer.fast_decode = fast_decode
    asked: list[str] = []
    real = cache.managed_layer
    monkeypatch.setattr(cache, "managed_layer", lambda idx: _Spy(real(idx), asked))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, min_new_tokens=14,
                   do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    assert set(asked) == {"observe_input", "open_step", "after_attention"}
    forwards = 14 * len(cache.layers)
    assert asked.count("open_step") == asked.count("after_attention") == asked.count("observe_input") == forwards
