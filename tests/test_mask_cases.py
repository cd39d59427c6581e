"""Every attention mask `generate` accepts, honoured by every method in both layouts.

The cases: a masked span inside a prompt, right padding, a multi-turn batch whose later turn is
left-padded (zeros in the middle of the sequence), and all of them after evictions. At budgets
that evict nothing each method must give exactly `DynamicCache`'s tokens, and the tokens under
the mask must not matter; at budgets that do evict, SCOPE's strategies must match the oracle
(tests/oracle.py, which masks with transformers' own mask) and a padded batch row must equal the
same conversation run alone.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import left_pad, make_model
from oracle import Rule, forced_decode, oracle_logits
from scope_kv import Slide, make_cache
from scope_kv.compat import cache_kwargs

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NEW = 10
# Budgets that evict nothing in these runs (prompts <= 24 tokens, <= 2 x 10 generated), each
# method in the default and the static layout.
NO_EVICTION = [
    "full",
    "slide:64/2",
    "adaptive:64/2,delta=1",
    "discontinuous:64/2,delta=1",
    "snapkv:1000+slide:64/2",
    "pyramidkv:1000+full",
    "h2o:1000+slide:64/2",
    "streamingllm:1000+full",
    "unified-h2o:200/2",
    "unified-streamingllm:200/2",
    "slide:64/2,per_query_head",
    "slide:64/2,static",
    "adaptive:64/2,delta=1,static",
    "snapkv:1000+slide:64/2,static",
    "unified-h2o:200/2,static",
]
# Budgets that evict, for the padded-turn case (a row equals its conversation run alone). Not the
# prefill compressors: with holes their scores see the holes' neighbourhood (docs/method.md §8).
EVICTING = ["slide:5/2", "adaptive:6/2,delta=2", "discontinuous:6/2,delta=2", "unified-h2o:14/3",
            "unified-streamingllm:14/3", "slide:5/2,static", "unified-h2o:14/3,static", "slide:5/2,per_query_head"]


def _generate(model, cache, ids, mask, new=NEW):
    return model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=new,
                          min_new_tokens=new, do_sample=False, pad_token_id=0)


def _cache(model, spec):
    return DynamicCache(config=model.config) if spec == "dynamic" else make_cache(model, spec)


def _holes_batch():
    """Row 0: a masked span in the middle; row 1: left padding and a masked token near the end."""
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, 6:10] = 0
    mask[1, :3] = 0
    mask[1, 17] = 0
    return ids, mask


# every method on Llama; one per kind (default, prefill compressor, static unified) on the others
MASKED_SPAN = [("llama", spec) for spec in NO_EVICTION] + [
    (arch, spec)
    for arch in ("qwen3", "gemma3", "gpt_neox")
    for spec in ("slide:64/2", "snapkv:1000+slide:64/2", "unified-h2o:200/2,static")
]


@pytest.mark.parametrize("arch,spec", MASKED_SPAN)
def test_a_masked_span_is_never_attended(arch, spec):
    model = make_model(arch)
    ids, mask = _holes_batch()
    reference = _generate(model, DynamicCache(config=model.config), ids, mask)
    assert torch.equal(_generate(model, make_cache(model, spec), ids, mask), reference)
    # what lies under the mask does not matter
    other = ids.masked_fill(mask == 0, 77)
    assert torch.equal(_generate(model, make_cache(model, spec), other, mask)[:, ids.shape[1] :],
                       reference[:, ids.shape[1] :])


@pytest.mark.parametrize("spec", NO_EVICTION)
def test_right_padding_gives_what_dynamic_cache_gives(spec):
    model = make_model("llama")
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    reference = _generate(model, DynamicCache(config=model.config), ids, mask)
    assert torch.equal(_generate(model, make_cache(model, spec), ids, mask), reference)


def _conversation(model, spec, prompts, follow_ups):
    """Two turns of a batch, the second turn left-padded on its own: the second answers."""
    cache = _cache(model, spec)
    ids, mask = left_pad(prompts)
    first = _generate(model, cache, ids, mask)
    turn_ids, turn_mask = left_pad(follow_ups)
    ids = torch.cat([first, turn_ids], dim=1)
    mask = torch.cat([mask, torch.ones(len(prompts), NEW, dtype=torch.long), turn_mask], dim=1)
    return _generate(model, cache, ids, mask)[:, -NEW:]


def _alone(model, spec, prompt, follow_up):
    cache = _cache(model, spec)
    first = _generate(model, cache, prompt[None], torch.ones(1, len(prompt), dtype=torch.long))
    ids = torch.cat([first, follow_up[None]], dim=1)
    return _generate(model, cache, ids, torch.ones_like(ids))[0, -NEW:]


def _turns(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 128, (n,), generator=g) for n in (14, 9)]
    follow_ups = [torch.randint(3, 128, (n,), generator=g) for n in (3, 7)]
    return prompts, follow_ups


@pytest.mark.parametrize("spec", NO_EVICTION)
def test_a_padded_later_turn_gives_what_dynamic_cache_gives(spec):
    model = make_model("llama")
    prompts, follow_ups = _turns()
    reference = _conversation(model, "dynamic", prompts, follow_ups)
    assert torch.equal(_conversation(model, spec, prompts, follow_ups), reference)


@pytest.mark.parametrize("spec", EVICTING)
def test_a_padded_later_turn_after_evictions_equals_the_conversation_alone(spec):
    """Turn 1 evicts (the layer holds fewer slots than tokens seen), then turn 2 brings zeros in
    the middle of the mask: each batch row still answers what it answers alone."""
    model = make_model("llama")
    prompts, follow_ups = _turns(seed=1)
    batched = _conversation(model, spec, prompts, follow_ups)
    for row in range(len(prompts)):
        assert torch.equal(batched[row], _alone(model, spec, prompts[row], follow_ups[row])), f"row {row}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_bigcode"])
@pytest.mark.parametrize("strategy,rule", [(Slide(8, 3), Rule("slide", 8, 3)), (Slide(5, 2), Rule("slide", 5, 2))],
                         ids=["slide-8-3", "slide-5-2"])
def test_a_masked_span_with_evictions_matches_the_oracle(arch, strategy, rule):
    model = make_model(arch)
    ids, mask = _holes_batch()
    cache = make_cache(model, f"slide:{strategy.budget}/{strategy.recent}")
    tokens, logits = forced_decode(model, cache, ids, mask, 16)
    assert all(layer.selections > 0 for layer in cache.layers if hasattr(layer, "selections"))
    expected, _ = oracle_logits(model, rule, ids, mask, tokens)
    for step, (a, b) in enumerate(zip(logits, expected, strict=True)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
