"""`model.generate` features with ScopeCache: padding, beams, sampling, chunked prefill,
multi-turn reuse, independence of caches, and clear errors."""

from __future__ import annotations

import copy

import re

import pytest
import torch
import transformers
from transformers import DynamicCache

from conftest import left_pad, make_model
from oracle import forced_decode
from scope_kv import Adaptive, Discontinuous, ScopeCache, ScopeLayer, Slide
from scope_kv.compat import cache_kwargs

STRATEGIES = [Slide(8, 3), Adaptive(10, 4, max_new_tokens=30), Discontinuous(10, 4, max_new_tokens=30)]
IDS = ["slide", "adaptive", "discontinuous"]
NEW = 30


def _ids(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (n,), generator=g) for n in lengths]


def _generate(model, cache, ids, mask=None, **kwargs):
    kwargs = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, **kwargs}
    if mask is None:
        mask = torch.ones_like(ids)
    return model.generate(ids, attention_mask=mask, **cache_kwargs(cache), **kwargs)


def _managed_lengths(cache):
    return [cache.kv_length(i) for i, layer in enumerate(cache.layers) if isinstance(layer, ScopeLayer)]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_padded_batch_rows_equal_prompts_alone(backend, strategy):
    model = make_model("llama", backend)
    prompts = _ids([20, 13, 17], seed=5)
    ids, mask = left_pad(prompts)
    batched = _generate(model, ScopeCache(model, decoding=strategy), ids, mask)[:, ids.shape[1] :]
    for row, prompt in enumerate(prompts):
        alone = _generate(model, ScopeCache(model, decoding=strategy), prompt[None])[:, len(prompt) :]
        assert torch.equal(batched[row], alone[0]), f"row {row}"


def test_beam_search_huge_budget_equals_dynamic_and_small_budget_is_bounded():
    model = make_model("llama")
    ids = _ids([18])[0][None]
    kwargs = dict(num_beams=3, num_return_sequences=2, early_stopping=False, length_penalty=0.0)
    reference = _generate(model, DynamicCache(config=model.config), ids, **kwargs)
    assert torch.equal(_generate(model, ScopeCache(model, decoding=Slide(10_000, 8)), ids, **kwargs), reference)
    cache = ScopeCache(model, decoding=Slide(8, 3))
    out = _generate(model, cache, ids, **kwargs)
    assert out.shape == reference.shape
    assert max(_managed_lengths(cache)) <= ids.shape[1] + 8


def test_sampling_and_num_return_sequences():
    model = make_model("qwen2")
    ids = _ids([16])[0][None]
    kwargs = dict(do_sample=True, top_k=20, num_return_sequences=3)
    torch.manual_seed(7)
    reference = _generate(model, DynamicCache(config=model.config), ids, **kwargs)
    torch.manual_seed(7)
    assert torch.equal(_generate(model, ScopeCache(model, decoding=Slide(10_000, 8)), ids, **kwargs), reference)
    cache = ScopeCache(model, decoding=Adaptive(8, 3, max_new_tokens=NEW))
    torch.manual_seed(7)
    out = _generate(model, cache, ids, **kwargs)
    assert out.shape == (3, ids.shape[1] + NEW)
    assert cache.layers[0].keys.shape[0] == 3  # batch expanded for the return sequences
    assert max(_managed_lengths(cache)) <= ids.shape[1] + 8


@pytest.mark.parametrize("strategy", [None, Slide(8, 3)], ids=["none", "slide"])
def test_chunked_prefill_equals_one_shot_prefill(strategy):
    model = make_model("llama")
    ids = _ids([24])[0][None]  # 3 chunks of 8: no chunk of 1 token, which would count as a decode step
    one_shot = _generate(model, ScopeCache(model, decoding=strategy), ids)
    cache = ScopeCache(model, decoding=strategy)
    chunked = _generate(model, cache, ids, prefill_chunk_size=8)
    assert torch.equal(chunked, one_shot)
    assert cache.layers[0].prefill_length == 24
    if strategy is None:
        assert torch.equal(chunked, _generate(model, DynamicCache(config=model.config), ids))


