"""The static layout (scope_kv.static): one physical shape per generation, compiled decoding.

Every strategy keeps exactly what the dynamic layout keeps (same tokens, same kept entries);
under ``generate``'s compiled decoding (``torch.compile`` with ``fullgraph=True``) the decode
step is traced once -- no graph break, no recompilation -- and still gives the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from transformers import CompileConfig

from conftest import make_model
from scope_kv import Adaptive, Discontinuous, ScopeCache, ScopeLayer, Slide, SnapKV, UnifiedH2O, UnifiedStreamingLLM, RKV, UnifiedRKV, MorphKV, UnifiedMorphKV
from scope_kv.compat import cache_kwargs

PROMPT, NEW = 24, 40


@dataclass(frozen=True)
class HalvingSlide(Slide):
    """A strategy with a schedule of its own: ``B`` for the first 10 steps, then ``B // 2`` (the
    budget drops, so one step evicts several entries). Stating the schedule once, in its device
    form, is all it takes (docs/architecture.md): both layouts read it."""

    def budget_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return torch.where(t < 10, self.budget, self.budget // 2)


@dataclass(frozen=True)
class EvenSteps(Slide):
    """A plan of its own: select only on even steps (the pool grows by one in between, so
    ``max_held`` allows one more entry)."""

    @property
    def slack(self) -> int:
        return 1

    def plan_tensor(self, n_decoding: torch.Tensor, t: torch.Tensor, skipped: torch.Tensor) -> tuple:
        return (n_decoding >= self.budget_tensor(t)) & (t % 2 == 0), skipped


@dataclass(frozen=True)
class GrowingSlide(Slide):
    """A schedule of its own that never lowers B(t) (from B - 3 up to B), and says so: both layouts
    may then take their one-out path."""

    budget_never_drops = True

    def budget_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return (self.budget - 3 + t // 4).clamp(max=self.budget)


@dataclass(frozen=True)
class KeyNormSlide(Slide):
    """A scorer of its own: candidates ranked by the negated L2 norm of their key (low-norm keys
    draw attention) instead of SCOPE's probabilities."""

    def score(self, step, first: int, last: int) -> torch.Tensor:
        return -step.keys[:, :, first:last].float().norm(dim=-1)


@dataclass(frozen=True)
class ShrinkingKeyNorm(KeyNormSlide):
    """Its own scorer and its own schedule together: key-norm scores, and a budget that steps
    down from ``B`` to ``B - 2`` after 6 steps and to ``B - 4`` after 12."""

    def budget_tensor(self, t: torch.Tensor) -> torch.Tensor:
        return self.budget - 2 * (t >= 6).long() - 2 * (t >= 12).long()


CASES = [
    pytest.param(lambda: HalvingSlide(8, 3), None, id="custom-schedule"),
    pytest.param(lambda: EvenSteps(8, 3), None, id="custom-plan"),
    pytest.param(lambda: GrowingSlide(9, 3), None, id="custom-growing-schedule"),
    pytest.param(lambda: KeyNormSlide(8, 3), None, id="custom-score"),
    pytest.param(lambda: ShrinkingKeyNorm(9, 3), None, id="custom-score-and-schedule"),
    pytest.param(lambda: Slide(8, 3), None, id="slide"),
    pytest.param(lambda: Adaptive(12, 5, max_new_tokens=NEW), None, id="adaptive"),
    pytest.param(lambda: Discontinuous(12, 5, max_new_tokens=NEW), None, id="discontinuous"),
    pytest.param(lambda: UnifiedH2O(20, 4), None, id="unified-h2o"),
    pytest.param(lambda: UnifiedStreamingLLM(20, 4), None, id="unified-streamingllm"),
    pytest.param(lambda: Slide(8, 3), lambda: SnapKV(12, window=4), id="snapkv+slide"),
    pytest.param(lambda: RKV(8, 3, buffer=4), None, id="rkv"),
    pytest.param(lambda: UnifiedRKV(20, 4, buffer=5), None, id="unified-rkv"),
    pytest.param(lambda: MorphKV(8, 3), None, id="morphkv"),
    pytest.param(lambda: UnifiedMorphKV(20, 4, fusion="sum"), None, id="unified-morphkv"),
]


