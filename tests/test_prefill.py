"""Prefill compressors (SnapKV, PyramidKV, H2O, StreamingLLM) against brute-force references.

Unit tests drive a ScopeLayer with random tensors, as the model would: ``update`` with the
prompt's keys (in chunks or at once), ``after_attention`` with the same forward's queries and
mask, then ``finish_prefill``. The kept set of each (row, KV head) is read back from the held
keys and compared with the reference on the row's unpadded prompt.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefill_reference as ref
from conftest import make_model
from scope_kv import H2O, PyramidKV, ScopeCache, ScopeLayer, Slide, SnapKV, StreamingLLM
from scope_kv.compat import cache_kwargs
from scope_kv.prefill.h2o import accumulated_attention
from scope_kv.testing import attend

DIM = 8


class _Attention(torch.nn.Module):
    """Stands in for a model's attention module (the layer checks it belongs to its model)."""


def make_inputs(batch=1, q_heads=4, kv_heads=2, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, q_heads, n, DIM, generator=g) * 1.5
    k = torch.randn(batch, kv_heads, n, DIM, generator=g) * 1.5
    v = torch.randn(batch, kv_heads, n, DIM, generator=g)
    return q, k, v


def run_prefill(compressor, q, k, v, pads=None, chunks=None, layer_idx=0, num_layers=1):
    """Prefill a fresh layer with (q, k, v), left-padded by ``pads`` per row; returns the layer."""
    module = _Attention()
    layer = ScopeLayer(layer_idx, None, frozenset({id(module)}), compressor, num_layers)
    n = k.shape[2]
    pads = torch.zeros(k.shape[0], dtype=torch.long) if pads is None else torch.as_tensor(pads)
    pos = 0
    for size in chunks or [n]:
        keys, _ = layer.update(k[:, :, pos : pos + size], v[:, :, pos : pos + size])
        length = keys.shape[-2]
        mask = torch.arange(length)[None, :] >= pads[:, None]  # 2-D padding mask (flash format)
        attend(layer, module, q[:, :, pos : pos + size], mask, scaling=ref.default_scale(DIM))
        pos += size
    layer.finish_prefill()
    return layer


def kept_positions(layer, k, b, pad):
    """Per KV head, the prompt positions (unpadded coordinates) whose keys the layer still holds."""
    valid = layer.keys[b, :, int(layer.start[b]) : layer.length]
    out = []
    for h in range(k.shape[1]):
        distance = (valid[h][:, None, :] - k[b, h][None, :, :]).abs().amax(dim=-1)  # exact, unlike cdist
        positions = distance.argmin(dim=-1)
        assert torch.all(distance.min(dim=-1).values < 1e-5)
        out.append(sorted((positions - pad).tolist()))
    return out


SNAP_CASES = [
    pytest.param(dict(budget=20, window=4, kernel=7, pooling="max"), 2, id="max-gqa"),
    pytest.param(dict(budget=20, window=4, kernel=5, pooling="avg"), 2, id="avg-gqa"),
    pytest.param(dict(budget=16, window=8, kernel=3, pooling="max"), 4, id="max-mha"),
]


@pytest.mark.parametrize("params,kv_heads", SNAP_CASES)
def test_snapkv_keeps_the_published_set(params, kv_heads):
    q, k, v = make_inputs(kv_heads=kv_heads, seed=1)
    layer = run_prefill(SnapKV(**params), q, k, v)
    expected = ref.snapkv(q[0], k[0], params["budget"], params["window"], params["kernel"], params["pooling"], ref.default_scale(DIM))
    assert layer.length == layer.prefill_length == params["budget"]
    assert kept_positions(layer, k, 0, 0) == expected


@pytest.mark.parametrize("n", [40, 48, 80])
def test_pyramidkv_keeps_the_published_set_per_layer(n):
    q, k, v = make_inputs(n=n, seed=2)
    params = dict(budget=20, window=4, kernel=5, pooling="avg", beta=3)
    for layer_idx in (0, 2, 3):
        layer = run_prefill(PyramidKV(**params), q, k, v, layer_idx=layer_idx, num_layers=4)
        count = ref.pyramid_budget(20, 4, 3, n, layer_idx, 4)
        expected = ref.snapkv(q[0], k[0], count, 4, 5, "avg", ref.default_scale(DIM)) if count < n else None
        assert layer.length == count
        if expected is not None:
            assert kept_positions(layer, k, 0, 0) == expected


