"""The decode fast path (scope_kv.kernels) against its plain-torch references and against the
reference selection path (scope_kv.selection), on the CPU; Triton runs under TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from scope_kv import Adaptive, Discontinuous, ScopeCache, Slide, kernels
from scope_kv.compat import cache_kwargs
from scope_kv.selection import attention_scores, compact_, select_heavy

SHAPES = [  # (batch, q_heads, kv_heads, dim)
    pytest.param((1, 4, 4, 16), id="mha"),
    pytest.param((2, 8, 2, 16), id="gqa4"),
    pytest.param((3, 6, 1, 32), id="mqa"),
]


def _inputs(shape, length, seed, capacity=None):
    batch, q_heads, kv_heads, dim = shape
    gen = torch.Generator().manual_seed(seed)
    capacity = capacity or length
    query = torch.randn(batch, q_heads, 1, dim, generator=gen) * 2
    keys = torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    values = torch.randn(batch, kv_heads, capacity, dim, generator=gen)
    return query, keys, values


def _padding_mask(batch, length, seed):
    gen = torch.Generator().manual_seed(seed)
    pads = torch.randint(0, length // 3, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] >= pads[:, None]
    return mask[:, None, None, :]  # (batch, 1, 1, length): transformers' sdpa decode mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
@pytest.mark.parametrize("seed", [0, 1])
def test_grouped_attention_reference_matches_sdpa(shape, masked, seed):
    batch, q_heads, kv_heads, dim = shape
    query, keys, values = _inputs(shape, 37, seed)
    mask = _padding_mask(batch, 37, seed) if masked else None
    scale = dim**-0.5
    out, lse = kernels.grouped_decode_attention_reference(query, keys, values, mask, scale)
    group = q_heads // kv_heads
    expected = F.scaled_dot_product_attention(
        query, keys.repeat_interleave(group, 1), values.repeat_interleave(group, 1), attn_mask=mask, scale=scale
    )
    assert out.shape == (batch, 1, q_heads, dim)
    torch.testing.assert_close(out, expected.transpose(1, 2), rtol=1e-5, atol=1e-5)
    logits = torch.matmul(query, keys.repeat_interleave(group, 1).transpose(-1, -2))[:, :, 0] * scale
    if mask is not None:
        logits = logits.masked_fill(~mask[:, :, 0], float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "padded"])
def test_candidate_scores_equal_full_softmax_scores(shape, masked):
    batch, _, _, dim = shape
    query, keys, values = _inputs(shape, 50, 3)
    mask = _padding_mask(batch, 50, 3) if masked else None
    _, lse = kernels.grouped_decode_attention_reference(query, keys, values, mask, dim**-0.5)
    valid = None if mask is None else mask[:, 0, 0]
    full = attention_scores(query, keys, valid, dim**-0.5)
    fast = kernels.candidate_scores(query, keys[:, :, 30:45], lse, dim**-0.5)
    torch.testing.assert_close(fast, full[:, :, 30:45], rtol=1e-5, atol=1e-7)


def _as_set(keys, values):
    """Held (key, value) pairs per (row, head) in a canonical order: the fast path keeps the same
    entries as the reference path, not necessarily in the same slots."""
    order = keys[..., 0].argsort(dim=-1)[..., None]
    return (torch.gather(keys, 2, order.expand_as(keys)), torch.gather(values, 2, order.expand_as(values)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rotation", [0, 3])
def test_evict_one_keeps_what_reference_compaction_keeps(shape, seed, rotation):
    """One evict-one step against select_heavy + compact_ on the same pool in arrival order:
    same entries kept; the ring's rotation and the newest entry's move are undone by unrotate_."""
    dim = shape[-1]
    batch, _, kv_heads, _ = shape
    start, end, recent, capacity = 11, 52, 12, 60
    query, keys, values = _inputs(shape, end, seed, capacity)
    keys[:, :, end:] = float("nan")  # beyond the held slots: must never be read into the pool
    _, lse = kernels.grouped_decode_attention_reference(query, keys[:, :, :end], values[:, :, :end], None, dim**-0.5)
    # Arrival order for the reference; the fast path gets the same pool with its ring rotated.
    k_ref, v_ref = keys.clone(), values.clone()
    n_cand = end - start - recent
    scores = attention_scores(query, k_ref[:, :, :end], None, dim**-0.5)[:, :, start : start + n_cand]
    new_end = compact_(k_ref, v_ref, start, end, select_heavy(scores, n_cand - 1), recent)
    ring0 = end - 1 - recent
    k_fast, v_fast = keys.clone(), values.clone()
    order = (torch.arange(recent) - rotation) % recent  # slot i of the ring holds arrival index order[i]
    for store in (k_fast, v_fast):
        store[:, :, ring0 : end - 1] = store[:, :, ring0 : end - 1][:, :, order]
    ptr = torch.full((batch, kv_heads), rotation, dtype=torch.int32)
    kernels.evict_one_reference_(query, k_fast, v_fast, lse, ptr, start, end, recent, dim**-0.5)
    assert new_end == end - 1 and torch.all(ptr == (rotation + 1) % recent)
    for a, b in zip(_as_set(k_fast[:, :, :new_end], v_fast[:, :, :new_end]), _as_set(k_ref[:, :, :new_end], v_ref[:, :, :new_end])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The ring in arrival order again equals the reference's newest `recent` entries.
    kernels.unrotate_(k_fast, v_fast, ptr, new_end, recent)
    assert torch.all(ptr == 0)
    torch.testing.assert_close(k_fast[:, :, new_end - recent : new_end], k_ref[:, :, new_end - recent : new_end])
    torch.testing.assert_close(v_fast[:, :, new_end - recent : new_end], v_ref[:, :, new_end - recent : new_end])


_TRITON_CHECK = """
import sys, torch
from scope_kv import kernels
def check(batch, q_heads, kv_heads, dim, start, end, recent, rotation):
    gen = torch.Generator().manual_seed(start + end + rotation)
    query = torch.randn(batch, q_heads, 1, dim, generator=gen) * 2
    keys = torch.randn(batch, kv_heads, end + 7, dim, generator=gen)
    values = torch.randn(batch, kv_heads, end + 7, dim, generator=gen)
    _, lse = kernels.grouped_decode_attention_reference(query, keys[:, :, :end], values[:, :, :end], None, dim**-0.5)
    k_ref, v_ref, k_tri, v_tri = keys.clone(), values.clone(), keys.clone(), values.clone()
    p_ref = torch.full((batch, kv_heads), rotation, dtype=torch.int32)
    p_tri = p_ref.clone()
    e_ref = kernels.evict_one_reference_(query, k_ref, v_ref, lse, p_ref, start, end, recent, dim**-0.5)
    e_tri = kernels.evict_one_(query, k_tri, v_tri, lse, p_tri, start, end, recent, dim**-0.5, use_triton=True)
    assert torch.equal(e_ref, e_tri), (e_ref, e_tri)
    assert torch.equal(p_ref, p_tri)
    assert torch.equal(k_ref, k_tri) and torch.equal(v_ref, v_tri)  # untouched slots included
    print("OK")