def _inputs(batch: int = 2, seed: int = 1, pad: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (batch, PROMPT), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


def _same_live(a: ScopeLayer, b: ScopeLayer, mask: torch.Tensor | None = None) -> None:
    """Both layers hold the same live entries (to float rounding: other layers' attention sums in
    another slot order)."""
    for row_a, row_b in zip(_live(a, mask), _live(b, mask), strict=True):
        for head_a, head_b in zip(row_a, row_b, strict=True):
            torch.testing.assert_close(torch.tensor(head_a), torch.tensor(head_b), rtol=1e-5, atol=1e-5)


def _live(layer: ScopeLayer, mask: torch.Tensor | None = None) -> list[list[list[float]]]:
    """Live entries per (row, KV head) as sorted key fingerprints (layout-independent). ``mask``:
    the prompt's padding, for a dynamic layer that never needed to learn it (pads stay in place)."""
    keys = layer.keys[:, :, : layer.length]
    if layer.head_valid() is not None:
        valid = layer.head_valid()
    else:
        valid = layer.valid_slots().clone()
        if layer.start is None and mask is not None:
            valid[:, : mask.shape[1]] &= mask.bool()
        valid = valid[:, None, :].expand(keys.shape[:3])
    out = []
    for b in range(keys.shape[0]):
        out.append([sorted(keys[b, h, valid[b, h], 0].tolist()) for h in range(keys.shape[1])])
    return out


class _Counter:
    """A torch.compile backend that counts the graphs it is handed and runs them as traced.

    (transformers deep-copies the compile config, so the count lives in a list the copy shares.)"""

    def __init__(self) -> None:
        self._seen: list[int] = []

    @property
    def graphs(self) -> int:
        return len(self._seen)

    def backend(self) -> object:
        seen = self._seen

        def count(gm: torch.fx.GraphModule, example_inputs: list) -> object:
            seen.append(len(gm.graph.nodes))
            return gm.forward

        return count


def _compile_config(backend: object) -> CompileConfig:
    config = CompileConfig(fullgraph=True, backend=backend, mode=None)
    config._compile_all_devices = True  # generate compiles on CUDA only unless told (CPU in CI)
    return config


def _compiled_generate(model, cache, **kwargs) -> tuple[torch.Tensor, int]:
    """``generate`` with compiled decoding: its output and how many graphs were traced."""
    counter = _Counter()
    try:
        out = model.generate(**cache_kwargs(cache), compile_config=_compile_config(counter.backend()), **kwargs)
    finally:
        torch._dynamo.reset()
    return out, counter.graphs


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("strategy,prefill", CASES)
def test_static_layout_keeps_what_the_dynamic_layout_keeps(strategy, prefill, backend):
    model = make_model("llama", backend)
    ids, mask = _inputs()
    runs = []
    for static in (False, True):
        cache = ScopeCache(model, decoding=strategy(), prefill=prefill() if prefill else None, static=static)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            **cache_kwargs(cache),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
        runs.append((out, cache))
    (a, ca), (b, cb) = runs
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(a.logits), torch.stack(b.logits), rtol=1e-5, atol=1e-5)
    for la, lb in zip(ca.layers, cb.layers, strict=True):
        _same_live(la, lb, mask)
        assert lb.is_compileable and lb.head_valid() is not None
        assert lb.capacity == lb.length  # one fixed buffer


@pytest.mark.parametrize("strategy,prefill", CASES)
def test_compiled_decoding_is_one_graph_and_gives_the_same_tokens(strategy, prefill):
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                  pad_token_id=0)
    reference = model.generate(
        **cache_kwargs(ScopeCache(model, decoding=strategy(), prefill=prefill() if prefill else None)), **kwargs
    )
    cache = ScopeCache(model, decoding=strategy(), prefill=prefill() if prefill else None, static=True)
    assert cache.is_compileable
    out, graphs = _compiled_generate(model, cache, **kwargs)
    # traced once: every decode step has the same shapes and guards. A unified baseline whose
    # prompt exceeds its budget is traced twice: the first step over prompt + 1 slots, every later
    # one over budget + 1 (the layer moves into its bound after the first selection).
    decoding = strategy()
    expected = 2 if decoding.evicts_prompt and PROMPT + 1 > decoding.max_held else 1
    assert graphs == expected
    assert torch.equal(out, reference)