@pytest.mark.parametrize("kv_heads", [1, 2])
def test_h2o_keeps_the_published_set(kv_heads):
    q, k, v = make_inputs(kv_heads=kv_heads, n=40, seed=3)
    layer = run_prefill(H2O(budget=16, recent=4), q, k, v)
    assert kept_positions(layer, k, 0, 0) == ref.h2o(q[0], k[0], 16, 4, ref.default_scale(DIM))


def test_streamingllm_keeps_sinks_and_recent():
    q, k, v = make_inputs(seed=4)
    layer = run_prefill(StreamingLLM(budget=12, sinks=3), q, k, v)
    assert kept_positions(layer, k, 0, 0) == ref.streaming(48, 12, 3, 2)


COMPRESSORS = [
    pytest.param(SnapKV(budget=16, window=4, kernel=5), id="snapkv"),
    pytest.param(PyramidKV(budget=16, window=4, kernel=5, beta=2), id="pyramidkv"),
    pytest.param(H2O(budget=16, recent=4, block=5), id="h2o"),
    pytest.param(StreamingLLM(budget=16, sinks=2), id="streamingllm"),
]


def _reference(compressor, q, k, layer_idx=0, num_layers=1):
    n, scale = k.shape[1], ref.default_scale(DIM)
    if isinstance(compressor, PyramidKV):
        count = ref.pyramid_budget(compressor.budget, compressor.window, compressor.beta, n, layer_idx, num_layers)
        return ref.snapkv(q, k, count, compressor.window, compressor.kernel, compressor.pooling, scale)
    if isinstance(compressor, SnapKV):
        return ref.snapkv(q, k, compressor.budget, compressor.window, compressor.kernel, compressor.pooling, scale)
    if isinstance(compressor, H2O):
        return ref.h2o(q, k, compressor.budget, compressor.recent, scale)
    return ref.streaming(n, compressor.budget, compressor.sinks, k.shape[0])


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_padded_rows_are_compressed_as_if_alone_and_pads_never_kept(compressor):
    """Per-row selection: each row of a left-padded batch keeps what it keeps alone; pads are
    never kept; rows with fewer real tokens than the budget keep them all behind invalid filler."""
    n = 48
    q, k, v = make_inputs(batch=3, n=n, seed=5)
    pads = [0, 20, 38]  # 48, 28 and 10 real tokens
    layer = run_prefill(compressor, q, k, v, pads=pads, layer_idx=1, num_layers=3)
    counts = []
    for b, pad in enumerate(pads):
        real = n - pad
        expected = _reference(compressor, q[b, :, pad:], k[b, :, pad:], layer_idx=1, num_layers=3)
        kept = kept_positions(layer, k, b, pad)
        assert kept == expected, f"row {b}"
        assert all(p >= 0 for head in kept for p in head)  # no pad slot among the kept entries
        counts.append(len(expected[0]))
        assert layer.length - int(layer.start[b]) == len(expected[0]) <= real
    assert layer.length == max(counts)  # one physical length for the batch


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_chunked_prefill_compresses_like_one_shot(compressor):
    # (A one-token chunk is indistinguishable from a decoding step, for the core as for us.)
    q, k, v = make_inputs(n=50, seed=6)
    whole = run_prefill(compressor, q, k, v, layer_idx=1, num_layers=3)
    chunked = run_prefill(compressor, q, k, v, chunks=[7, 20, 2, 21], layer_idx=1, num_layers=3)
    assert whole.length == chunked.length
    torch.testing.assert_close(whole.keys[:, :, : whole.length], chunked.keys[:, :, : chunked.length])


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("n", [5, 16])
def test_a_prompt_within_the_budget_is_kept_whole(compressor, n):
    q, k, v = make_inputs(n=n, seed=7)
    layer = run_prefill(compressor, q, k, v)
    assert layer.length == layer.prefill_length == n
    torch.testing.assert_close(layer.keys[:, :, :n], k)