for case in sys.argv[1].split(";"):
    check(*map(int, case.split(",")))
"""


_SPLIT_KV_CHECK = """
import sys, torch
from scope_kv import kernels
from scope_kv.masks import head_mask, layer_mask
def check(batch, q_heads, kv_heads, length, dim, splits, mask_kind):
    gen = torch.Generator().manual_seed(batch * 100 + length)
    q = torch.randn(batch, q_heads, 1, dim, generator=gen) * 2
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    v = torch.randn(batch, kv_heads, length, dim, generator=gen)
    mask = None
    if mask_kind == 1:  # left padding, as an sdpa mask (batch, 1, 1, length)
        valid = torch.arange(length)[None, :] >= torch.arange(batch)[:, None] * 3
        mask = layer_mask("sdpa", valid, 1, torch.float32)
    elif mask_kind == 2:  # per-KV-head validity (the static layout), a whole chunk invalid too
        valid = torch.rand(batch, kv_heads, length, generator=gen) > 0.4
        valid[..., :64] = False
        valid[..., -1] = True
        mask = head_mask("sdpa", valid, q_heads, torch.float32)
    o_ref, l_ref = kernels.grouped_decode_attention_reference(q, k, v, mask, dim**-0.5)
    o, l = kernels.split_kv_decode_attention(q, k, v, mask, dim**-0.5, splits=None if splits == 0 else splits)
    torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(l, l_ref, rtol=1e-5, atol=1e-5)
    print("OK")
