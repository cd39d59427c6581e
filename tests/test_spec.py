"""scope_kv.make_cache and the spec grammar (scope_kv.spec): one parser for the library and the CLI."""

from __future__ import annotations

import re

import pytest
import torch

import scope_kv
from conftest import make_model
from scope_kv import (
    H2O,
    Adaptive,
    Discontinuous,
    PyramidKV,
    ScopeCache,
    Slide,
    SnapKV,
    StreamingLLM,
    UnifiedH2O,
    UnifiedStreamingLLM,
    make_cache,
)
from scope_kv import spec as spec_module
from scope_kv.compat import cache_kwargs
from scope_kv.eval import methods as eval_methods
from scope_kv.spec import CacheSpec, SpecError, parse_spec


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


@pytest.mark.parametrize(
    "text,prefill,decoding",
    [
        ("full", None, None),
        ("slide:512/256", None, Slide(512, 256)),
        ("adaptive:512/256,T=4096", None, Adaptive(512, 256, max_new_tokens=4096)),
        ("discontinuous:512/256,delta=15", None, Discontinuous(512, 256, delta=15)),
        ("snapkv:2048+slide:512/256", SnapKV(2048), Slide(512, 256)),
        ("snapkv:2048,window=8,kernel=7,pooling=max", SnapKV(2048, window=8, kernel=7, pooling="max"), None),
        ("pyramidkv:2048,beta=20+full", PyramidKV(2048, beta=20), None),
        ("h2o:2048,recent=8+adaptive:512/256,T=4096", H2O(2048, recent=8), Adaptive(512, 256, max_new_tokens=4096)),
        ("streamingllm:2048,sinks=4", StreamingLLM(2048, sinks=4), None),
        ("unified-h2o:2560/256", None, UnifiedH2O(2560, 256)),
        ("unified-streamingllm:2560/256", None, UnifiedStreamingLLM(2560, 256)),
    ],
)
def test_make_cache_builds_what_the_spec_names(model, text, prefill, decoding):
    cache = make_cache(model, text)
    assert isinstance(cache, ScopeCache)
    assert cache.prefill == prefill and cache.decoding == decoding
    assert cache.static is False and cache.per_query_head is False


def test_a_spec_cache_generates_what_the_hand_built_cache_generates(model):
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (1, 40))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    runs = []
    for cache in (
        make_cache(model, "snapkv:24,window=4,kernel=3+slide:8/4"),
        ScopeCache(model, prefill=SnapKV(24, window=4, kernel=3), decoding=Slide(8, 4)),
    ):
        out = model.generate(**inputs, **cache_kwargs(cache), max_new_tokens=24, min_new_tokens=24, do_sample=False)
        runs.append((out, cache.kv_length(0)))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1] == 24 + 8  # the compressed prompt + the decoding budget


def test_adaptive_needs_a_length_and_says_how_to_give_it(model):
    with pytest.raises(SpecError, match=re.escape("max_new_tokens=")) as error:
        make_cache(model, "adaptive:512/256")
    assert "T=" in str(error.value)
    assert make_cache(model, "adaptive:512/256", max_new_tokens=4096).decoding == Adaptive(
        512, 256, max_new_tokens=4096
    )
    # the spec's own T= wins over the keyword (the keyword only fills in a missing length)
    assert make_cache(model, "adaptive:512/256,T=1024", max_new_tokens=4096).decoding.max_new_tokens == 1024


def test_a_budget_set_from_the_prompt_needs_the_prompt_length(model):
    spec = "unified-h2o:prompt+64/32"
    with pytest.raises(SpecError, match="prompt_tokens="):
        make_cache(model, spec)
    assert make_cache(model, spec, prompt_tokens=1000).decoding == UnifiedH2O(1064, 32)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1]])
    assert make_cache(model, spec, prompt_tokens=mask).decoding == UnifiedH2O(68, 32)
    assert make_cache(model, "unified-h2o:prompt/4+64/32", prompt_tokens=[400]).decoding == UnifiedH2O(164, 32)
    padded = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with pytest.raises(SpecError, match="one cache per prompt length"):
        make_cache(model, spec, prompt_tokens=padded)
    with pytest.raises(SpecError, match="positive whole numbers"):
        make_cache(model, spec, prompt_tokens=[0])


def test_cache_options_in_the_spec(model):
    cache = make_cache(model, "slide:64/32,static")
    assert cache.static and cache.decoding == Slide(64, 32)
    cache = make_cache(model, "snapkv:256+slide:64/32,per_query_head")
    assert cache.per_query_head and not cache.static and cache.prefill == SnapKV(256)
    assert make_cache(model, "full,per_query_head=true").per_query_head
    assert make_cache(model, "slide:64/32,static=true,per_query_head").static
    # keyword arguments override the spec's options
    assert not make_cache(model, "slide:64/32,static", static=False).static
    assert make_cache(model, "slide:64/32", per_query_head=True).per_query_head


