"""The evict-one system: one entry out of a full decoding pool per step, in place (docs/method.md §3).

Slide and Adaptive, once at budget, evict exactly one entry per step (the pool grows by one and
the budget never shrinks). One kernel per layer scores the candidates, takes the arg-min and moves
two entries, keeping the pool's order up to a rotation of the recent window (:class:`EvictRing`);
in eager decoding the layers' evictions are queued and done by one launch per step
(:class:`EvictionBatch`), since there the host's launches, not the GPU, set the pace. The
plain-torch reference (:func:`evict_one_reference_`) is what runs on the CPU.
"""

from __future__ import annotations

import collections
import functools
from typing import Any

import torch

from ._device import host_to_device, on_device, triton_available
from .decode_attention import candidate_scores

# -- evict one ----------------------------------------------------------------------------
# Layout of one (batch row, KV head)'s decoding pool when a step evicts one entry (docs/method.md §3:
# the newest `recent` entries are kept, every older decoding entry is a candidate)::
#
#     start ............ ring0 ............... ring0 + recent = end - 1    end - 1
#     [ older entries,    | ring: the `recent` entries   |                  [ newest ]
#       any order ]       |  before the newest, rotated: |
#                         |  oldest at ring0 + ptr       |
#
# The ring's oldest entry leaves the recent window at this step, so the candidates are the
# older entries plus that one. The lowest-scoring candidate's slot takes the ring's oldest
# entry (unless that entry is the one evicted), the newest entry moves into the ring's freed
# slot, and ``ptr`` advances: two entries move, whatever the budget (a shift of the pool
# would move ~recent + budget/2 of them, ~9% of a batch-32 step's bytes at B=512). ``ptr``
# is the same for every (row, head) -- one eviction each per step -- but is kept per
# (row, head) on the device so that a captured CUDA graph advances it on every replay.
# With ``ptr == 0`` the pool is in arrival order, the layout the reference path keeps.


def evict_one_reference_(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lse: torch.Tensor,
    ring_ptr: torch.Tensor,
    start: int,
    end: int,
    recent: int,
    scaling: float,
) -> torch.Tensor:
    """Evict the lowest-scoring candidate of each ``(batch, kv_head)`` in place (plain torch).

    Parameters
    ----------
    query : Tensor
        ``(batch, q_heads, 1, dim)``.
    keys, values : Tensor
        ``(batch, kv_heads, capacity, dim)`` storage; slots ``[start, end)`` are the decoding
        pool, its newest entry at ``end - 1`` (layout above).
    lse : Tensor
        ``(batch, q_heads)`` float32 log-sum-exp of the step's attention.
    ring_ptr : Tensor
        ``(batch, kv_heads)`` int32 rotation of the ring ``[end - 1 - recent, end - 1)``;
        advanced in place.
    start, end, recent : int
        ``start <= end - 1 - recent``.
    scaling : float
        Softmax scale.

    Returns
    -------
    Tensor
        ``(batch, kv_heads)`` int64 slot of the evicted entry. Afterwards ``[start, end - 1)``
        holds the kept entries (layout above, ``ptr`` advanced by one).
    """
    ring0 = end - 1 - recent
    old = (ring0 + ring_ptr.long())[..., None]  # (batch, kv_heads, 1) slot leaving the window
    dim = keys.shape[-1]
    old_keys = torch.gather(keys, 2, old[..., None].expand(-1, -1, -1, dim))
    scores = torch.cat(
        [
            candidate_scores(query, keys[:, :, start:ring0], lse, scaling),
            candidate_scores(query, old_keys, lse, scaling),
        ],
        dim=-1,
    )
    pick = scores.argmin(dim=-1, keepdim=True)  # first minimum, like the Triton kernel
    evicted = torch.where(pick == ring0 - start, old, start + pick)
    for store in (keys, values):
        old_row = torch.gather(store, 2, old[..., None].expand(-1, -1, -1, dim))
        newest = store[:, :, end - 1 : end].clone()
        store.scatter_(2, evicted[..., None].expand(-1, -1, -1, dim), old_row)
        store.scatter_(2, old[..., None].expand(-1, -1, -1, dim), newest)
    ring_ptr.add_(1).remainder_(recent)
    return evicted[..., 0]


