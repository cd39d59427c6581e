"""Triton kernels of the evict-one fast path (imported by scope_kv.kernels only when Triton is
installed). Module-level so that the kernels can call ``evict_one_program`` by name, compiled
and under ``TRITON_INTERPRET=1`` alike. The layout they maintain is described in
scope_kv.kernels."""

import triton
import triton.language as tl


@triton.jit
def evict_one_program(
    q_row,
    sq_h,
    lse_row,
    k_base,
    sk_s,
    v_base,
    sv_s,
    ring_slot,
    out_slot,
    start,
    ring0,
    newest,
    recent,
    scaling,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One (batch row, KV head): it alone touches that head's pool and ring pointer.
    d = tl.arange(0, DIM)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    q = tl.load(q_row + g[:, None] * sq_h + d[None, :], mask=g_ok[:, None], other=0.0)
    lse = tl.load(lse_row + g, mask=g_ok, other=float("inf"))
    ptr = tl.load(ring_slot)
    old = ring0 + ptr
    best_val = tl.full((), float("inf"), tl.float32)
    best_idx = tl.full((), 0, tl.int64)
    # Candidates in the reference's order: [start, ring0), then the ring's oldest entry.
    for j0 in range(start, ring0 + BLOCK, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        ok = offs < ring0
        is_old = (offs == j0) & (offs >= ring0)  # the last iteration scores only `old`
        slot = tl.where(is_old, old, offs).to(tl.int64)
        ok = ok | is_old
        k = tl.load(k_base + slot[:, None] * sk_s + d[None, :], mask=ok[:, None], other=0.0)
        logits = tl.dot(k, tl.trans(q.to(k.dtype)), out_dtype=tl.float32) * scaling  # (BLOCK, GROUP_PAD)
        p = tl.sum(tl.exp(logits - lse[None, :]), axis=1)
        p = tl.where(ok, p, float("inf"))
        blk_val = tl.min(p, axis=0)
        blk_idx = tl.sum(tl.where(tl.arange(0, BLOCK) == tl.argmin(p, axis=0), slot, 0), axis=0)
        better = blk_val < best_val
        best_idx = tl.where(better, blk_idx, best_idx)
        best_val = tl.where(better, blk_val, best_val)
    tl.store(out_slot, best_idx.to(tl.int64))
    k_old = tl.load(k_base + old * sk_s + d)
    v_old = tl.load(v_base + old * sv_s + d)
    k_new = tl.load(k_base + newest * sk_s + d)
    v_new = tl.load(v_base + newest * sv_s + d)
    tl.debug_barrier()
    # When the ring's oldest entry is the one evicted, best_idx == old and the second store (the
    # same thread, the same address, later in program order) leaves the newest entry there.
    tl.store(k_base + best_idx * sk_s + d, k_old)
    tl.store(v_base + best_idx * sv_s + d, v_old)
    tl.store(k_base + old * sk_s + d, k_new)
    tl.store(v_base + old * sv_s + d, v_new)
    tl.store(ring_slot, (ptr + 1) % recent)


@triton.jit
def evict_one_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    lse_ptr,
    ring_ptr,
    out_ptr,
    start,
    ring0,
    newest,
    recent,
    scaling,
    kv_heads,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sk_s,
    sv_b,
    sv_h,
    sv_s,
    sl_b,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // kv_heads).to(tl.int64)  # row offsets of a large cache overflow int32
    h = pid % kv_heads
    evict_one_program(
        q_ptr + b * sq_b + (h * GROUP) * sq_h,
        sq_h,
        lse_ptr + b * sl_b + h * GROUP,
        k_ptr + b * sk_b + h * sk_h,
        sk_s,
        v_ptr + b * sv_b + h * sv_h,
        sv_s,
        ring_ptr + pid,
        out_ptr + pid,
        start,
        ring0,
        newest,
        recent,
        scaling,
        GROUP,
        GROUP_PAD,
        DIM,
        BLOCK,
    )


@triton.jit
def evict_one_batched_kernel(
    table_ptr,
    scaling,
    kv_heads,
    KV_DTYPE: tl.constexpr,
    FIELDS: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # program_id(1) picks a layer; its row of the table holds what evict_one_kernel takes as
    # arguments (addresses as int64, in the order of _TABLE_FIELDS).
    pid = tl.program_id(0)
    row = table_ptr + tl.program_id(1).to(tl.int64) * FIELDS
    q_ptr = tl.load(row + 0).to(tl.pointer_type(KV_DTYPE), bitcast=True)
    k_ptr = tl.load(row + 1).to(tl.pointer_type(KV_DTYPE), bitcast=True)
    v_ptr = tl.load(row + 2).to(tl.pointer_type(KV_DTYPE), bitcast=True)
    lse_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32), bitcast=True)
    ring_ptr = tl.load(row + 4).to(tl.pointer_type(tl.int32), bitcast=True)
    out_ptr = tl.load(row + 5).to(tl.pointer_type(tl.int64), bitcast=True)
    start = tl.load(row + 6)
    ring0 = tl.load(row + 7)
    newest = tl.load(row + 8)
    recent = tl.load(row + 9)
    b = (pid // kv_heads).to(tl.int64)
    h = pid % kv_heads
    sq_h = tl.load(row + 11)
    evict_one_program(
        q_ptr + b * tl.load(row + 10) + (h * GROUP) * sq_h,
        sq_h,
        lse_ptr + b * tl.load(row + 18) + h * GROUP,
        k_ptr + b * tl.load(row + 12) + h * tl.load(row + 13),
        tl.load(row + 14),
        v_ptr + b * tl.load(row + 15) + h * tl.load(row + 16),
        tl.load(row + 17),
        ring_ptr + pid,
        out_ptr + pid,
        start,
        ring0,
        newest,
        recent,
        scaling,
        GROUP,
        GROUP_PAD,
        DIM,
        BLOCK,
    )


@triton.jit
def split_kv_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    valid_ptr,
    m_ptr,
    l_ptr,
    acc_ptr,
    length,
    chunk,
    scaling,
    kv_heads,
    sq_b,
    sq_h,
    sk_b,
    sk_h,
    sk_s,
    sv_b,
    sv_h,
    sv_s,
    sm_b,
    sm_h,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DIM: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
    HAS_VALID: tl.constexpr,
):
    # Program (row * kv_heads + head, split): online softmax of the head's GROUP queries over the
    # keys [split * chunk, (split + 1) * chunk), masked by `valid`; partial max, sum and output.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // kv_heads
    h = pid % kv_heads
    d = tl.arange(0, DIM)
    g = tl.arange(0, GROUP_PAD)
    g_ok = g < GROUP
    q = tl.load(q_ptr + b * sq_b + (h * GROUP + g[:, None]) * sq_h + d[None, :], mask=g_ok[:, None], other=0.0)
    k_base = k_ptr + b * sk_b + h * sk_h
    v_base = v_ptr + b * sv_b + h * sv_h
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    lsum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM), tl.float32)
    for j0 in range(start, end, BLOCK):
        offs = j0 + tl.arange(0, BLOCK)
        ok = offs < end
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * sm_b + h * sm_h + offs, mask=ok, other=0) != 0)
        k = tl.load(k_base + offs[:, None] * sk_s + d[None, :], mask=ok[:, None], other=0.0)
        s = tl.dot(q.to(k.dtype), tl.trans(k), out_dtype=tl.float32) * scaling  # (GROUP_PAD, BLOCK)
        s = tl.where(ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        p = tl.exp(s - m_safe[:, None])
        lsum = lsum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs[:, None] * sv_s + d[None, :], mask=ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        m = m_new
    row = pid * SPLITS + split
    tl.store(m_ptr + row * GROUP_PAD + g, m)
    tl.store(l_ptr + row * GROUP_PAD + g, lsum)
    tl.store(acc_ptr + (row * GROUP_PAD + g[:, None]) * DIM + d[None, :], acc)


@triton.jit
def split_kv_combine_kernel(
    m_ptr,
    l_ptr,
    acc_ptr,
    out_ptr,
    lse_ptr,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    DIM: tl.constexpr,
    SPLITS: tl.constexpr,
):
    # Program (row * kv_heads + head): merge the splits' partial softmaxes.
    pid = tl.program_id(0)
    d = tl.arange(0, DIM)
    g = tl.arange(0, GROUP_PAD)
    m = tl.full((GROUP_PAD,), float("-inf"), tl.float32)
    lsum = tl.zeros((GROUP_PAD,), tl.float32)
    acc = tl.zeros((GROUP_PAD, DIM), tl.float32)
    for split in range(SPLITS):
        row = pid * SPLITS + split
        m_s = tl.load(m_ptr + row * GROUP_PAD + g)
        l_s = tl.load(l_ptr + row * GROUP_PAD + g)
        a_s = tl.load(acc_ptr + (row * GROUP_PAD + g[:, None]) * DIM + d[None, :])
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w_old = tl.exp(m - m_safe)
        w_new = tl.exp(m_s - m_safe)
        lsum = lsum * w_old + l_s * w_new
        acc = acc * w_old[:, None] + a_s * w_new[:, None]
        m = m_new
    out = acc / lsum[:, None]
    g_ok = g < GROUP
    tl.store(
        out_ptr + (pid * GROUP + g[:, None]) * DIM + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None]
    )
    tl.store(lse_ptr + pid * GROUP + g, m + tl.log(lsum), mask=g_ok)