def test_per_query_head_stores_each_kv_head_once_per_query_head(model):
    ids = torch.randint(3, 128, (1, 12))
    sizes = {}
    for text in ("slide:8/4", "slide:8/4,per_query_head"):
        cache = make_cache(model, text)
        with torch.no_grad():
            model(input_ids=ids, **cache_kwargs(cache))
        sizes[text] = cache.layers[0].keys.shape[1]
    heads = model.config.num_attention_heads // model.config.num_key_value_heads
    assert sizes["slide:8/4,per_query_head"] == heads * sizes["slide:8/4"]


def test_uncapped_schedules():
    for text in ("adaptive:64/32,T=256,uncapped", "discontinuous:64/32,T=256,cap_budget=false"):
        decoding = parse_spec(text).decoding
        assert decoding.cap_budget is False and not decoding.bounded
        assert decoding.budget_at(10_000) > 64  # grows past B, as the research code does
    assert parse_spec("adaptive:64/32,T=256").decoding.budget_at(10_000) == 64
    assert (
        parse_spec("adaptive:64/32,uncapped", max_new_tokens=256).decoding
        == parse_spec("adaptive:64/32,T=256,uncapped").decoding
    )


@pytest.mark.parametrize(
    "text,match",
    [
        ("slide:64/32,uncapped", "only adaptive and discontinuous"),
        ("unified-h2o:320/32,cap_budget=false", "only adaptive and discontinuous"),
        ("full,static", "bounded decoding pool"),
        ("snapkv:256,static", "bounded decoding pool"),
        ("adaptive:64/32,T=256,uncapped,static", "bounded pool"),
        ("slide:64/32,static=maybe", "true or false"),
        ("snapkv:256,static=false+slide:64/32,static", "set twice"),
        ("slide:8/3,static,static=false", "static is set twice"),  # inside one part, as across '+'
        ("adaptive:8/3,T=20,T=4000", "max_new_tokens is set twice"),
        ("adaptive:8/3,T=20,t=4000", "max_new_tokens is set twice"),
        ("snapkv:64,window=4,window=8", "window is set twice"),
        ("slide:64/32,fast", "static, per_query_head or uncapped"),
        ("unified-h2o:prompt+64/32,recent=3", "recent is set by 'unified-h2o:prompt\\+64/32'.*drop recent="),
        ("slide:64/32,budget=3", "budget is set by 'slide:64/32'"),
    ],
)
def test_bad_options_say_what_to_write(text, match):
    with pytest.raises(SpecError, match=match):
        parse_spec(text)


def test_errors_are_value_errors_and_name_the_spec(model):
    with pytest.raises(ValueError, match=re.escape("'slide:6/8'")):
        make_cache(model, "slide:6/8")
    with pytest.raises(SpecError, match="a string such as"):
        make_cache(model, Slide(64, 32))  # type: ignore[arg-type]


def test_a_parsed_spec_builds_a_fresh_cache_each_time(model):
    parsed = parse_spec("slide:64/32")
    first, second = make_cache(model, parsed), parsed.make_cache(model)
    assert first is not second and first.decoding == second.decoding == Slide(64, 32)


def test_one_parser_for_the_library_and_the_cli():
    assert eval_methods.parse_method is spec_module.parse_spec
    assert eval_methods.Method is CacheSpec and eval_methods.MethodSpecError is SpecError
    methods, errors = eval_methods.parse_methods(["slide:64/32,static", "adaptive:64/32,uncapped"], 256)
    assert not errors
    assert methods[0].static and methods[1].decoding.cap_budget is False


def test_every_example_in_the_grammar_parses():
    """The examples the spec module documents all parse, and build the objects they name."""
    doc = spec_module.__doc__
    block = doc[doc.index("Examples::") :]
    examples = re.findall(r"^    (\S+)\s{2,}(.+)$", block, re.MULTILINE)
    assert len(examples) >= 10
    for text, meaning in examples:
        parsed = parse_spec(text, max_new_tokens=4096)
        if parsed.depends_on_prompt:
            assert parsed.decoding_for(1000) is not None
        for name in ("Slide", "Adaptive", "Discontinuous", "SnapKV", "PyramidKV", "UnifiedH2O"):
            if f"{name}(" in meaning:
                built = [parsed.prefill, parsed.decoding or parsed.decoding_for(1000)]
                assert any(type(obj).__name__ == name for obj in built), (text, meaning)
        assert parsed.static == ("static=True" in meaning)


def test_make_cache_is_public():
    assert scope_kv.make_cache is make_cache
    assert "make_cache" in scope_kv.__all__


def test_a_spec_string_given_to_scope_cache_points_to_make_cache(model):
    with pytest.raises(TypeError, match=re.escape("make_cache(model, 'slide:64/32')")):
        ScopeCache(model, decoding="slide:64/32")  # type: ignore[arg-type]


