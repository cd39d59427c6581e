"""ScopeCache on models that accelerate spreads over devices.

A model loaded with ``device_map=...`` runs each decoder layer on its own execution device,
with accelerate's hooks moving activations (and, for offloaded layers, weights) in and out.
ScopeCache must work on such a model unchanged: each layer's pools are created from the K/V
that layer receives, so they live on that layer's execution device, and generation equals the
undispatched model's.

On a machine without GPUs the execution devices are all ``cpu``, but the mechanics are the
real ones: accelerate's hooks, weights offloaded to ``disk`` or held on ``meta`` and loaded
per forward (``cpu_offload``), and a device map inferred from a memory budget. The per-layer
device logic itself is checked with layers that receive K/V on different devices (``cpu`` and
``meta``). The two-GPU run is ``benchmarks/multi_gpu.py`` (docs/multi_gpu.md).
"""

from __future__ import annotations

import copy
import functools
from typing import Callable

import accelerate
import pytest
import torch
import transformers
from transformers import DynamicCache

from scope_kv import Adaptive, Discontinuous, ScopeCache, ScopeLayer, Slide, SnapKV, UnifiedH2O
from scope_kv.compat import cache_kwargs

NEW = 16
PROMPT = 16

# cpu_offload leaves every weight on meta, so transformers reports the model's device as meta and
# warns that the prompt is elsewhere; accelerate's hooks move it to the execution device.
pytestmark = pytest.mark.filterwarnings("ignore:You are calling .generate.. with the `input_ids`:UserWarning")
LAYERS = 4


@functools.lru_cache(maxsize=None)
def _base_model() -> torch.nn.Module:
    torch.manual_seed(4321)
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = transformers.LlamaForCausalLM(config)
    # Sharpen attention so heavy hitters exist and selections are well separated (as conftest).
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
    model.generation_config.pad_token_id = 0
    return model.eval()


def _model() -> torch.nn.Module:
    return copy.deepcopy(_base_model())


def _explicit(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """Every module placed by an explicit device map; layers 1 and 3 offloaded to disk."""
    device_map = {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.norm": "cpu",
        "lm_head": "cpu",
        **{f"model.layers.{i}": ("disk" if i % 2 else "cpu") for i in range(LAYERS)},
    }
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))


def _inferred(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """The ``device_map="auto"`` path: a map inferred from a memory budget too small for the model."""
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    embed_bytes = sum(p.numel() * p.element_size() for p in model.model.embed_tokens.parameters())
    budget = embed_bytes + 2 * layer_bytes  # room for the embedding and about two layers; the rest spills
    device_map = accelerate.infer_auto_device_map(
        model, max_memory={"cpu": budget, "disk": 2**40}, no_split_module_classes=["LlamaDecoderLayer"]
    )
    assert "disk" in set(device_map.values()) and "cpu" in set(device_map.values()), device_map
    return accelerate.dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))


def _cpu_offload(model: torch.nn.Module, tmp_path) -> torch.nn.Module:
    """All weights on ``meta``, brought to the execution device (cpu) for each forward."""
    return accelerate.cpu_offload(model, execution_device=torch.device("cpu"))


PLACEMENTS: dict[str, Callable[[torch.nn.Module, object], torch.nn.Module]] = {
    "explicit-cpu-disk": _explicit,
    "inferred-auto": _inferred,
    "cpu-offload-meta": _cpu_offload,
}

STRATEGIES = {
    "slide": lambda: dict(decoding=Slide(8, 3)),
    "adaptive": lambda: dict(decoding=Adaptive(10, 4, max_new_tokens=NEW)),
    "discontinuous": lambda: dict(decoding=Discontinuous(10, 4, max_new_tokens=NEW)),
    "snapkv+slide": lambda: dict(prefill=SnapKV(12, window=4, kernel=3), decoding=Slide(8, 3)),
    "unified-h2o": lambda: dict(decoding=UnifiedH2O(16, 4)),
}