def test_second_generate_call_continues_the_conversation():
    model = make_model("llama")
    first, follow_up = _ids([20, 6], seed=3)
    # Huge budget: identical to the stock cache over two turns.
    outs = []
    for cache in (DynamicCache(config=model.config), ScopeCache(model, decoding=Slide(10_000, 8))):
        turn1 = _generate(model, cache, first[None])
        turn2 = _generate(model, cache, torch.cat([turn1, follow_up[None]], dim=1))
        outs.append(turn2)
    assert torch.equal(outs[0], outs[1])
    # Small budget: the new turn's prompt and the held decoding pool join the prefill pool.
    cache = ScopeCache(model, decoding=Slide(8, 3))
    turn1 = _generate(model, cache, first[None])
    layer = cache.layers[0]
    held_after_turn1 = layer.length
    assert held_after_turn1 == 20 + 8
    turn2_ids = torch.cat([turn1, follow_up[None]], dim=1)
    turn2 = _generate(model, cache, turn2_ids)
    assert cache.get_seq_length() == turn2.shape[1] - 1
    # the prompt of turn 2 = the last token of turn 1 (never fed) + the follow-up
    assert layer.prefill_length == held_after_turn1 + 1 + len(follow_up)
    assert layer.length <= layer.prefill_length + 8
    assert layer.step == NEW - 1


def test_two_caches_never_affect_each_other_and_fresh_caches_repeat():
    model = make_model("llama")
    ids = _ids([20])[0][None]
    mask = torch.ones_like(ids)
    solo_a = forced_decode(model, ScopeCache(model, decoding=Slide(8, 3)), ids, mask, NEW)[0]
    solo_b = forced_decode(model, ScopeCache(model, decoding=Discontinuous(9, 2, delta=2)), ids, mask, NEW)[0]
    # Interleave two live caches step by step on the same model.
    a, b = ScopeCache(model, decoding=Slide(8, 3)), ScopeCache(model, decoding=Discontinuous(9, 2, delta=2))
    tokens = {}
    with torch.no_grad():
        state = {}
        for name, cache in (("a", a), ("b", b)):
            out = model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
            state[name] = [out.logits[:, -1].argmax(-1)]
        for _ in range(NEW - 1):
            for name, cache in (("a", a), ("b", b)):
                out = model(input_ids=state[name][-1][:, None], **cache_kwargs(cache), use_cache=True)
                state[name].append(out.logits[:, -1].argmax(-1))
        tokens = {k: torch.stack(v, dim=1) for k, v in state.items()}
    assert torch.equal(tokens["a"], solo_a[:, : NEW])
    assert torch.equal(tokens["b"], solo_b[:, : NEW])
    # and a fresh cache after all that repeats the first result exactly
    again = forced_decode(model, ScopeCache(model, decoding=Slide(8, 3)), ids, mask, NEW)[0]
    assert torch.equal(again, solo_a)
    # reset() makes a used cache behave like a fresh one
    a.reset()
    assert a.get_seq_length() == 0 and a.nbytes() == 0
    assert torch.equal(forced_decode(model, a, ids, mask, NEW)[0], solo_a)


def test_memory_is_bounded_and_measured():
    model = make_model("llama")
    ids = _ids([40])[0][None]
    full = ScopeCache(model)
    _generate(model, full, ids, max_new_tokens=60, min_new_tokens=60)
    slide = ScopeCache(model, decoding=Slide(8, 3))
    _generate(model, slide, ids, max_new_tokens=60, min_new_tokens=60)
    per_slot = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head dim 16, fp32
    for i in range(2):
        assert slide.kv_length(i) == 40 + 8
        assert full.kv_length(i) == 40 + 59
        # storage is per KV head: exactly (prompt + budget + 1) slots pre-allocated
        assert slide.layers[i].nbytes() == (40 + 8 + 1) * per_slot
    assert slide.nbytes() < full.nbytes()
    assert slide.layers[0].keys.shape[1] == model.config.num_key_value_heads