for case in sys.argv[1].split(";"):
    check(*map(int, case.split(",")))
"""

SPLIT_KV_CASES = [  # (batch, q_heads, kv_heads, length, dim, splits (0: default), mask kind)
    (1, 4, 2, 37, 16, 0, 0),  # one short chunk
    (2, 8, 2, 200, 32, 3, 1),  # padding, a partial last chunk
    (3, 6, 3, 130, 16, 1, 2),  # per-head validity, one split
    (2, 4, 4, 300, 16, 5, 2),  # a chunk of nothing valid merges to nothing
]


@pytest.mark.triton
def test_split_kv_decode_attention_matches_reference():
    """The split-KV Triton kernels under TRITON_INTERPRET=1 against the float32 reference: output
    and log-sum-exp, with padding masks, per-KV-head validity and every split count."""
    assert kernels.triton_available(), "install the triton extra: pip install -e '.[triton]'"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cases = ";".join(",".join(map(str, case)) for case in SPLIT_KV_CASES)
    done = subprocess.run([sys.executable, "-c", _SPLIT_KV_CHECK, cases], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.count("OK") == len(SPLIT_KV_CASES), done.stderr[-3000:]


_SPLIT_KV_OPERATOR_CHECK = """
import torch
from scope_kv import kernels
from scope_kv.masks import head_mask
gen = torch.Generator().manual_seed(0)
batch, q_heads, kv_heads, length, dim = 2, 8, 2, 150, 32
q = torch.randn(batch, q_heads, 1, dim, generator=gen)
k = torch.randn(batch, kv_heads, length, dim, generator=gen)
v = torch.randn(batch, kv_heads, length, dim, generator=gen)
valid = torch.rand(batch, kv_heads, length, generator=gen) > 0.3
valid[..., -1] = True
mask = head_mask("sdpa", valid, q_heads, torch.float32)
op = torch.ops.scope_kv.split_kv_decode_attention
# the operator's registration: schema, its shapes under tracing (fake tensors) and autograd's view
torch.library.opcheck(op, (q, k, v, mask, dim**-0.5, 3), test_utils=("test_schema", "test_faketensor"))
torch.library.opcheck(op, (q, k, v, None, dim**-0.5, 2), test_utils=("test_schema", "test_faketensor"))
o_ref, l_ref = kernels.grouped_decode_attention_reference(q, k, v, mask, dim**-0.5)
step = torch.compile(lambda q, k, v, m: op(q, k, v, m, dim**-0.5, 3), fullgraph=True, backend="aot_eager")
o, l = step(q, k, v, mask)
torch.testing.assert_close(o, o_ref, rtol=1e-4, atol=1e-5)
torch.testing.assert_close(l, l_ref, rtol=1e-5, atol=1e-5)
print("OK")
"""


@pytest.mark.triton
def test_split_kv_operator_traces_and_matches_reference():
    """The split-KV kernels as the ``scope_kv::split_kv_decode_attention`` operator (what a compiled
    static-layout step calls): its fake shapes agree with the kernels' outputs, and inside
    ``torch.compile(fullgraph=True)`` it gives the reference's output and log-sum-exp
    (TRITON_INTERPRET=1, CPU)."""
    assert kernels.triton_available(), "install the triton extra: pip install -e '.[triton]'"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _SPLIT_KV_OPERATOR_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.count("OK") == 1, done.stderr[-3000:]


TRITON_CASES = [  # (batch, q_heads, kv_heads, dim, start, end, recent, rotation)
    (1, 4, 4, 16, 0, 9, 3, 0),  # tiny
    (2, 8, 2, 16, 0, 9, 8, 5),  # ring only: no older entries
    (2, 8, 2, 16, 11, 52, 12, 7),
    (3, 6, 1, 32, 3, 200, 50, 49),  # several blocks of candidates
]


@pytest.mark.triton
def test_evict_one_triton_matches_reference():
    """The Triton kernel under TRITON_INTERPRET=1 (read when Triton is imported, hence a fresh
    process) against the plain-torch reference: same evicted slots, pointer, and storage."""
    assert kernels.triton_available(), "install the triton extra: pip install -e '.[triton]'"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cases = ";".join(",".join(map(str, case)) for case in TRITON_CASES)
    done = subprocess.run([sys.executable, "-c", _TRITON_CHECK, cases], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.count("OK") == len(TRITON_CASES), done.stderr[-3000:]


STRATEGIES = [
    pytest.param(lambda: Slide(12, 5), id="slide"),
    pytest.param(lambda: Adaptive(12, 5, max_new_tokens=40), id="adaptive"),
    pytest.param(lambda: Discontinuous(12, 5, max_new_tokens=40), id="discontinuous"),
]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("padded", [False, True], ids=["nopad", "leftpad"])
@pytest.mark.parametrize("snapkv", [False, True], ids=["fullprompt", "snapkv"])
def test_fast_decode_path_matches_reference_path(strategy, padded, snapkv):
    """Whole-model check: the fast path (forced on the CPU, plain-torch kernels) generates the
    same tokens and leaves the same held K/V as the reference path, also when a prefill
    compressor made the layers supply their own masks."""
    from scope_kv import SnapKV

    model = make_model("llama")
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :5] = 0
        mask[0, :5] = 0
    caches = []
    outputs = []
    for fast in (False, True):
        cache = ScopeCache(model, decoding=strategy(), prefill=SnapKV(12, window=4) if snapkv else None)
        for layer in cache.layers:
            layer.fast_decode = fast
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=40,
                             do_sample=False, pad_token_id=0)
        caches.append(cache)
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
    for ref, fast in zip(caches[0].layers, caches[1].layers):
        assert ref.length == fast.length and ref.selections == fast.selections > 0
        got = _as_set(fast.keys[:, :, : fast.length], fast.values[:, :, : fast.length])
        want = _as_set(ref.keys[:, :, : ref.length], ref.values[:, :, : ref.length])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


_BATCHED_CHECK = """
import sys, torch
from scope_kv import kernels
def check(seed, batch, q_heads, kv_heads, dim, layers):
    gen = torch.Generator().manual_seed(seed)
    work, expected = [], []
    for _ in range(layers):  # layers differ in prefill length, window and rotation, as PyramidKV's may
        start = int(torch.randint(0, 20, (1,), generator=gen))
        recent = int(torch.randint(1, 12, (1,), generator=gen))
        end = start + recent + 1 + int(torch.randint(0, 90, (1,), generator=gen))
        q = torch.randn(batch, q_heads, 1, dim, generator=gen) * 2
        k = torch.randn(batch, kv_heads, end + 5, dim, generator=gen)
        v = torch.randn(batch, kv_heads, end + 5, dim, generator=gen)
        _, lse = kernels.grouped_decode_attention_reference(q, k[:, :, :end], v[:, :, :end], None, dim**-0.5)
        ring = torch.randint(0, recent, (batch, kv_heads), generator=gen, dtype=torch.int32)
        k_ref, v_ref, r_ref = k.clone(), v.clone(), ring.clone()
        e_ref = kernels.evict_one_reference_(q, k_ref, v_ref, lse, r_ref, start, end, recent, dim**-0.5)
        out = torch.full((batch, kv_heads), -1, dtype=torch.long)
        work.append((q, k, v, lse, ring, out, start, end, recent))
        expected.append((k_ref, v_ref, r_ref, e_ref))
    batch_ = kernels.EvictionBatch()
    for q, k, v, lse, ring, out, start, end, recent in work:
        assert batch_.add(q, k, v, lse, ring, out, start, end, recent, dim**-0.5)
    assert len(batch_) == layers
    batch_.flush()
    assert len(batch_) == 0
    for (q, k, v, lse, ring, out, *_), (k_ref, v_ref, r_ref, e_ref) in zip(work, expected):
        assert torch.equal(out, e_ref), (out, e_ref)
        assert torch.equal(ring, r_ref) and torch.equal(k, k_ref) and torch.equal(v, v_ref)
    print("OK")