def test_compiled_decoding_with_the_grouped_decode_attention_is_one_graph():
    """The GPU's decode path (the grouped attention with its log-sum-exp, ``fast_decode``), here on
    the CPU through its reference: whatever the layer keeps between steps to hand the attention
    function must not change after the first compiled step, or every later step is traced again."""
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                  pad_token_id=0)
    reference_cache = ScopeCache(model, decoding=Slide(8, 3))
    for layer in reference_cache.layers:
        layer.fast_decode = True
    reference = model.generate(**cache_kwargs(reference_cache), **kwargs)
    cache = ScopeCache(model, decoding=Slide(8, 3), static=True)
    for layer in cache.layers:
        layer.fast_decode = True
    out, graphs = _compiled_generate(model, cache, **kwargs)
    assert graphs == 1
    assert torch.equal(out, reference)


@pytest.mark.parametrize("prefill", [None, lambda: SnapKV(12, window=4)])
def test_an_unpadded_batch_is_one_graph_too(prefill):
    """No padding: transformers drops the all-ones mask and asks the cache for the query offset
    before sizing the mask, and the first decode step enters the layout inside that sizing. Every
    step must still hand the compiled step the same inputs (a mask or none), or the second step is
    traced again."""
    model = make_model("llama", "sdpa")
    ids, mask = _inputs(pad=0)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                  pad_token_id=0)
    reference = model.generate(
        **cache_kwargs(ScopeCache(model, decoding=Slide(8, 3), prefill=prefill() if prefill else None)), **kwargs
    )
    cache = ScopeCache(model, decoding=Slide(8, 3), prefill=prefill() if prefill else None, static=True)
    out, graphs = _compiled_generate(model, cache, **kwargs)
    assert graphs == 1
    assert torch.equal(out, reference)


@pytest.mark.parametrize("strategy,prefill", CASES)
def test_compiled_step_takes_the_cache_storage_at_fixed_addresses(strategy, prefill):
    """Every tensor the compiled decode step reads from the cache is marked as a static address.
    A CUDA-graph replay copies each unmarked input into the graph's own buffer (and copies back
    the ones the step writes): for keys and values that is the whole KV storage twice a step.
    What may stay unmarked are the step's own small inputs (token ids, positions)."""
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    unmarked: list[tuple[int, ...]] = []

    def record(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        for t in example_inputs:
            if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter):
                if getattr(t, "_dynamo_static_input_type", None) is None:
                    unmarked.append(tuple(t.shape))
        return gm.forward

    cache = ScopeCache(model, decoding=strategy(), prefill=prefill() if prefill else None, static=True)
    try:
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=12,
                       do_sample=False, pad_token_id=0, compile_config=_compile_config(record))
    finally:
        torch._dynamo.reset()
    assert unmarked, "the recording backend saw no compiled step"
    batch = ids.shape[0]
    assert all(math.prod(shape) <= batch for shape in unmarked), unmarked


@pytest.mark.parametrize(
    "kwargs",
    [dict(do_sample=True, top_k=20), dict(do_sample=True, num_return_sequences=2)],
    ids=["sampling", "num_return_sequences"],
)
def test_compiled_sampling_matches_eager_sampling(kwargs):
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    torch.manual_seed(0)
    reference = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        pad_token_id=0,
        **cache_kwargs(ScopeCache(model, decoding=Slide(8, 3))),
        **kwargs,
    )
    torch.manual_seed(0)
    cache = ScopeCache(model, decoding=Slide(8, 3), static=True)
    out, graphs = _compiled_generate(
        model, cache, input_ids=ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=0, **kwargs
    )
    assert graphs == 1 and torch.equal(out, reference)


def test_multi_turn_leaves_and_reenters_the_static_layout():
    model = make_model("llama", "sdpa")
    ids, _ = _inputs(batch=1, pad=0)
    follow = torch.randint(3, 128, (1, 6), generator=torch.Generator().manual_seed(9))
    outs = []
    for static in (False, True):
        cache = ScopeCache(model, decoding=Slide(8, 3), static=static)
        first = model.generate(
            input_ids=ids, max_new_tokens=20, min_new_tokens=20, do_sample=False, **cache_kwargs(cache), pad_token_id=0
        )
        second_ids = torch.cat([first, follow], dim=1)
        second = model.generate(
            input_ids=second_ids,
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            **cache_kwargs(cache),
            pad_token_id=0,
        )
        outs.append((second, cache))
    (a, ca), (b, cb) = outs
    assert torch.equal(a, b)
    for la, lb in zip(ca.layers, cb.layers, strict=True):
        _same_live(la, lb)
        assert int(lb.get_seq_length()) == la.get_seq_length()