# -- errors ----------------------------------------------------------------------------------


_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
ALL_SLIDING = {
    "mistral": lambda **o: transformers.MistralConfig(**{**_SMALL, "sliding_window": 4096, **o}),
    "qwen2": lambda **o: transformers.Qwen2Config(**{**_SMALL, "use_sliding_window": True, "sliding_window": 4,
                                                     "max_window_layers": 0, **o}),
    "gemma3": lambda **o: transformers.Gemma3TextConfig(**{**_SMALL, "head_dim": 16, "sliding_window": 4,
                                                           "layer_types": ["sliding_attention"] * 2, **o}),
}


@pytest.mark.parametrize("arch", list(ALL_SLIDING))
def test_a_model_with_every_layer_sliding_is_refused_with_a_fix_that_works(arch):
    """The refusal's fix, applied where it says (at loading), gives a model ScopeCache manages and
    that generates as DynamicCache does."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(ALL_SLIDING[arch]()).eval()
    with pytest.raises(ValueError, match=r"from_pretrained\(\.\.\., ") as info:
        ScopeCache(model, decoding=Slide(8, 3))
    fix = re.search(r"from_pretrained\(\.\.\., (.+)\)\.$", str(info.value)).group(1)
    overrides = eval(f"dict({fix})")  # noqa: S307 - the message's own keyword arguments
    fixed = transformers.AutoModelForCausalLM.from_config(ALL_SLIDING[arch](**overrides)).eval()
    fixed.load_state_dict(model.state_dict())
    ids = _ids([12])[0][None]
    reference = _generate(fixed, DynamicCache(config=fixed.config), ids)
    assert torch.equal(_generate(fixed, ScopeCache(fixed, decoding=Slide(10_000, 3)), ids), reference)


def test_wrong_arguments_raise_type_error():
    model = make_model("llama")
    with pytest.raises(TypeError, match=r"make_cache\(model, 'slide'\)"):
        ScopeCache(model, decoding="slide")
    with pytest.raises(TypeError, match="decoding must be"):
        ScopeCache(model, decoding=42)
    with pytest.raises(TypeError, match="transformers model"):
        ScopeCache(model.config, decoding=Slide(8, 3))


def test_unsupported_attention_backend_is_refused():
    model = make_model("llama")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(ValueError, match="not supported by scope_kv"):
        ScopeCache(model, decoding=Slide(8, 3))


def test_cache_reused_with_another_model_raises():
    model_a, model_b = make_model("llama"), make_model("llama")
    cache = ScopeCache(model_a, decoding=Slide(8, 3))
    ScopeCache(model_b)  # model_b routes through scope attention too
    with pytest.raises(ValueError, match="another model"):
        _generate(model_b, cache, _ids([12])[0][None])


def test_attention_switched_away_after_construction_raises():
    model = make_model("llama")
    cache = ScopeCache(model, decoding=Slide(8, 3))
    model.set_attn_implementation("sdpa")
    with pytest.raises(RuntimeError, match="never went through transformers. AttentionInterface"):
        _generate(model, cache, _ids([12])[0][None])


def test_crop_is_refused_clearly():
    model = make_model("llama")
    cache = ScopeCache(model, decoding=Slide(8, 3))
    assert not cache.is_croppable
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(-1)


def test_a_cache_handed_to_an_unrelated_prompt_is_refused():
    """Passing one cache to a second, unrelated generate call (or to a pipeline with a list of
    prompts) would silently answer as a new turn: the cache sees the positions start again and
    says to build a new cache. A real next turn (previous output + new tokens) continues."""
    model = make_model("llama")
    ids = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    cache = ScopeCache(model, decoding=Slide(8, 3))
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=12, do_sample=False)
    turn = torch.cat([out, torch.randint(3, 100, (2, 5))], dim=1)
    turn_mask = torch.cat([mask, torch.ones(2, turn.shape[1] - mask.shape[1], dtype=mask.dtype)], dim=1)
    model.generate(input_ids=turn, attention_mask=turn_mask, **cache_kwargs(cache), max_new_tokens=6, do_sample=False)
    with pytest.raises(ValueError, match="Build a new ScopeCache"):
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=6)
    other = torch.randint(3, 100, (2, 20), generator=torch.Generator().manual_seed(8))
    with pytest.raises(ValueError, match="do not continue it"):
        model.generate(input_ids=other, **cache_kwargs(cache), max_new_tokens=6)


def test_a_layer_refuses_entries_of_another_batch_head_count_or_width():
    """Once a layer holds entries, an update of another batch size, KV head count or head width is
    refused with what to do; entries of the held shape are taken."""
    model = make_model("llama")
    cache = ScopeCache(model, decoding=Slide(8, 3))
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, 6)), **cache_kwargs(cache))
    layer = cache.layers[0]
    batch, heads, _, dim = layer.keys.shape
    for shape in [(batch + 1, heads, 1, dim), (batch, heads + 1, 1, dim), (batch, heads, 1, dim + 2)]:
        with pytest.raises(ValueError, match=r"build a new one \(or call cache.reset\(\)\)"):
            layer.update(torch.zeros(shape), torch.zeros(shape))
        assert layer.length == 6
    keys, _ = layer.update(torch.zeros(batch, heads, 1, dim), torch.zeros(batch, heads, 1, dim))
    assert keys.shape == (batch, heads, 7, dim)


@pytest.mark.parametrize(
    "spec", ["full", "slide:8/3", "adaptive:10/4,T=30", "slide:8/3,static", "snapkv:12+slide:8/3", "unified-h2o:24/4"]
)
def test_the_same_prompt_again_is_refused_when_generate_feeds_it_as_one_token(spec):
    """With as many new tokens as the prompt has, a second generate call on the same prompt is fed
    one token at the prompt's last position, which looks like a decoding step: the cache checks the
    first forward of every generate call. A real continuation of one token still goes through and
    equals DynamicCache's."""
    from scope_kv import make_cache

    model = make_model("llama")
    ids = _ids([20], seed=5)[0][None]
    cache = make_cache(model, spec)
    out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=20, do_sample=False)
    with pytest.raises(ValueError, match="position 19 comes again.*Build a new ScopeCache"):
        model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=20, do_sample=False)
    # the previous output as the next input: one token to feed, at the next position
    cache = make_cache(model, spec)
    out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=20, do_sample=False)
    more = model.generate(input_ids=out, **cache_kwargs(cache), max_new_tokens=5, do_sample=False)
    if spec == "full":
        reference = DynamicCache(config=model.config)
        first = model.generate(input_ids=ids, **cache_kwargs(reference), max_new_tokens=20, do_sample=False)
        expected = model.generate(input_ids=first, **cache_kwargs(reference), max_new_tokens=5, do_sample=False)
        assert torch.equal(more, expected)
    assert more.shape[1] == out.shape[1] + 5