def unrotate_(keys: torch.Tensor, values: torch.Tensor, ring_ptr: torch.Tensor, ring_end: int, recent: int) -> None:
    """Put the ring ``[ring_end - recent, ring_end)`` back in arrival order and zero ``ring_ptr``.

    Parameters
    ----------
    keys, values : Tensor
        ``(batch, kv_heads, capacity, dim)`` storage.
    ring_ptr : Tensor
        ``(batch, kv_heads)`` int32 rotation (see the layout above).
    ring_end, recent : int
        The ring's end slot and length.
    """
    ring0 = ring_end - recent
    order = (torch.arange(recent, device=keys.device) + ring_ptr.long()[..., None]) % recent
    for store in (keys, values):
        ring = store[:, :, ring0:ring_end]
        ring.copy_(torch.gather(ring, 2, order[..., None].expand(-1, -1, -1, store.shape[-1])))
    ring_ptr.zero_()


@functools.cache
def _evict_one_kernels() -> tuple[Any, Any]:
    """(one layer's kernel, the batched kernel over several layers), imported on first use."""
    from .. import _triton_kernels

    return _triton_kernels.evict_one_kernel, _triton_kernels.evict_one_batched_kernel


_TABLE_FIELDS = (
    "q",
    "k",
    "v",
    "lse",
    "ring",
    "out",
    "start",
    "ring0",
    "newest",
    "recent",
    "sq_b",
    "sq_h",
    "sk_b",
    "sk_h",
    "sk_s",
    "sv_b",
    "sv_h",
    "sv_s",
    "sl_b",
)