def test_beam_search_reorders_the_static_state():
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    kwargs = dict(
        num_beams=3,
        num_return_sequences=2,
        early_stopping=False,
        length_penalty=0.0,
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        pad_token_id=0,
    )
    a = model.generate(
        input_ids=ids, attention_mask=mask, **cache_kwargs(ScopeCache(model, decoding=Slide(8, 3))), **kwargs
    )
    b = model.generate(
        input_ids=ids,
        attention_mask=mask,
        **cache_kwargs(ScopeCache(model, decoding=Slide(8, 3), static=True)),
        **kwargs,
    )
    assert torch.equal(a, b)


def test_static_needs_a_bounded_pool_and_per_head_masks():
    model = make_model("llama", "sdpa")
    with pytest.raises(ValueError, match="bounded decoding pool"):
        ScopeCache(model, decoding=None, static=True)


def test_static_state_is_counted_on_the_device():
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    cache = ScopeCache(model, decoding=Slide(8, 3), static=True)
    model.generate(
        input_ids=ids,
        attention_mask=mask,
        **cache_kwargs(cache),
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
    )
    seen = cache.get_seq_length()
    assert isinstance(seen, torch.Tensor) and int(seen) == PROMPT + NEW - 1  # the last token is never fed
    layer = cache.layers[0]
    row = layer.summary()
    assert row["step"] == NEW - 1 and row["decoding"] == 8 and row["static_slots"] == PROMPT + Slide(8, 3).max_held
    assert cache.kv_length(0) == PROMPT + Slide(8, 3).max_held


def test_inductor_compiled_decoding_on_the_cpu_matches_eager():
    """The real compiler (inductor, fp32 on the CPU): one graph, the same tokens and logits."""
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    reference = model.generate(**cache_kwargs(ScopeCache(model, decoding=Slide(8, 3))), **kwargs)
    config = CompileConfig(fullgraph=True, backend="inductor", mode="default")
    config._compile_all_devices = True
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = model.generate(
                **cache_kwargs(ScopeCache(model, decoding=Slide(8, 3), static=True)), compile_config=config, **kwargs
            )
    finally:
        torch._dynamo.reset()
    assert torch.equal(out.sequences, reference.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(reference.logits), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", [lambda: UnifiedH2O(20, 4), lambda: UnifiedStreamingLLM(20, 4)], ids=["h2o", "streamingllm"])
def test_a_unified_baseline_is_bounded_in_the_static_layout_as_in_the_dynamic_one(strategy):
    """A 200-token prompt under a budget of 20: after the first decode step both layouts hold
    budget + 1 slots per layer (not the whole prompt), summary() reports the live entries, and
    the tokens are the same."""
    model = make_model("llama", "sdpa")
    ids = torch.randint(3, 128, (2, 200), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    runs = []
    for static in (False, True):
        cache = ScopeCache(model, decoding=strategy(), static=static)
        capacities: list[int] = []

        def record(module, args, kwargs, output, cache=cache, capacities=capacities):
            capacities.append(max(layer.capacity for layer in cache.layers))

        handle = model.register_forward_hook(record, with_kwargs=True)
        try:
            out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=12,
                                 min_new_tokens=12, do_sample=False, pad_token_id=0)
        finally:
            handle.remove()
        runs.append((out, cache, capacities))
    (a, dynamic, cap_a), (b, static_cache, cap_b) = runs
    assert torch.equal(a, b)
    bound = strategy().max_held  # budget + 1
    assert max(cap_a[2:]) <= bound and max(cap_b[2:]) <= bound  # every step after the first selection
    assert static_cache.nbytes() == dynamic.nbytes()
    for row in static_cache.summary():
        assert row["held"] == 20 and row["prefill"] + row["decoding"] == 20 and row["static_slots"] == bound


BOUND_CASES = [
    "slide:8/3", "adaptive:12/5,T=40", "discontinuous:12/5,T=40", "snapkv:12,window=4+slide:8/3",
    "unified-h2o:20/4", "unified-streamingllm:20/4", "slide:8/3,per_query_head", "rkv:8/3,buffer=4",
    "unified-rkv:20/4,buffer=5", "morphkv:8/3", "unified-morphkv:20/4",
]


@pytest.mark.parametrize("static", [False, True], ids=["default", "static"])
@pytest.mark.parametrize("spec", BOUND_CASES)
def test_memory_is_bounded_at_every_step_in_both_layouts(spec, static):
    """After every decode step, each managed layer allocates at most what its strategy may ever
    hold: prefill pool + B + slack + 1 slots (a unified baseline: its budget + 1, from the step
    after its first selection), in the default and the static layout alike."""
    from scope_kv import make_cache

    model = make_model("llama", "sdpa")
    ids, mask = _inputs(pad=5)
    cache = make_cache(model, spec + (",static" if static else ""))
    decoding = cache.decoding
    steps: list[list[tuple[int, int]]] = []

    def record(module, args, kwargs, output):
        steps.append([(layer.capacity, layer.prefill_length) for layer in cache.layers])

    handle = model.register_forward_hook(record, with_kwargs=True)
    try:
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW,
                       min_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        handle.remove()
    assert len(steps) == NEW  # the prefill, then NEW - 1 decode steps
    prompt_slots = 12 if "snapkv" in spec else PROMPT  # what the prefill pool keeps
    for t, layers in enumerate(steps[1:], start=1):
        for capacity, prefill in layers:
            if decoding.evicts_prompt:
                if t >= 2:
                    assert capacity <= decoding.max_held, (t, capacity)
            else:
                assert capacity <= prompt_slots + decoding.max_held, (t, capacity, prefill)


def test_custom_schedule_is_held_to_its_own_budget_in_both_layouts():
    """After step 10 the halving schedule holds B // 2 generated entries per (row, KV head) in
    either layout (the static layout once held B: it evicted one entry a step whatever the budget)."""
    model = make_model("llama", "sdpa")
    ids, mask = _inputs()
    for static in (False, True):
        cache = ScopeCache(model, decoding=HalvingSlide(8, 3), static=static)
        model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=NEW,
                       min_new_tokens=NEW, do_sample=False, pad_token_id=0)
        for layer in cache.layers:
            assert layer.summary()["decoding"] == 4, (static, layer.summary())