ROUND_TRIP = [
    "full", "slide:512/256", "adaptive:512/256,T=4096", "discontinuous:512/256,delta=15",
    "adaptive:512/256,T=4096,uncapped", "snapkv:2048+slide:512/256", "snapkv:2048,window=16,kernel=5,pooling=avg",
    "pyramidkv:2048,beta=10+full", "h2o:2048,recent=16+discontinuous:512/256,T=4096", "streamingllm:2048,sinks=2",
    "unified-h2o:2560/256", "unified-streamingllm:2560/256", "slide:512/256,static", "slide:512/256,per_query_head",
    "snapkv:64,window=4+slide:16/8,static,per_query_head",
]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_what_the_library_prints_about_a_cache_is_a_spec_that_builds_it_again(model, text):
    """ScopeCache.describe() and each strategy's / compressor's describe() parse back to the same configuration."""
    cache = make_cache(model, text)
    printed = cache.describe()
    again = make_cache(model, printed)
    assert (again.prefill, again.decoding, again.static, again.per_query_head) == (
        cache.prefill, cache.decoding, cache.static, cache.per_query_head
    ), printed
    for part in (cache.prefill, cache.decoding):
        if part is not None:
            assert parse_spec(part.describe()).prefill in (part, None)
            assert parse_spec(part.describe()).decoding in (part, None)


def test_prefill_window_error_suggests_a_value_that_is_accepted():
    for cls in (SnapKV, PyramidKV):
        with pytest.raises(ValueError, match=r"e\.g\. \w+\(budget=(\d+), window=(\d+)\)") as info:
            cls(1)
        budget, window = (int(x) for x in re.search(r"budget=(\d+), window=(\d+)\)", str(info.value)).groups())
        cls(budget, window=window)  # the suggestion itself is accepted
        with pytest.raises(ValueError, match=r"e\.g\.") as info:
            cls(8, window=8)
        budget, window = (int(x) for x in re.search(r"budget=(\d+), window=(\d+)\)", str(info.value)).groups())
        cls(budget, window=window)


# A value other than the default for every setting a strategy or compressor of the grammar has
# (the walk below fails on a setting missing here, so a new one gets a round trip too).
_OTHER_VALUE = {
    "max_new_tokens": 4096, "delta": 15, "cap_budget": False, "buffer": 64, "mix": 0.25, "kernel": 5,
    "threshold": 0.25, "fusion": "sum", "window": 16, "pooling": "avg", "beta": 10, "block": 128, "sinks": 2,
    "recent": 16,
}


def _grammar_specs() -> list[str]:
    """Every kind of the grammar, each of its settings changed from its default one at a time,
    with every budget form the kind accepts."""
    import dataclasses

    from scope_kv.prompt_share import SHARED_PREFILL

    texts = []
    for kinds, budget_forms, is_decoding in (
        (spec_module.DECODING_KINDS, None, True),
        (spec_module.PREFILL_KINDS, None, False),
    ):
        for name, cls in kinds.items():
            if is_decoding:
                forms = ["600/32"] + (["prompt+64/32", "prompt/4+64/32"] if cls.evicts_prompt else [])
            else:
                forms = ["600"] + (["prompt/4", "prompt/4+64"] if name in SHARED_PREFILL else [])
            settings = [f.name for f in dataclasses.fields(cls) if f.init and f.name not in ("budget",)]
            if is_decoding:
                settings.remove("recent")  # written as the budget's "/r"
            for form in forms:
                texts.append(f"{name}:{form}")
                for setting in settings:
                    assert setting in _OTHER_VALUE, f"{name}.{setting}: add a value to _OTHER_VALUE"
                    value = _OTHER_VALUE[setting]
                    text = str(value).lower() if isinstance(value, bool) else str(value)
                    texts.append(f"{name}:{form},{setting}={text}")
    return texts


def test_every_kind_and_setting_of_the_grammar_prints_a_spec_that_parses_back_to_it():
    """parse(describe(x)) == x, walking every strategy and compressor the grammar names, each
    setting it has, and each budget form (numbers, ``prompt+N``, ``prompt/D+N``, ``prompt/D``)."""
    texts = _grammar_specs()
    assert len(texts) > 60
    for text in texts:
        parsed = parse_spec(text, max_new_tokens=4096)
        for part in (parsed.prefill, parsed.decoding_for(1000)):
            if part is None:
                continue
            printed = part.describe()
            again = parse_spec(printed)
            assert part in (again.prefill, again.decoding_for(1000)), (text, printed)


def test_a_cache_prints_itself_as_its_spec(model):
    cache = make_cache(model, "snapkv:64,window=4+slide:16/8,static")
    assert repr(cache) == f"ScopeCache('snapkv:64,window=4+slide:16/8,static', layers={len(cache.layers)}, managed={len(cache.layers)})"