def test_an_empty_prompt_gets_a_clear_error():
    model = make_model("llama")
    with pytest.raises(ValueError, match="prompt is empty"):
        model.generate(input_ids=torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3,
                       **cache_kwargs(ScopeCache(model, decoding=Slide(8, 3))))


CHUNK_SPECS = ["full", "slide:8/3", "adaptive:10/4,T=30", "discontinuous:10/4,T=30", "slide:8/3,static",
               "snapkv:12+slide:8/3", "unified-h2o:24/4"]


@pytest.mark.parametrize("spec", CHUNK_SPECS)
def test_chunked_prefill_of_a_left_padded_batch_equals_one_shot(spec):
    """A row whose left padding spans whole chunks (pad run 9 and 17 >= chunk 8) is not taken for
    a reused cache; every row equals the one-shot prefill's."""
    from scope_kv import make_cache

    model = make_model("llama")
    prompts = _ids([26, 17, 9], seed=11)
    ids, mask = left_pad(prompts)
    one_shot = _generate(model, make_cache(model, spec), ids, mask)
    chunked = _generate(model, make_cache(model, spec), ids, mask, prefill_chunk_size=8)
    assert torch.equal(chunked, one_shot)
    if spec == "full":
        assert torch.equal(chunked, _generate(model, DynamicCache(config=model.config), ids, mask, prefill_chunk_size=8))