def test_static_layout_refuses_a_schedule_or_plan_it_cannot_run_on_the_device():
    @dataclass(frozen=True)
    class HostOnlySchedule(Slide):
        def budget_at(self, t: int) -> int:
            return self.budget if t < 10 else self.budget // 2

    class OwnPlan(EvenSteps):  # the host plan changed again, the device plan not
        def plan(self, n_decoding: int, t: int, skipped: int) -> tuple[bool, int]:
            return n_decoding >= self.budget_at(t), skipped

    model = make_model("llama", "sdpa")
    with pytest.raises(ValueError, match="overrides budget_at .* but not budget_tensor: state the schedule as HostOnlySchedule.budget_tensor"):
        ScopeCache(model, decoding=HostOnlySchedule(8, 3), static=True)
    with pytest.raises(ValueError, match="overrides plan .* but not plan_tensor: state the plan as OwnPlan.plan_tensor"):
        ScopeCache(model, decoding=OwnPlan(8, 3), static=True)
    for strategy in (HostOnlySchedule(8, 3), OwnPlan(8, 3)):  # the default layout runs them as written
        ScopeCache(model, decoding=strategy)


def test_a_schedule_stated_on_the_device_is_the_host_schedule_too():
    """HalvingSlide and EvenSteps state only the device form; the host form reads it. A subclass
    whose device form replaces a host rule it does not read is refused when it is built."""
    assert [HalvingSlide(8, 3).budget_at(t) for t in (0, 9, 10, 50)] == [8, 8, 4, 4]
    assert [EvenSteps(8, 3).plan(n, t, 0)[0] for n, t in ((8, 2), (8, 3), (7, 2))] == [True, False, False]

    @dataclass(frozen=True)
    class StaleHost(Adaptive):
        def budget_tensor(self, t: torch.Tensor) -> torch.Tensor:
            return torch.full_like(t, self.recent)

    with pytest.raises(TypeError, match="overrides budget_tensor .* but budget_at still comes from Adaptive"):
        StaleHost(8, 3, max_new_tokens=NEW)
