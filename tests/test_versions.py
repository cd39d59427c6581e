"""What differs between the supported transformers versions (scope_kv.compat), checked on the
installed one: the cache keyword generate and forwards prefer, the deprecated spelling still
working where it exists, the cache update's extra arguments, and the helpers themselves."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import flash_standin
from conftest import make_model
from scope_kv import ScopeCache, ScopeLayer, Slide, compat

NEW = 12
RENAMED = compat.TRANSFORMERS_VERSION >= (5, 24)


def _prompt() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 128, (2, 14), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :4], mask[1, :4] = 0, 0
    return ids, mask


def _generate(model, ids, mask, **cache):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, **cache)


def _future_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FutureWarning)]


def test_the_preferred_cache_keyword_follows_the_installed_version():
    expected = "cache" if RENAMED else "past_key_values"
    assert expected == compat.CACHE_KWARG
    cache = object()
    assert compat.cache_kwargs(cache) == {compat.CACHE_KWARG: cache}


def test_generate_with_the_preferred_keyword_warns_nothing_and_matches_the_other_spelling():
    """``generate(**cache_kwargs(cache))`` raises no FutureWarning; on 5.24+ ``cache=`` and the
    deprecated ``past_key_values=`` give the same tokens (the latter with its FutureWarning); before
    5.24 ``cache=`` is refused, which is why the spelling must follow the version."""
    model = make_model("llama")
    ids, mask = _prompt()
    cache = ScopeCache(model, decoding=Slide(6, 2))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        preferred = _generate(model, ids, mask, **compat.cache_kwargs(cache))
    assert _future_warnings(record) == []
    # generate used the cache it was given (and Slide bounded it)
    assert cache.get_seq_length() == ids.shape[1] + NEW - 1 and cache.kv_length(0) == ids.shape[1] + 6
    if RENAMED:
        with pytest.warns(FutureWarning, match="past_key_values"):
            old = _generate(model, ids, mask, past_key_values=ScopeCache(model, decoding=Slide(6, 2)))
        assert torch.equal(old, preferred)
        new = _generate(model, ids, mask, cache=ScopeCache(model, decoding=Slide(6, 2)))
        assert torch.equal(new, preferred)
    else:
        with pytest.raises(ValueError, match="cache"):
            _generate(model, ids, mask, cache=ScopeCache(model, decoding=Slide(6, 2)))
        old = _generate(model, ids, mask, past_key_values=ScopeCache(model, decoding=Slide(6, 2)))
        assert torch.equal(old, preferred)


def test_forward_with_the_preferred_keyword_warns_nothing_and_returns_the_cache():
    model = make_model("llama")
    ids, _ = _prompt()
    cache = ScopeCache(model, decoding=Slide(6, 2))
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        out = model(input_ids=ids, **compat.cache_kwargs(cache))
        step = model(input_ids=out.logits[:, -1:].argmax(-1), **compat.cache_kwargs(cache))
    assert _future_warnings(record) == []
    assert compat.output_cache(out) is cache and compat.output_cache(step) is cache
    assert cache.get_seq_length() == ids.shape[1] + 1


def test_cache_argument_reads_either_keyword():
    a, b = object(), object()
    assert compat.cache_argument({"cache": a}) is a
    assert compat.cache_argument({"past_key_values": b}) is b
    assert compat.cache_argument({"cache": a, "past_key_values": b}) is a
    assert compat.cache_argument({"cache": None, "past_key_values": b}) is b
    assert compat.cache_argument({"hidden_states": a}) is None


def test_cache_update_passes_extra_arguments_through_to_the_layer():
    """5.24's modeling files call ``cache.update(k, v, layer_idx, kwargs=attention_kwargs)``; the
    inherited ``Cache.update`` hands them to ``ScopeLayer.update``, which accepts and ignores them."""
    model = make_model("llama")
    cache = ScopeCache(model, decoding=Slide(6, 2))
    k = torch.randn(1, 2, 5, 16)
    keys, values = cache.update(k, -k, 0, kwargs={"position_ids": torch.arange(5)[None]})
    assert torch.equal(keys, k) and torch.equal(values, -k)
    layer = cache.layers[0]
    assert isinstance(layer, ScopeLayer) and layer.length == 5 and layer.seen == 5


def test_layer_templates_and_dummy_layers():
    model = make_model("gemma3")
    templates = compat.layer_templates(model.config)
    assert [type(t).__name__ for t in templates] == ["DynamicSlidingWindowLayer", "DynamicLayer", "DynamicLayer"]
    assert not any(compat.is_dummy_layer(t) for t in templates)

    class DummyLayer:  # stands for transformers' (5.23+), which is matched by name
        pass

    assert compat.is_dummy_layer(DummyLayer())


def test_untested_newer_transformers_is_allowed_with_a_warning(monkeypatch):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compat.warn_if_untested()
    warned = [w for w in record if issubclass(w.category, UserWarning)]
    assert bool(warned) == (compat.TRANSFORMERS_VERSION[:2] > compat.NEWEST_TESTED)
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", (*compat.NEWEST_TESTED, 0))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compat.warn_if_untested()
    assert not [w for w in record if issubclass(w.category, UserWarning)]
    newer = (compat.NEWEST_TESTED[0], compat.NEWEST_TESTED[1] + 1, 0)
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", newer)
    with pytest.warns(UserWarning, match="last ran on transformers") as record:
        compat.warn_if_untested()
    # a newer release is allowed: the warning reports, it does not ask for a downgrade
    assert "pip install" not in str(record[0].message)


def test_untested_version_warning_points_at_the_users_line(monkeypatch):
    """Built through make_cache (two library frames deep), the warning names this file, not scope_kv's."""
    from scope_kv import make_cache

    newer = (compat.NEWEST_TESTED[0], compat.NEWEST_TESTED[1] + 1, 0)
    monkeypatch.setattr(compat, "TRANSFORMERS_VERSION", newer)
    model = make_model("llama")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        make_cache(model, "slide:8/4")
    warned = [w for w in record if "last ran on transformers" in str(w.message)]
    assert warned and all(Path(w.filename).resolve() == Path(__file__).resolve() for w in warned)


def test_the_declared_range_admits_the_tested_versions():
    """pyproject's transformers requirement contains the floor, the newest tested release and the
    installed one, and agrees with compat.FLOOR."""
    text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    spec = SpecifierSet(re.search(r'"transformers([^"]+)"', text).group(1))
    floor, newest = (".".join(map(str, v)) + ".0" for v in (compat.FLOOR, compat.NEWEST_TESTED))
    assert floor in spec and newest in spec
    assert Version(transformers.__version__).base_version in spec
    below = f"{compat.FLOOR[0]}.{compat.FLOOR[1] - 1}.0"
    assert below not in spec
    assert compat.TRANSFORMERS_VERSION[:2] >= compat.FLOOR


def test_set_attention_implementation_switches_every_config_on_the_backend(monkeypatch):
    from scope_kv.attention import register_backend

    sdpa = make_model("llama", "sdpa")
    compat.set_attention_implementation(sdpa, register_backend("sdpa"), "sdpa")
    assert sdpa.config._attn_implementation == "scope_sdpa"
    flash_standin.install(monkeypatch)  # lets a CPU model take flash_attention_2
    flash = make_model("llama", "flash_attention_2")
    compat.set_attention_implementation(flash, register_backend("flash_attention_2"), "flash_attention_2")
    configs = {id(m.config): m.config for m in flash.modules() if hasattr(m, "config")}
    assert {c._attn_implementation for c in configs.values()} == {"scope_flash_attention_2"}