def _triton_ok(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ring_ptr: torch.Tensor) -> bool:
    dim = query.shape[-1]
    return (
        keys.stride(-1) == 1
        and values.stride(-1) == 1
        and query.stride(-1) == 1
        and not dim & (dim - 1)
        and dim >= 16
        and ring_ptr.is_contiguous()
        and keys.dtype == values.dtype == query.dtype
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def evict_one_(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lse: torch.Tensor,
    ring_ptr: torch.Tensor,
    start: int,
    end: int,
    recent: int,
    scaling: float,
    use_triton: bool | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused :func:`evict_one_reference_` (one Triton launch); same arguments and result.

    ``use_triton=None`` picks Triton for CUDA tensors when it is installed, else the
    reference; ``True`` forces it (on the CPU only under ``TRITON_INTERPRET=1``). ``out``, a
    contiguous ``(batch, kv_heads)`` int64 tensor, receives the evicted slots (a decode loop
    passes the same one every step: one allocation less per layer and step).
    """
    if use_triton is None:
        use_triton = keys.is_cuda and triton_available()
    if not use_triton or not _triton_ok(query, keys, values, ring_ptr):
        return evict_one_reference_(query, keys, values, lse, ring_ptr, start, end, recent, scaling)
    import triton

    batch, q_heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    lse = lse.float().contiguous()
    if out is None or out.shape != (batch, kv_heads) or out.dtype != torch.long or not out.is_contiguous():
        out = torch.empty((batch, kv_heads), dtype=torch.long, device=keys.device)
    with on_device(keys):
        _evict_one_kernels()[0][(batch * kv_heads,)](
            query,
            keys,
            values,
            lse,
            ring_ptr,
            out,
            start,
            end - 1 - recent,
            end - 1,
            recent,
            float(scaling),
            kv_heads,
            query.stride(0),
            query.stride(1),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            lse.stride(0),
            GROUP=group,
            GROUP_PAD=max(16, triton.next_power_of_2(group)),
            DIM=dim,
            BLOCK=64,
        )
    return out


class EvictionBatch:
    """Evict-one work of several layers, done by one kernel launch per step.

    In an eager decode step the host, not the GPU, sets the pace at small batches, and one
    Triton launch per layer is most of what selection costs there (benchmarks/NOTES.md). A
    layer's eviction only has to happen before that layer's *next* append, so layers
    :meth:`add` their work as they finish attention and :meth:`flush` runs it all at once --
    one launch over a table of per-layer addresses and sizes (``_TABLE_FIELDS``) per group of
    layers sharing device, dtype and shapes. The owner flushes after its last layer, and
    before any layer that still has work here touches its storage again.

    Not used while a CUDA graph is being captured (the table would be captured by address):
    there each layer launches :func:`evict_one_` itself.
    """

    def __init__(self) -> None:
        self._work: list[tuple] = []
        self.flushes = 0  # flushes so far: a layer that queued at count n is done once it moved on
        # batched launches so far, by how many layers each covered ({layers: launches}; bounded)
        self.launches: collections.Counter[int] = collections.Counter()

    def __len__(self) -> int:
        return len(self._work)

    def add(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        lse: torch.Tensor,
        ring_ptr: torch.Tensor,
        out: torch.Tensor,
        start: int,
        end: int,
        recent: int,
        scaling: float,
    ) -> bool:
        """Queue one layer's :func:`evict_one_` (same arguments; ``out`` required). Returns False,
        queueing nothing, when the Triton kernel cannot take these tensors (the caller then runs
        :func:`evict_one_`, which falls back to the reference)."""
        if not _triton_ok(query, keys, values, ring_ptr) or out.shape != keys.shape[:2] or not out.is_contiguous():
            return False
        lse = lse.float().contiguous()  # kept alive here until the launch
        self._work.append((query, keys, values, lse, ring_ptr, out, start, end, recent, float(scaling)))
        return True

    def flush(self) -> None:
        """Run every queued eviction (one launch per group of alike layers)."""
        if not self._work:
            return
        work, self._work = self._work, []
        self.flushes += 1
        groups: dict[tuple, list[tuple]] = {}
        for item in work:
            query, keys = item[0], item[1]
            key = (keys.device, keys.dtype, tuple(query.shape), tuple(keys.shape[:2]), keys.shape[-1], item[9])
            groups.setdefault(key, []).append(item)
        for (device, dtype, q_shape, _, dim, scaling), items in groups.items():
            if len(items) == 1:
                query, keys, values, lse, ring, out, start, end, recent, _ = items[0]
                evict_one_(query, keys, values, lse, ring, start, end, recent, scaling, use_triton=True, out=out)
                continue
            self._launch(items, device, dtype, q_shape, dim, scaling)
            self.launches[len(items)] += 1

    @staticmethod
    def _launch(
        items: list[tuple], device: torch.device, dtype: torch.dtype, q_shape: tuple, dim: int, scaling: float
    ) -> None:
        import triton
        import triton.language as tl

        rows = []
        for query, keys, values, lse, ring, out, start, end, recent, _ in items:
            rows.append(
                (
                    query.data_ptr(),
                    keys.data_ptr(),
                    values.data_ptr(),
                    lse.data_ptr(),
                    ring.data_ptr(),
                    out.data_ptr(),
                    start,
                    end - 1 - recent,
                    end - 1,
                    recent,
                    query.stride(0),
                    query.stride(1),
                    keys.stride(0),
                    keys.stride(1),
                    keys.stride(2),
                    values.stride(0),
                    values.stride(1),
                    values.stride(2),
                    lse.stride(0),
                )
            )
        table = host_to_device(rows, torch.long, device)
        batch, q_heads = q_shape[0], q_shape[1]
        kv_heads = items[0][1].shape[1]
        group = q_heads // kv_heads
        kv_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]
        with on_device(items[0][1]):
            _evict_one_kernels()[1][(batch * kv_heads, len(items))](
                table,
                scaling,
                kv_heads,
                KV_DTYPE=kv_dtype,
                FIELDS=len(_TABLE_FIELDS),
                GROUP=group,
                GROUP_PAD=max(16, triton.next_power_of_2(group)),
                DIM=dim,
                BLOCK=64,
            )


class EvictRing:
    """One layer's evict-one state: the ``recent`` ring's rotation (layout above), the kernel's
    output buffer, and whether the layer's eviction still waits in a shared :class:`EvictionBatch`.

    Parameters
    ----------
    batch : EvictionBatch or None
        Where eager decode steps queue their evictions (``None``: launch per layer).

    Attributes
    ----------
    ptr : Tensor or None
        ``(batch, kv_heads)`` int32 ring rotation, advanced on the device by every eviction.
    evicted : Tensor or None
        ``(batch, kv_heads)`` int64 slot evicted by the last step (reused every step).
    rotated : bool
        Whether the pool is out of arrival order (``ptr`` may be non-zero).
    flush_after : bool
        Whether this layer flushes the shared batch after queueing (the cache's last layer).
    """

    def __init__(self, batch: EvictionBatch | None = None) -> None:
        self.batch = batch
        self.flush_after = batch is None
        self.reset()

    def reset(self) -> None:
        self.ptr: torch.Tensor | None = None
        self.evicted: torch.Tensor | None = None
        self.rotated = False
        self.recent = 0  # the ring's length, set by the evictions that rotate it
        self._queued_at = -1  # the batch's flush count when this layer last queued work there

    def settle(self) -> None:
        """Run this layer's eviction if it is still queued (a forward that stopped before the
        last layer), before the layer's storage is read, written or re-indexed."""
        if self.batch is not None and self._queued_at == self.batch.flushes and len(self.batch):
            self.batch.flush()

    def evict(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        lse: torch.Tensor,
        start: int,
        end: int,
        recent: int,
        scaling: float,
        batched: bool | None = None,
    ) -> None:
        """Evict one entry of the pool ``[start, end)`` per ``(row, KV head)`` (:func:`evict_one_`).

        ``batched`` queues the work in the shared :class:`EvictionBatch`: one launch per step for
        every layer, since eager decoding is bound by the host's launches (``None``: for CUDA
        tensors; ``True`` works on the CPU only under ``TRITON_INTERPRET=1``). Never while a CUDA
        graph is being captured (the batch's address table would be captured). Otherwise, or
        when the kernel cannot take these tensors, the eviction runs now.
        """
        want = batched if batched is not None else keys.is_cuda
        capturing = keys.is_cuda and torch.cuda.is_current_stream_capturing()
        queue = self.batch if want and triton_available() and not capturing else None
        shape = keys.shape[:2]
        if self.ptr is None or self.ptr.shape != shape:
            self.ptr = torch.zeros(shape, dtype=torch.int32, device=keys.device)
        if self.evicted is None or self.evicted.shape != shape:
            self.evicted = torch.empty(shape, dtype=torch.long, device=keys.device)
        self.rotated = True
        self.recent = recent
        if queue is not None and queue.add(
            query, keys, values, lse, self.ptr, self.evicted, start, end, recent, scaling
        ):
            self._queued_at = queue.flushes
            if self.flush_after:
                queue.flush()
            return
        evict_one_(query, keys, values, lse, self.ptr, start, end, recent, scaling, out=self.evicted)

    def unrotate(self, keys: torch.Tensor, values: torch.Tensor, ring_end: int) -> None:
        """Back to arrival order (the reference layout), O(recent); a no-op unless rotated."""
        if self.rotated:
            assert self.ptr is not None
            unrotate_(keys, values, self.ptr, ring_end, self.recent)
            self.rotated = False

    def map_batch(self, fn: Any) -> None:
        """Apply a batch re-indexing (beam search, ``num_return_sequences``) to the ring state."""
        if self.ptr is not None:
            self.ptr = fn(self.ptr).contiguous()
        self.evicted = None