@pytest.mark.parametrize("config_class", ["DeepseekV2Config", "DeepseekV3Config"])
def test_multi_head_latent_attention_is_refused_at_construction_with_the_reason(config_class):
    """MLA models cache a latent, not the keys the attention sees: refused when the cache is built,
    not with an internal shape error at the first step."""
    config = getattr(transformers, config_class)(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
        qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
        n_group=1, topk_group=1,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="multi-head latent attention.*DynamicCache"):
        ScopeCache(model, decoding=Slide(8, 3))


def _looped_model():
    """A looped-depth model: transformers' own HRM-Text (a few attention modules write several cache
    layers each) where this transformers ships it, else the same behaviour on a tiny Llama."""
    if hasattr(transformers, "HrmTextConfig"):
        config = transformers.HrmTextConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
            num_hidden_layers=2, H_cycles=2, L_cycles=1,
        )
        return transformers.AutoModelForCausalLM.from_config(config).eval()
    model = make_model("llama")
    model.config.num_hidden_layers *= 2  # the cache gets twice the layers the modules carry
    return model


def test_a_model_that_reuses_its_attention_modules_for_several_cache_layers_is_refused_at_construction():
    """scope_kv hands each attention module the cache layer of its layer_idx, so a cache layer no
    module carries the index of is refused when the cache is built."""
    model = _looped_model()
    with pytest.raises(ValueError, match=r"no attention module carries the layer_idx of layers \[.*DynamicCache"):
        ScopeCache(model, decoding=Slide(8, 3))


def test_a_model_that_adds_cache_layers_during_its_forward_unseen_in_its_code_is_refused_at_the_first_forward():
    """Where nothing in the attention code gives it away (here a hook adds the layers; transformers'
    Dory, which does it in its code, is refused when the cache is built: tests/test_attention_source.py),
    the first attention call catches it, before any token, with the reason."""
    model = make_model("llama")

    def add_loop_layers(module, args, kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # the argument's name by version
        if cache is not None and len(cache.layers) == model.config.num_hidden_layers:
            cache.layers += [copy.deepcopy(layer) for layer in cache.layers]

    model.model.register_forward_pre_hook(add_loop_layers, with_kwargs=True)
    cache = ScopeCache(model, decoding=Slide(8, 3))
    with pytest.raises(RuntimeError, match="added [0-9]+ layers to this ScopeCache during its forward.*DynamicCache"):
        model(input_ids=_ids([12])[0][None], **cache_kwargs(cache))


def _loss_and_grad(model, cache, ids):
    """Prefill, then three decode forwards, with autograd recording; the loss's gradient."""
    model.zero_grad()
    out = model(input_ids=ids, **cache_kwargs(cache))
    loss = out.logits[:, -1].logsumexp(-1).sum()
    for token in ids[0, :3]:
        out = model(input_ids=token.view(1, 1), **cache_kwargs(cache))
        loss = loss + out.logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_backward_through_an_uncompressed_cache_equals_dynamic_cache_and_a_compressing_one_says_no_grad():
    model = make_model("llama")
    ids = _ids([12])[0][None]
    loss, grads = _loss_and_grad(model, DynamicCache(config=model.config), ids)
    ours, our_grads = _loss_and_grad(model, ScopeCache(model), ids)
    torch.testing.assert_close(ours, loss)
    assert grads.keys() == our_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(our_grads[name], grad, msg=name)
    with pytest.raises(RuntimeError, match=r"torch\.no_grad\(\)"):
        _loss_and_grad(model, ScopeCache(model, decoding=Slide(4, 2)), ids)
    model.zero_grad()