@pytest.mark.parametrize("n", [16, 17, 23, 24, 30, 37, 200, 4000])
@pytest.mark.parametrize("layers", [2, 5, 30])
def test_pyramidkv_budgets_shrink_with_depth_and_average_the_budget(n, layers):
    pyramid = PyramidKV(budget=16, window=4, beta=4)
    budgets = [pyramid.layer_budget(n, l, layers) for l in range(layers)]
    assert budgets == sorted(budgets, reverse=True)
    assert all(pyramid.window < b <= n for b in budgets)
    mean = sum(budgets) / layers
    # The published floor in the per-layer step makes the mean exceed the budget by < (L - 1) / 2.
    assert 16 <= mean < 16 + (layers - 1) / 2 + 1e-9 or n < 16
    if n >= 2 * 12:
        # Exactly the budget when the published step divides: top + bottom layers average 2 (budget - window).
        low, high = 12 // 4, 24 - 12 // 4
        if high < n - 4 and (high - low) % (layers - 1) == 0:
            assert mean == 16
    if n >= 200 and 18 >= layers - 1:
        assert budgets[0] > budgets[-1]  # a real pyramid once the prompt and the range allow one


def test_h2o_scores_are_causal():
    """A query never contributes to a later key: garbage keys after the queries change nothing,
    and the scores of later keys stay zero."""
    q, k, _ = make_inputs(n=30, seed=8)
    n = 20
    clean = accumulated_attention(q[:, :, :n], k[:, :, :n], None, 0.3, block=4)
    future = k.clone()
    future[:, :, n:] = 1e3 * torch.randn_like(future[:, :, n:])
    # The 20 queries sit at slots 0..19 of a 20-slot prefix of the longer cache.
    probe = accumulated_attention(q[:, :, :n], future[:, :, :n], None, 0.3, block=7)
    torch.testing.assert_close(clean, probe)
    full = accumulated_attention(q, future, None, 0.3, block=6)  # 30 queries at slots 0..29
    partial = accumulated_attention(q[:, :, n:], future, None, 0.3, block=6)  # queries 20..29 only
    torch.testing.assert_close(full - partial, torch.nn.functional.pad(clean, (0, 10)), atol=1e-5, rtol=1e-5)
    # Every query's probabilities sum to one: the total is the number of queries times the group.
    torch.testing.assert_close(clean.sum(dim=-1), torch.full((1, 2), float(n * 2)))


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_h2o_prefill_memory_is_prompt_times_block_not_prompt_squared():
    """A 4096-token prompt in one forward: no tensor H2O creates holds a prompt x prompt matrix
    (for one head, let alone all heads); the largest is q_heads x block x prompt."""
    n, block, q_heads = 4096, 128, 4
    q, k, v = make_inputs(q_heads=q_heads, n=n, seed=9)
    module = _Attention()
    layer = ScopeLayer(0, None, frozenset({id(module)}), H2O(budget=512, recent=8, block=block), 1)
    keys, _ = layer.update(k, v)
    with _LargestTensor() as spy:
        attend(layer, module, q, scaling=ref.default_scale(DIM))
    assert spy.largest <= q_heads * block * n
    assert spy.largest < n * n
    layer.finish_prefill()
    assert layer.length == 512


def test_construction_errors_say_what_to_change():
    with pytest.raises(ValueError, match="window"):
        SnapKV(budget=8, window=8)
    with pytest.raises(ValueError, match="odd"):
        SnapKV(budget=32, kernel=4)
    with pytest.raises(ValueError, match="pooling"):
        SnapKV(budget=32, pooling="mean")
    with pytest.raises(ValueError, match="beta"):
        PyramidKV(budget=32, beta=0)
    with pytest.raises(ValueError, match="recent"):
        H2O(budget=8, recent=8)
    with pytest.raises(ValueError, match="sinks"):
        StreamingLLM(budget=4, sinks=4)
    with pytest.raises(TypeError, match="int"):
        H2O(budget=16.0)
    with pytest.raises(ValueError, match="budget"):
        StreamingLLM(budget=0)
    model = make_model("llama")
    with pytest.raises(TypeError, match="prefill must be"):
        ScopeCache(model, prefill=Slide(8, 2))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_padded_batch_generates_each_row_as_alone(backend, compressor):
    """End to end on a tiny model: the compressed batch decodes every row as that row alone."""
    model = make_model("llama", backend)
    torch.manual_seed(10)
    ids = torch.randint(3, 128, (3, 36))
    mask = torch.ones_like(ids)
    pads = [0, 9, 26]
    for b, pad in enumerate(pads):
        ids[b, :pad], mask[b, :pad] = 0, 0
    gen = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    cache = ScopeCache(model, prefill=compressor, decoding=Slide(6, 2))
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), **gen)
    for b, pad in enumerate(pads):
        alone = model.generate(input_ids=ids[b : b + 1, pad:], **cache_kwargs(ScopeCache(model, prefill=compressor, decoding=Slide(6, 2))), **gen)
        assert torch.equal(alone[0, 36 - pad :], out[b, 36:]), f"row {b}"