for case in sys.argv[1].split(";"):
    check(*map(int, case.split(",")))
"""


@pytest.mark.triton
def test_evict_one_batched_kernel_matches_reference():
    """One launch for several layers (kernels.EvictionBatch, TRITON_INTERPRET=1) leaves every
    layer exactly as the per-layer reference does; a group of one takes the per-layer kernel."""
    assert kernels.triton_available(), "install the triton extra: pip install -e '.[triton]'"
    cases = "0,2,8,2,16,3;1,3,6,1,32,4;2,1,4,4,16,1"
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", _BATCHED_CHECK, cases], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0 and done.stdout.count("OK") == 3, done.stderr[-3000:]


_BATCHED_MODEL_CHECK = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import make_model
from test_kernels import _as_set
from scope_kv import Adaptive, ScopeCache, Slide, SnapKV, kernels
from scope_kv.compat import cache_kwargs
def run(strategy, padded, snapkv, beams):
    model = make_model("llama")
    gen = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 128, (2, 24), generator=gen)
    mask = torch.ones_like(ids)
    if padded:
        ids[0, :5] = 0
        mask[0, :5] = 0
    results = []
    for batched in (False, True):
        cache = ScopeCache(model, decoding=strategy(), prefill=SnapKV(12, window=4) if snapkv else None)
        for layer in cache.layers:
            layer.fast_decode = True
            layer.batch_evictions = batched
        out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=30,
                             do_sample=False, num_beams=beams, pad_token_id=0)
        batch = cache.layers[0].ring.batch
        assert len(batch) == 0  # nothing left queued after generate
        # Batched: one launch per evicting step covering both layers; per layer: none of these.
        assert (batch.launches and set(batch.launches) == {2}) if batched else not batch.launches, batch.launches
        results.append((out, cache))
    (out_a, a), (out_b, b) = results
    assert torch.equal(out_a, out_b)
    for la, lb in zip(a.layers, b.layers):
        assert la.length == lb.length and la.selections == lb.selections > 0
        got = _as_set(lb.keys[:, :, :lb.length], lb.values[:, :, :lb.length])
        want = _as_set(la.keys[:, :, :la.length], la.values[:, :, :la.length])
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.equal(la.ring.ptr, lb.ring.ptr)
    print("OK")
run(lambda: Slide(12, 5), False, False, 1)
run(lambda: Adaptive(12, 5, max_new_tokens=30), True, True, 1)
run(lambda: Slide(12, 5), False, False, 2)
"""


@pytest.mark.triton
def test_batched_evictions_match_per_layer_in_generate():
    """Whole-model check of the one-launch-per-step path (forced on the CPU under
    TRITON_INTERPRET=1): the same tokens, held entries and ring pointers as per-layer evictions,
    with padding + SnapKV, and under beam search (re-indexing between steps)."""
    assert kernels.triton_available(), "install the triton extra: pip install -e '.[triton]'"
    env = dict(os.environ, TRITON_INTERPRET="1")
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", _BATCHED_MODEL_CHECK, tests_dir], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0 and done.stdout.count("OK") == 3, done.stderr[-3000:]


def test_compiled_code_reads_whether_triton_is_there_without_a_warning():
    """The kernel choice asks whether Triton is there inside the captured step; torch.compile must
    take the answer as a constant, not trace the cached import check (which warns on every
    compile)."""
    import warnings

    torch._dynamo.reset()

    def step(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if kernels.triton_available() else x - 1

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(2))
    assert out.tolist() == ([1.0, 1.0] if kernels.triton_available() else [-1.0, -1.0])
    torch._dynamo.reset()