def _prompt(batch: int = 1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (batch, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1:  # left-pad the second row by 5 tokens
        ids[1, :5] = 0
        mask[1, :5] = 0
    return ids, mask


def _generate(model: torch.nn.Module, cache, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model.generate(
        ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False
    )
    return out[:, ids.shape[1] :]


def _execution_device(model: torch.nn.Module, layer_idx: int) -> torch.device:
    """Where accelerate runs the key projection of decoder layer ``layer_idx``: the innermost hook
    around it (``cpu_offload`` hooks each leaf module, ``dispatch_model`` each decoder layer)."""
    layer = model.model.layers[layer_idx]
    for module in (layer.self_attn.k_proj, layer.self_attn, layer):
        hook = getattr(module, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device)
    raise AssertionError(f"layer {layer_idx} has no accelerate hook: the model was not dispatched")


@pytest.fixture(params=list(PLACEMENTS), ids=list(PLACEMENTS))
def dispatched(request, tmp_path) -> torch.nn.Module:
    return PLACEMENTS[request.param](_model(), tmp_path)


@functools.lru_cache(maxsize=None)
def _undispatched(strategy: str | None) -> torch.Tensor:
    """Tokens the plain (undispatched) model generates for the padded batch, with DynamicCache
    (``strategy=None``) or a ScopeCache."""
    ids, mask = _prompt(2)
    model = _model()
    cache = DynamicCache(config=model.config) if strategy is None else ScopeCache(model, **STRATEGIES[strategy]())
    return _generate(model, cache, ids, mask)


def test_weights_really_are_offloaded(dispatched):
    # Guards the fixtures: without offloaded weights the tests below would prove nothing about hooks.
    assert any(p.device.type == "meta" for p in dispatched.parameters())
    assert all(_execution_device(dispatched, i).type == "cpu" for i in range(LAYERS))


def test_huge_budget_equals_dynamic_cache_on_dispatched_model(dispatched):
    ids, mask = _prompt(2)  # a padded batch: the mask travels through the hooks too
    dynamic = _generate(dispatched, DynamicCache(config=dispatched.config), ids, mask)
    scope = _generate(dispatched, ScopeCache(dispatched, decoding=Slide(4096, 8)), ids, mask)
    assert torch.equal(dynamic, _undispatched(None))
    assert torch.equal(scope, _undispatched(None))


def _check_compressed_run(model: torch.nn.Module, strategy: str) -> None:
    """Generate with a small budget on a dispatched model: tokens equal the plain model's, every
    layer stays within its budget, and every layer's pools sit on its execution device."""
    ids, mask = _prompt(2)
    cache = ScopeCache(model, **STRATEGIES[strategy]())
    out = _generate(model, cache, ids, mask)
    assert torch.equal(out, _undispatched(strategy))
    decoding = cache.decoding
    for idx, layer in enumerate(cache.layers):
        assert isinstance(layer, ScopeLayer)
        assert layer.seen == PROMPT + NEW - 1
        assert layer.selections > 0
        if strategy == "unified-h2o":
            # One budget over prompt and generated entries (+ the 5 pad slots kept at the front).
            assert cache.kv_length(idx) <= decoding.budget + 5
        else:
            assert cache.kv_length(idx) - layer.prefill_length <= decoding.max_held
        expected = _execution_device(model, idx)
        tensors = {"keys": layer.keys, "values": layer.values}
        if layer.start is not None:
            tensors["start"] = layer.start
        for name, tensor in tensors.items():
            assert tensor.device.type != "meta", f"layer {idx} {name} on meta"
            assert tensor.device == expected, f"layer {idx} {name} on {tensor.device}, layer runs on {expected}"


def test_slide_on_every_placement(dispatched):
    _check_compressed_run(dispatched, "slide")


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "slide"])
def test_every_method_on_a_cpu_and_disk_split(strategy, tmp_path):
    _check_compressed_run(_explicit(_model(), tmp_path), strategy)


def test_pools_follow_the_device_each_layer_receives():
    """Layers fed K/V on different devices (cpu / meta) each keep their pools there.

    ``meta`` stands in for a second accelerator: nothing in the cache may assume one device
    for the whole model (it never moves K/V, and never allocates on a cache-wide device).
    """
    model = _model()
    cache = ScopeCache(model, decoding=Slide(8, 3))
    devices = [torch.device("cpu"), torch.device("meta"), torch.device("cpu"), torch.device("meta")]
    shape = (1, model.config.num_key_value_heads, 6, model.config.hidden_size // model.config.num_attention_heads)
    for idx, device in enumerate(devices):
        keys, values = cache.update(torch.randn(shape, device=device), torch.randn(shape, device=device), idx)
        assert keys.device == device and values.device == device
        layer = cache.layers[idx]
        assert layer.keys.device == device and layer.values.device == device
        assert layer.capacity >= 6 + Slide(8, 3).max_held  # room for the decoding pool, on that device
    assert cache.get_seq_length() == 6
    assert [cache.kv_length(i) for i in range(LAYERS)] == [6] * LAYERS


@pytest.mark.parametrize("device_map", ["auto", "sequential", "explicit"])
def test_eval_loader_dispatch_and_input_device(device_map):
    """What `scope-kv eval --device-map` does to a loaded model (scope_kv.eval.common.spread_over_devices):
    accelerate hooks on the layers, inputs sent to the embedding's execution device, and Slide's
    tokens equal to the undispatched model's."""
    from scope_kv.eval.common import input_device, spread_over_devices

    model = _model()
    mapping = {"": "cpu"} if device_map == "explicit" else device_map
    model = spread_over_devices(model, mapping)
    assert getattr(model.model.layers[0], "_hf_hook", None) is not None or hasattr(model, "hf_device_map")
    assert input_device(model) == torch.device("cpu")
    ids, mask = _prompt(2)
    assert torch.equal(_generate(model, ScopeCache(model, **STRATEGIES["slide"]()), ids, mask), _undispatched("slide"))


def test_input_device_of_an_offloaded_embedding():
    from scope_kv.eval.common import input_device, spread_over_devices

    model = accelerate.cpu_offload(_model(), execution_device=torch.device("cpu"))
    assert model.get_input_embeddings().weight.device.type == "meta"
    assert input_device(model) == torch.device("cpu")
    with pytest.raises(ValueError, match="device_map must be"):
        spread_over_devices(_model(), "everywhere")
