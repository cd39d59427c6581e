"""Shared fixtures: tiny random decoder models of several architectures (no download)."""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import sys
import types

import pytest
import torch
import transformers

_ALL_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "gpt_neox", "falcon", "gpt_bigcode")
BACKENDS = ("sdpa", "eager")

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
)


def _config(arch: str) -> transformers.PreTrainedConfig:
    if arch == "llama":
        return transformers.LlamaConfig(num_hidden_layers=2, **_COMMON)
    if arch == "mistral":
        # Mistral-7B v0.2+ checkpoints ship sliding_window=None; the class default (4096) makes
        # every layer sliding, which ScopeCache refuses (tested in test_core_generate.py).
        return transformers.MistralConfig(num_hidden_layers=2, sliding_window=None, **_COMMON)
    if arch == "qwen2":
        return transformers.Qwen2Config(num_hidden_layers=2, **_COMMON)
    if arch == "qwen3":
        return transformers.Qwen3Config(num_hidden_layers=2, head_dim=16, **_COMMON)
    if arch == "phi3":
        return transformers.Phi3Config(
            num_hidden_layers=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **_COMMON
        )
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(
            num_hidden_layers=3,
            head_dim=16,
            sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "full_attention"],
            **_COMMON,
        )
    # Architectures whose attention modules receive the cache as `layer_past=`:
    if arch == "gpt_neox":  # Pythia; multi-head attention, partial rotary
        return transformers.GPTNeoXConfig(
            num_hidden_layers=2, vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
        )
    if arch == "falcon":  # grouped-query attention in one fused projection
        return transformers.FalconConfig(
            num_hidden_layers=2, vocab_size=128, hidden_size=64, num_attention_heads=4, num_kv_heads=2,
            new_decoder_architecture=True, bos_token_id=1, eos_token_id=2,
        )
    if arch == "gpt_bigcode":  # multi-query attention, learned absolute positions
        return transformers.GPTBigCodeConfig(
            n_layer=2, vocab_size=128, n_embd=64, n_head=4, n_positions=1024, multi_query=True,
            bos_token_id=1, eos_token_id=2,
        )
    raise ValueError(arch)


_MODEL_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "falcon": "FalconForCausalLM",
    "gpt_bigcode": "GPTBigCodeForCausalLM",
}


@functools.lru_cache(maxsize=None)
def _base_model(arch: str) -> torch.nn.Module:
    torch.manual_seed(1234)
    config = _config(arch)
    model = getattr(transformers, _MODEL_CLASSES[arch])(config)
    # Random init gives near-uniform attention; sharpen it so heavy hitters exist and
    # selection decisions are well separated (ties would make the oracle comparison fragile).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight", "qkv_proj.weight", "query_key_value.weight", "c_attn.weight")):
                param.mul_(4.0)
    return model.eval()


def make_model(arch: str, backend: str = "sdpa") -> torch.nn.Module:
    """A fresh copy of the tiny ``arch`` model with attention ``backend`` (fp32, eval mode)."""
    model = copy.deepcopy(_base_model(arch))
    model.set_attn_implementation(backend)
    model.generation_config.pad_token_id = 0
    return model


def routes_attention(arch: str) -> bool:
    """Whether the installed transformers' ``arch`` dispatches attention through its
    AttentionInterface (Falcon does from a release after 5.17; before, ScopeCache refuses it at
    construction, tests/test_attention.py)."""
    from scope_kv import ScopeCache

    try:
        ScopeCache(copy.deepcopy(_base_model(arch)))
    except ValueError as exc:
        if "does not dispatch attention" in str(exc):
            return False
        raise
    return True


ARCHS = tuple(arch for arch in _ALL_ARCHS if arch != "falcon" or routes_attention(arch))


def left_pad(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D token tensors into ``(ids, attention_mask)`` of shape ``(batch, longest)`` (pad id 0)."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = p
        mask[i, width - len(p) :] = 1
    return ids, mask


@pytest.fixture(params=ARCHS)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(...)``).

    On 2 cores shared with other work one thread decoded SmolLM2 4-9x faster than two (threads
    wait for each other); tiny models gain nothing from more; on quiet cores it costs little."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def kvpress_module(name: str) -> types.ModuleType:
    """``kvpress.presses.<name>`` without running kvpress's package ``__init__``.

    kvpress is installed without its dependencies (the README's install line), and its
    ``__init__`` imports every press (several need packages we do not install) and patches
    transformers' attention functions; the presses themselves need only torch and transformers.
    So ``kvpress`` is registered as a bare package and the press module imported alone. A
    missing kvpress fails with the install command: the README's install line provides it."""
    if "kvpress" not in sys.modules:
        spec = importlib.util.find_spec("kvpress")
        if spec is None or spec.submodule_search_locations is None:
            pytest.fail("kvpress is not installed: pip install --no-deps kvpress==0.5.5 (the README's install line)")
        package = types.ModuleType("kvpress")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kvpress"] = package
    return importlib.import_module(f"kvpress.presses.{name}")
