"""Method specs: parsing, validation, and clear failures for methods this install lacks."""

from __future__ import annotations

import pytest

import scope_kv
from scope_kv import Adaptive, Discontinuous, Slide
from scope_kv.eval.methods import MethodSpecError, never_evicts, parse_method, parse_methods


def test_scope_strategies():
    assert parse_method("full").is_full
    assert parse_method(" slide : 512 / 256 ").decoding == Slide(512, 256)
    assert parse_method("adaptive:512/256", max_new_tokens=4096).decoding == Adaptive(512, 256, max_new_tokens=4096)
    assert parse_method("adaptive:512/256,T=4096").decoding.delta == 15
    assert parse_method("discontinuous:512/256,delta=3").decoding == Discontinuous(512, 256, delta=3)
    assert parse_method("slide:512/256").spec == "slide:512/256"


@pytest.mark.parametrize(
    "spec,match",
    [
        ("", "empty"),
        ("slide:512", "budget and a recent window"),
        ("slide:256/512", "recent"),
        ("slide:5x/2", "whole number"),
        ("adaptive:512/256", "T=<max_new_tokens>"),
        ("lru:10/2", "unknown method"),
        ("slide:64/32+snapkv:256", "prefill compressor"),
        ("full,budget=3", "budget"),
        ("a+b+c", "at most one"),
        ("slide:64/32,oops", "key=value"),
    ],
)
def test_bad_specs_say_what_to_write(spec, match):
    with pytest.raises(MethodSpecError, match=match):
        parse_method(spec)


def test_bad_spec_fails_alone():
    methods, errors = parse_methods(["full", "slide:8/4", "slide:4/8", "nonsense", "slide:8/4"], max_new_tokens=64)
    assert [m.spec for m in methods] == ["full", "slide:8/4"]
    assert set(errors) == {"slide:4/8", "nonsense", "slide:8/4"}  # the duplicate too


def test_prefill_specs_build_scope_kv_objects():
    m = parse_method("snapkv:2048+slide:512/256")
    assert m.prefill == scope_kv.SnapKV(budget=2048) and m.decoding == Slide(512, 256)
    m = parse_method("snapkv:1024,window=8,kernel=7,pooling=max")
    assert m.prefill == scope_kv.SnapKV(budget=1024, window=8, kernel=7, pooling="max") and m.decoding is None
    assert parse_method("pyramidkv:2048,beta=20+full").prefill == scope_kv.PyramidKV(2048, beta=20)
    assert parse_method("h2o:2048,recent=8+discontinuous:512/256", 4096).prefill == scope_kv.H2O(2048, recent=8)
    assert parse_method("streamingllm:2048,sinks=4").prefill == scope_kv.StreamingLLM(2048, sinks=4)


def test_unified_specs():
    assert parse_method("unified-h2o:2560/256").decoding == scope_kv.UnifiedH2O(2560, 256)
    assert parse_method("unified-streamingllm:2560/256").decoding == scope_kv.UnifiedStreamingLLM(2560, 256)
    with pytest.raises(MethodSpecError, match="no prefill"):
        parse_method("snapkv:2048+unified-h2o:2560/256")


def test_prompt_relative_budget_gives_equal_memory_per_prompt():
    m = parse_method("unified-h2o:prompt+64/32")
    assert m.decoding is None and not m.is_full
    assert m.decoding_for(1000) == scope_kv.UnifiedH2O(1064, 32)
    assert parse_method("unified-streamingllm:prompt+64/32").decoding_for(10) == scope_kv.UnifiedStreamingLLM(74, 32)
    with pytest.raises(MethodSpecError, match="prompt length"):
        m.decoding_for(None)
    with pytest.raises(MethodSpecError, match="unified baselines"):
        parse_method("slide:prompt+64/32")
    with pytest.raises(MethodSpecError, match="recent window"):
        parse_method("unified-h2o:64/prompt+3")


@pytest.mark.parametrize(
    "spec,prompts,idle_at,evicts_at",
    [
        ("unified-h2o:prompt+32/16", [100, 300], 32, 33),
        ("unified-h2o:prompt/4+32/16", [100, 300], None, 1),  # the prompt alone is over its budget
        ("unified-h2o:400/16", [100, 300], 100, 101),  # fixed: the longest prompt fills it first
        # R-KV selects once the pool is `buffer` past its budget, not at the budget
        ("unified-rkv:prompt+24/8,buffer=8", [100, 300], 31, 32),
        ("rkv:24/8,buffer=8", None, 31, 32),
        ("slide:24/8", None, 24, 25),
    ],
)
def test_a_method_is_idle_exactly_while_its_own_plan_never_selects(spec, prompts, idle_at, evicts_at):
    """The CLI warns about a method that evicts nothing in the run; the test asks each method's
    own plan, on SCOPE's split and over prompt + output (unified), at the last idle length and the
    first that evicts."""
    method = parse_method(spec)
    if idle_at is not None:
        reason = never_evicts(method, idle_at, prompts)
        assert reason is not None and reason.startswith(f"{spec} evicts nothing in this run"), reason
    assert never_evicts(method, evicts_at, prompts) is None
