"""kvpress scorer presses as SCOPE prefill compressors (scope_kv.integrations.kvpress).

kvpress is installed without its dependencies (``pip install --no-deps kvpress==0.5.5``): its package
``__init__`` imports every press, several of which need packages we do not install (cachetools,
datasets, ...), and it patches transformers' attention functions at import. The presses
themselves only need torch and transformers, so the test imports the press modules alone:
the ``kvpress`` package object is created bare (no ``__init__`` executed) and its submodules are
then imported normally from the installed files.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from conftest import kvpress_module, make_model
from scope_kv import ScopeCache, Slide
from scope_kv.compat import cache_kwargs
from scope_kv.integrations.kvpress import KVPressPrefill

_press_module = kvpress_module


def _press(kind: str, ratio: float):
    if kind == "snapkv":
        return _press_module("snapkv_press").SnapKVPress(compression_ratio=ratio, window_size=4, kernel_size=3)
    if kind == "pyramidkv":
        return _press_module("pyramidkv_press").PyramidKVPress(compression_ratio=ratio, window_size=4, kernel_size=3, beta=2)
    if kind == "knorm":
        return _press_module("knorm_press").KnormPress(compression_ratio=ratio)
    if kind == "streaming":
        return _press_module("streaming_llm_press").StreamingLLMPress(compression_ratio=ratio, n_sink=2)
    if kind == "tova":
        return _press_module("tova_press").TOVAPress(compression_ratio=ratio)
    raise ValueError(kind)


PRESSES = ("snapkv", "pyramidkv", "knorm", "streaming", "tova")


def _capture_inputs(model, ids):
    """Prefill with a DynamicCache; return its keys/values and each attention module's input."""
    captured: dict[int, dict] = {}

    def hook(module, args, kwargs):
        captured[module.layer_idx] = {
            "hidden_states": kwargs["hidden_states"],
            "position_embeddings": kwargs["position_embeddings"],
        }

    attention = [m for m in model.modules() if type(m).__name__.endswith("Attention") and hasattr(m, "layer_idx")]
    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in attention]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    for handle in handles:
        handle.remove()
    return cache, {m.layer_idx: m for m in attention}, captured


@pytest.mark.parametrize("kind", PRESSES)
def test_kept_entries_equal_the_press_own_top_k(kind):
    """What KVPressPrefill keeps is exactly kvpress's ScorerPress rule: the top n_kept entries by
    press.score on the full prompt (n_kept from the compression ratio, or PyramidKVPress's
    per-layer budget)."""
    model = make_model("llama")
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (1, 48))
    press = _press(kind, 0.5)
    dynamic, modules, inputs = _capture_inputs(model, ids)

    cache = ScopeCache(model, prefill=KVPressPrefill(press), decoding=Slide(8, 2))
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache))
    cache.finish_prefill()

    for idx, module in modules.items():
        keys, values = dynamic.layers[idx].keys, dynamic.layers[idx].values
        kwargs = dict(inputs[idx], attention_mask=None)
        scores = press.score(module, inputs[idx]["hidden_states"], keys, values, None, kwargs)
        if hasattr(press, "get_layer_budget"):
            n_kept = press.get_layer_budget(module, keys.shape[2])
        else:
            n_kept = max(1, int(keys.shape[2] * (1 - press.compression_ratio)))
        # Ties (StreamingLLMPress scores are 0/1) resolve to the lower position, as ours do.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :n_kept]
        expected = keys.gather(2, order.sort(dim=-1).values[..., None].expand(-1, -1, -1, keys.shape[-1]))
        layer = cache.layers[idx]
        assert layer.length == n_kept
        torch.testing.assert_close(layer.keys[:, :, : layer.length], expected, rtol=0, atol=1e-6)


def test_chunked_prefill_gives_the_press_the_whole_prompt():
    model = make_model("llama")
    torch.manual_seed(4)
    ids = torch.randint(3, 128, (1, 40))
    press = _press("snapkv", 0.5)
    one = ScopeCache(model, prefill=KVPressPrefill(press), decoding=Slide(8, 2))
    chunked = ScopeCache(model, prefill=KVPressPrefill(press), decoding=Slide(8, 2))
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(one))
        for lo in range(0, 40, 16):
            model(input_ids=ids[:, lo : lo + 16], **cache_kwargs(chunked))
    one.finish_prefill()
    chunked.finish_prefill()
    for a, b in zip(one.layers, chunked.layers):
        assert a.length == b.length == 20
        torch.testing.assert_close(a.keys[:, :, : a.length], b.keys[:, :, : b.length], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ("snapkv", "knorm"))
def test_generation_under_scope_decoding_with_padding(kind):
    """A press under Slide: bounded cache, and a padded batch row decodes as the row alone."""
    model = make_model("llama")
    torch.manual_seed(5)
    ids = torch.randint(3, 128, (2, 40))
    mask = torch.ones_like(ids)
    ids[1, :9], mask[1, :9] = 0, 0
    prefill = KVPressPrefill(_press(kind, 0.5), budget=16)
    cache = ScopeCache(model, prefill=prefill, decoding=Slide(8, 2))
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert all(cache.kv_length(i) <= 16 + 8 for i in range(2))
    alone = model.generate(
        input_ids=ids[1:, 9:], **cache_kwargs(ScopeCache(model, prefill=prefill, decoding=Slide(8, 2))),
        max_new_tokens=10, min_new_tokens=10, do_sample=False,
    )
    assert torch.equal(alone[0, 31:], out[1, 40:])


def test_adapter_refuses_non_presses_and_needs_a_budget_rule():
    with pytest.raises(TypeError, match="score"):
        KVPressPrefill(object())

    class NoRatio:
        def score(self, *args):
            return None

    with pytest.raises(ValueError, match="budget="):
        KVPressPrefill(NoRatio())
    assert KVPressPrefill(NoRatio(), budget=8).budget == 8


def test_scope_kv_never_imports_kvpress():
    """No module of scope_kv imports kvpress (statically: a fresh interpreter costs ~40 s here)."""
    import ast
    import pathlib

    import scope_kv

    root = pathlib.Path(scope_kv.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            assert not [n for n in names if n.split(".")[0] == "kvpress"], f"{path} imports kvpress"


def test_a_kvpress_cache_prints_a_spec_shaped_line_that_says_how_to_build_it():
    """A press is a Python object, so a kvpress cache's spec cannot rebuild it: what the cache
    prints has the grammar's shape, and parsing it raises a SpecError that says how to build the
    cache in Python (not "unknown method")."""
    from scope_kv.spec import SpecError, parse_spec

    model = make_model("llama")
    by_ratio = ScopeCache(model, prefill=KVPressPrefill(_press("snapkv", 0.5)), decoding=Slide(8, 4))
    by_budget = ScopeCache(model, prefill=KVPressPrefill(_press("knorm", 0.5), budget=16))
    assert by_ratio.describe() == "kvpress:press=SnapKVPress,compression_ratio=0.5+slide:8/4"
    assert by_budget.describe() == "kvpress:press=KnormPress,budget=16+full"
    for cache in (by_ratio, by_budget):
        assert repr(cache).startswith(f"ScopeCache({cache.describe()!r}")
        with pytest.raises(SpecError, match=r"Python object.*KVPressPrefill\(press"):
            parse_spec(cache.describe())