def test_second_turn_after_compression_continues():
    """A second generate call on a compressed cache: the new prompt and the previous turn join the
    prefill pool, which is compressed again under the same budget."""
    model = make_model("llama")
    torch.manual_seed(11)
    ids = torch.randint(3, 128, (1, 30))
    cache = ScopeCache(model, prefill=SnapKV(budget=12, window=4), decoding=Slide(6, 2))
    out = model.generate(input_ids=ids, **cache_kwargs(cache), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    more = torch.cat([out, torch.randint(3, 128, (1, 10))], dim=1)
    out2 = model.generate(input_ids=more, **cache_kwargs(cache), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert out2.shape[1] == more.shape[1] + 8
    assert cache.get_seq_length() == more.shape[1] + 7
    assert all(cache.kv_length(i) <= 12 + 6 for i in range(2))


def test_a_compressor_declares_its_memo_and_beam_search_reorders_it():
    """Each compressor keeps its own memo type (fresh per layer and prompt); re-indexing the batch
    (beam search) maps every tensor field, inside lists and tuples too, and leaves the rest."""
    from dataclasses import dataclass, field

    from scope_kv.prefill import PrefillMemo
    from scope_kv.prefill.h2o import H2OMemo
    from scope_kv.prefill.snapkv import SnapKVMemo

    assert type(SnapKV(64).new_memo()) is SnapKVMemo and type(H2O(64).new_memo()) is H2OMemo
    assert SnapKV(64).new_memo() is not SnapKV(64).new_memo()
    assert type(StreamingLLM(64).new_memo()) is PrefillMemo  # keeps nothing

    @dataclass
    class Memo(PrefillMemo):
        rows: torch.Tensor | None = None
        pieces: list = field(default_factory=list)
        scale: float = 0.5

    memo = Memo(rows=torch.arange(3), pieces=[torch.arange(3) * 10, (torch.arange(3), "tag")])
    memo.map_batch(lambda t: t[torch.tensor([2, 0])])
    assert memo.rows.tolist() == [2, 0] and memo.pieces[0].tolist() == [20, 0]
    assert memo.pieces[1][0].tolist() == [2, 0] and memo.pieces[1][1] == "tag" and memo.scale == 0.5


def test_only_the_compressor_writes_its_memo():
    """Every write to a compressor's memo during a real generation -- prompt, decoding, and beam
    search re-indexing the batch -- comes from the compressor's own module or the memo's own
    batch mapping (scope_kv.prefill.base), never from the layer or the cache."""
    import sys
    from dataclasses import dataclass

    from scope_kv.prefill.snapkv import SnapKVMemo

    writers: set[str] = set()

    @dataclass
    class TracedMemo(SnapKVMemo):
        def __setattr__(self, name, value):
            writers.add(sys._getframe(1).f_globals["__name__"])
            super().__setattr__(name, value)

    @dataclass(frozen=True)
    class TracedSnapKV(SnapKV):
        memo_type = TracedMemo

    model = make_model("llama")
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    for beams in (1, 2):
        cache = ScopeCache(model, prefill=TracedSnapKV(12, window=4), decoding=Slide(8, 3))
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, num_beams=beams,
                       do_sample=False, pad_token_id=0, **cache_kwargs(cache))
    writers.discard(__name__)  # the dataclass __init__ this test's class defines
    assert writers <= {"scope_kv.prefill.snapkv", "scope_kv.prefill.base", "types"}, writers
    assert "scope_kv.prefill.snapkv" in writers  # the compressor did fill it
