"""Models whose attention code scope_kv cannot follow are refused when the cache is built, read from
the attention module's source (scope_kv.attention_source): the four patterns on modules written
here, and on the transformers models that show them."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from scope_kv import ScopeCache, Slide
from scope_kv.attention_source import unmanageable_reason


def eager_attention_forward(module, query, key, value, mask, **kwargs):
    return query, None


# The modules below are never run: their forward's source is what is judged.
class Standard(torch.nn.Module):
    def forward(self, hidden_states, past_key_values=None):
        query, key_states, value_states = hidden_states, hidden_states, hidden_states
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention_interface = eager_attention_forward
        if self.config._attn_implementation != "eager":
            attention_interface = ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
        return attention_interface(self, query, key_states, value_states, None)


class AttendsTwice(torch.nn.Module):
    def forward(self, hidden_states, past_key_values=None):
        key_states, value_states = past_key_values.update(hidden_states, hidden_states, self.layer_idx)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention_forward)
        first, _ = attention_interface(self, hidden_states, key_states, value_states, None)
        second, _ = attention_interface(self, hidden_states, key_states, value_states, None)
        return first - second


class TilesCachedKeys(torch.nn.Module):
    def forward(self, hidden_states, past_key_values=None):
        key_states, value_states = hidden_states, hidden_states
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        key_states = key_states.repeat(1, 2, 1, 1)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention_forward)
        return attention_interface(self, hidden_states, key_states, value_states, None)


class ReadsOtherKeysInAnotherBranch(torch.nn.Module):
    """Cross-attention style: one branch updates the cache, the other reads what it holds."""

    def forward(self, hidden_states, past_key_values=None, cross=None):
        if cross is not None:
            key_states, value_states = past_key_values.update(cross, cross, self.layer_idx)
        elif past_key_values is not None:
            key_states = past_key_values.layers[self.layer_idx].keys
            value_states = past_key_values.layers[self.layer_idx].values
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention_forward)
        return attention_interface(self, hidden_states, key_states, value_states, None)


class WritesOtherLayers(torch.nn.Module):
    def forward(self, hidden_states, past_key_values=None, loop_offset=0):
        key_states, value_states = past_key_values.update(hidden_states, hidden_states, self.layer_idx + loop_offset)
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface("sdpa", eager_attention_forward)
        return attention_interface(self, hidden_states, key_states, value_states, None)


class OwnAttentionCode(torch.nn.Module):
    def forward(self, hidden_states, past_key_values=None):
        key_states, value_states = past_key_values.update(hidden_states, hidden_states, self.layer_idx)
        weights = torch.matmul(hidden_states, key_states.transpose(-1, -2)).softmax(-1)
        return torch.matmul(weights, value_states)


class InterfaceInAHelper(torch.nn.Module):
    def forward(self, hidden_states, past_key_values=None):
        key_states, value_states = past_key_values.update(hidden_states, hidden_states, self.layer_idx)
        return self._attend(hidden_states, key_states, value_states)

    def _attend(self, query, key_states, value_states):
        return ALL_ATTENTION_FUNCTIONS["sdpa"](self, query, key_states, value_states, None)


@pytest.mark.parametrize(
    ("module_type", "reason"),
    [
        (Standard, None),
        (AttendsTwice, "call the attention function 2 times per layer"),
        (TilesCachedKeys, "transform the cached 'key_states' before attending"),
        (ReadsOtherKeysInAnotherBranch, None),
        (WritesOtherLayers, r"write the cache layer at self\.layer_idx \+ loop_offset"),
        (OwnAttentionCode, "does not dispatch attention through transformers' AttentionInterface"),
        (InterfaceInAHelper, None),
    ],
)
def test_each_pattern_is_read_from_the_forward_source(module_type, reason):
    got = unmanageable_reason(module_type)
    if reason is None:
        assert got is None
    else:
        assert got is not None and re.search(reason, got), got


def test_a_module_whose_source_cannot_be_read_is_not_judged():
    namespace: dict = {}
    exec("def forward(self, x, past_key_values):\n    return past_key_values.update(x, x, self.layer_idx + 1)", namespace)
    module_type = type("Generated", (torch.nn.Module,), {"forward": namespace["forward"]})
    assert unmanageable_reason(module_type) is None


def _shipped_models():
    """The transformers models that show one of the patterns, tiny and random (those this
    transformers ships)."""
    small = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    configs = {
        "DiffLlamaConfig": dict(small, num_attention_heads=4, num_key_value_heads=2),
        "JetMoeConfig": dict(
            small, num_key_value_heads=2, kv_channels=16, num_local_experts=2, num_experts_per_tok=1
        ),
        "GitConfig": dict(
            small,
            num_attention_heads=4,
            vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                               image_size=32, patch_size=16),
        ),
        "DoryConfig": dict(
            small, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            n_input_layers=1, n_recurrent_layers=2, n_output_layers=1, layer_types=["full_attention"] * 4,
        ),
    }
    return [(name, kwargs) for name, kwargs in configs.items() if hasattr(transformers, name)]


@pytest.mark.parametrize(("config_name", "kwargs"), _shipped_models(), ids=[n for n, _ in _shipped_models()])
def test_transformers_models_showing_a_pattern_are_refused_when_the_cache_is_built(config_name, kwargs):
    config = getattr(transformers, config_name)(**kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match=r"cannot be managed by ScopeCache: (it|its attention modules) .*DynamicCache"):
        ScopeCache(model, decoding=Slide(8, 3))
    assert model.config._attn_implementation == implementation  # refused before the model was touched
