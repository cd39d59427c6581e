"""`ScopeCache`: a transformers `Cache` that keeps the prompt's KV and holds the generated
tokens' KV to a budget (SCOPE, Wu et al., ACL 2025).

Layout of one managed layer's storage, per batch row and KV head (never per query head)::

    slot:  0 ......... prefill_length ............. length ........ capacity
           [ prefill pool (pads first) | decoding pool | free (pre-allocated) ]

* ``seen``            logical tokens this layer has processed (what `get_seq_length` reports;
                      generate slices ``input_ids`` with it and positions derive from it);
* ``length``          physical slots held (what the attention mask is sized for);
* ``prefill_length``  the prefill/decoding boundary, recorded when a prefill forward runs.

Left padding stays at the front of the prefill pool and is never evicted, so column ``j`` of
the 2-D attention mask transformers builds describes slot ``j`` (we report mask sizes
``(length + q, 0)``; see DESIGN §3). Selection happens *after* the step's attention, from the
attention function in :mod:`scope_kv.attention`, so the step sees the pool before eviction.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .attention import enable_scope_attention
from .decoding import DecodingStrategy
from .kernels import EvictionBatch, candidate_scores, evict_one_, triton_available, unrotate_
from .prefill.base import PrefillCompressor
from .selection import attention_scores, compact_, keep_top_, leading_invalid, select_heavy, valid_keys

logger = logging.getLogger(__name__)

__all__ = ["ScopeCache", "ScopeLayer"]

# Unbounded (``decoding=None``) layers grow by this factor, so appends cost O(1) amortised while
# at most a quarter of the storage sits unused. Bounded strategies instead allocate
# ``prompt + max_held`` once at prefill: predictable memory, and no transient copy of the whole
# buffer while decoding (a budget larger than the output reserves slots never used).
_GROWTH = 1.25
_MIN_GROWTH = 128


class ScopeLayer(CacheLayerMixin):
    """One decoder layer's SCOPE cache: a prefill pool and a decoding pool in one buffer.

    Parameters
    ----------
    layer_idx : int
        Index of the decoder layer.
    decoding : DecodingStrategy or None
        Budget and selection timing for the decoding pool; ``None`` keeps every entry.
    module_ids : frozenset[int]
        ``id`` of every module of the model the cache was built for (to refuse another model).
    prefill : PrefillCompressor or None
        Compresses the prefill pool once, when prefill ends; ``None`` keeps the prompt whole.
    num_layers : int
        The model's number of decoder layers (per-layer prefill budgets depend on depth).

    Notes
    -----
    Padding and the mask. Until something in the prefill pool is evicted, pads stay at the
    front and transformers' 2-D mask describes the slots. Prefill compression and the unified
    baselines evict prompt entries, after which rows hold different numbers of leading invalid
    slots (pads, or filler that keeps the physical length one number for the batch). From then
    on (``own_mask``) the layer tracks ``start`` -- leading invalid slots per row, learned from
    the prefill's mask -- and the attention function uses :meth:`attention_mask_for` instead of
    the mask transformers built.
    """

    is_sliding = False
    is_compileable = False
    # `crop` cannot restore evicted entries, so stop-string rollback / assisted decoding stay off.
    is_croppable = False

    def __init__(
        self,
        layer_idx: int,
        decoding: DecodingStrategy | None,
        module_ids: frozenset[int],
        prefill: PrefillCompressor | None = None,
        num_layers: int = 1,
        evictions: EvictionBatch | None = None,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.decoding = decoding
        self.prefill = prefill
        self.num_layers = num_layers
        # Layers whose prompt entries get evicted must finish the prefill (compress, switch to their
        # own mask) before the first decoding step appends.
        self._evicts_prompt = prefill is not None or (decoding is not None and decoding.evicts_prompt)
        self._module_ids = module_ids
        # Decode fast path (scope_kv.kernels): None = on for CUDA tensors; True/False forces it.
        self.fast_decode: bool | None = None
        # Evict-one work shared by the cache's layers and done in one launch per step
        # (kernels.EvictionBatch); the cache sets `flush_evictions` on its last managed layer.
        # `batch_evictions`: None = on for CUDA tensors (with Triton), True forces it (on the CPU
        # only under TRITON_INTERPRET=1), False launches per layer.
        self._evictions = evictions
        self.flush_evictions = evictions is None
        self.batch_evictions: bool | None = None
        self._queued_at = -1  # the batch's flush count when this layer last queued work there
        self._clear()

    def _clear(self) -> None:
        self.keys = None  # (batch, kv_heads, capacity, dim)
        self.values = None
        self.is_initialized = False
        self.seen = 0
        self.length = 0
        self.prefill_length = 0
        self.step = 0  # decoding forwards completed since the last prefill: SCOPE's t
        self.skipped = 0  # discontinuous: eligible steps skipped since the last selection
        self.selections = 0  # selections run since the last prefill (for reports)
        self._decode_pending = False
        self._awaiting_attention = False
        self.start: torch.Tensor | None = None  # (batch,) leading invalid slots per row
        self.own_mask = False  # the layer supplies its attention mask (see class notes)
        self._prefill_open = False  # a prefill ran and its compression is still to do
        self._memo: dict[str, Any] = {}  # what the prefill compressor gathers while the prompt runs
        # Evict-one fast path (scope_kv.kernels): the `recent` ring's rotation, per (row, KV head),
        # and whether the decoding pool is out of arrival order.
        self._ring_ptr: torch.Tensor | None = None
        self._evicted: torch.Tensor | None = None  # the kernel's output slots, reused every step
        self._rotated = False

    # -- CacheLayerMixin ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the forward's new entries and return every held entry.

        Parameters
        ----------
        key_states, value_states : Tensor
            ``(batch, kv_heads, q, dim)`` new entries (RoPE already applied to keys).

        Returns
        -------
        (keys, values) : tuple[Tensor, Tensor]
            ``(batch, kv_heads, length, dim)`` views of the held slots, tagged so that the scope
            attention function can find this layer.
        """
        self._settle()
        if self._awaiting_attention:
            raise RuntimeError(
                f"layer {self.layer_idx}: the previous forward never reached scope_kv's attention function, so "
                "nothing could be selected. The model's attention must route through transformers' "
                "AttentionInterface with the implementation ScopeCache(model) set; build the cache with the "
                "model you generate with, and do not change its attn_implementation afterwards."
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._check_shapes(key_states, value_states)
        q = key_states.shape[-2]
        decode = self.length > 0 and q == 1
        if self._rotated and not decode:
            self._unrotate(self.length)  # a new turn: the pool joins the prefill pool in arrival order
        if decode and self._prefill_open:
            # Prefill is known to be over only now (chunked prefill looks like any prefill forward).
            # Compressing here, before this step's entry is appended, is safe although transformers
            # sized this forward's mask before any layer ran: from now on the layer attends with
            # its own mask (`own_mask`), never with that one.
            self.finish_prefill()
        if decode:
            self._reserve(self.length + 1)
        else:
            # A prefill forward (the first, a chunk, or a new turn's prompt). Whatever the previous
            # turn's decoding pool held joins the prefill pool, and the schedule starts afresh.
            headroom = 0 if self.decoding is None else self.decoding.max_held
            self._reserve(self.length + q + headroom)
        end = self.length + q
        self.keys[:, :, self.length : end].copy_(key_states)
        self.values[:, :, self.length : end].copy_(value_states)
        self.length = end
        self.seen += q
        if decode:
            self._decode_pending = True
        else:
            self.prefill_length = end
            self.step = 0
            self.skipped = 0
            self.selections = 0
            self._prefill_open = self._evicts_prompt
        self._awaiting_attention = True
        keys = self.keys[:, :, : self.length]
        values = self.values[:, :, : self.length]
        keys._scope_layer = self  # read by scope_kv.attention; a plain attribute on this view only
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Physical coordinates: mask column j is slot j (pads stay at the front).
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._settle()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "ScopeCache cannot be cropped: evicted entries cannot be restored. Assisted decoding and "
            "stop-string rollback need a croppable cache (DynamicCache)."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._settle()
        if self.length > 0:
            idx = beam_idx.to(self.device)
            self.keys = self.keys.index_select(0, idx)
            self.values = self.values.index_select(0, idx)
            self._map_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._settle()
        if self.is_initialized:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._settle()
        if self.is_initialized:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]
            self._map_batch(lambda t: t[indices, ...])

    def _map_batch(self, fn: Any) -> None:
        """Apply a batch re-indexing to every per-row tensor besides K/V (``start``, the memo)."""
        if self.start is not None:
            self.start = fn(self.start)
        if self._ring_ptr is not None:
            self._ring_ptr = fn(self._ring_ptr).contiguous()
        for name, item in list(self._memo.items()):
            if isinstance(item, torch.Tensor):
                self._memo[name] = fn(item)
            elif isinstance(item, list):
                self._memo[name] = [fn(t) if isinstance(t, torch.Tensor) else t for t in item]

    # -- selection ------------------------------------------------------------------------
    def after_attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
        lse: torch.Tensor | None = None,
    ) -> None:
        """Called by the scope attention function once the step's attention has run.

        Parameters
        ----------
        module : nn.Module
            The attention module (checked to belong to the model the cache was built for).
        query : Tensor
            ``(batch, q_heads, q, dim)`` the step's queries (post-RoPE).
        keys : Tensor
            ``(batch, kv_heads, length, dim)`` the keys the step attended to.
        attention_mask : Tensor or None
            The mask the step used.
        lse : Tensor, optional
            ``(batch, q_heads)`` float32 log-sum-exp of the step's attention (the grouped decode
            path returns it); candidates are then scored in O(budget) (DESIGN §4).
        """
        self._awaiting_attention = False
        if id(module) not in self._module_ids:
            raise ValueError(
                f"layer {self.layer_idx}: this ScopeCache was built for another model. Build one "
                "ScopeCache(model, ...) per model; a cache cannot move between models."
            )
        if not self._decode_pending:
            self._after_prefill_attention(module, query, keys, attention_mask, scaling, softcap)
            return
        self._decode_pending = False
        t = self.step
        self.step += 1
        if self.decoding is None:
            return
        if self.decoding.evicts_prompt:
            self._unified_select(query, keys, attention_mask, scaling, softcap, t)
            return
        recent = self.decoding.recent
        n_decoding = self.length - self.prefill_length
        select, self.skipped = self.decoding.plan(n_decoding, t, self.skipped)
        keep = self.decoding.budget_at(t) - recent
        n_candidates = n_decoding - recent
        evict_one = select and lse is not None and n_candidates - keep == 1
        if self._rotated and not evict_one:
            self._unrotate(self.length - 1)  # the ring layout holds only while each step evicts one
        if not select:
            return
        self.selections += 1
        if keep >= n_candidates:
            return  # the pool is exactly at budget: nothing to evict
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if evict_one:
            # Slide / Adaptive at budget: one fused launch scores the candidates, evicts the weakest
            # and moves two entries (layout in scope_kv.kernels); no host sync, static shapes.
            if self._ring_ptr is None or self._ring_ptr.shape != self.keys.shape[:2]:
                self._ring_ptr = torch.zeros(self.keys.shape[:2], dtype=torch.int32, device=self.keys.device)
            if self._evicted is None or self._evicted.shape != self._ring_ptr.shape:
                self._evicted = torch.empty(self.keys.shape[:2], dtype=torch.long, device=self.keys.device)
            end, start = self.length, self.prefill_length
            self.length -= 1
            self._rotated = True
            # Eager decoding at small batches is bound by the host's launches: queue the work and
            # let one launch after the last layer do every layer's (kernels.EvictionBatch).
            if self._batched() and self._evictions.add(query, self.keys, self.values, lse, self._ring_ptr,
                                                       self._evicted, start, end, recent, scale):
                self._queued_at = self._evictions.flushes
                if self.flush_evictions:
                    self._evictions.flush()
                return
            evict_one_(query, self.keys, self.values, lse, self._ring_ptr, start, end, recent, scale, out=self._evicted)
            return
        if lse is not None:
            start = self.prefill_length
            scores = candidate_scores(query, self.keys[:, :, start : start + n_candidates], lse, scale)
            heavy = select_heavy(scores, keep)
            self.length = compact_(self.keys, self.values, start, self.length, heavy, recent)
            return
        valid = valid_keys(attention_mask, keys.shape[0], keys.shape[-2], keys.device)
        scores = attention_scores(query, keys, valid, scale, softcap)
        candidates = scores[:, :, self.prefill_length : self.prefill_length + n_candidates]
        heavy = select_heavy(candidates, keep)
        self.length = compact_(self.keys, self.values, self.prefill_length, self.length, heavy, recent)

    def _settle(self) -> None:
        """Run this layer's eviction if it is still queued (a forward that stopped before the
        last layer) before the layer's storage is read, written or re-indexed."""
        batch = self._evictions
        if batch is not None and self._queued_at == batch.flushes and len(batch):
            batch.flush()

    def _batched(self) -> bool:
        want = self.batch_evictions if self.batch_evictions is not None else self.keys.is_cuda
        return (
            want
            and self._evictions is not None
            and triton_available()
            and not (self.keys.is_cuda and torch.cuda.is_current_stream_capturing())
        )

    def _unrotate(self, ring_end: int) -> None:
        """Back to arrival order (the reference layout) after evict-one steps; O(recent).

        Its callers run after :meth:`update` has settled this layer's queued eviction."""
        if self._rotated:
            unrotate_(self.keys, self.values, self._ring_ptr, ring_end, self.decoding.recent)
            self._rotated = False

    def _after_prefill_attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
    ) -> None:
        """A prefill forward attended: learn the pads, let the prefill compressor observe."""
        if not self._evicts_prompt:
            return
        batch, length = keys.shape[0], keys.shape[-2]
        if not self.own_mask:
            # Pads are the leading slots the prompt's last query may not see. Relearned at every
            # chunk: a chunk of nothing but pads shows the whole row invalid until the next one.
            valid = valid_keys(attention_mask, batch, length, keys.device)
            self.start = leading_invalid(valid, batch, keys.device)
        if self.prefill is not None:
            scale = scaling if scaling is not None else query.shape[-1] ** -0.5
            self._memo["module"] = module
            self.prefill.observe(self._memo, module, query, keys, self.start, scale, softcap)

    def capture_input(self, hidden_states: torch.Tensor, position_embeddings: Any) -> None:
        """Keep a prefill forward's attention input for compressors that score from it.

        Parameters
        ----------
        hidden_states : Tensor
            ``(batch, q, hidden)`` the attention module's input.
        position_embeddings : tuple of Tensor or None
            ``(cos, sin)``, each ``(batch, q, rotary_dim)``, as the model passes them.
        """
        if self.prefill is None or not self.prefill.needs_hidden_states:
            return
        if self.length > 0 and hidden_states.shape[1] == 1:
            return  # a decoding step
        self._memo.setdefault("hidden_states", []).append(hidden_states.detach())
        if position_embeddings is not None:
            self._memo.setdefault("position_embeddings", []).append(tuple(p.detach() for p in position_embeddings))

    def finish_prefill(self) -> None:
        """Compress the prefill pool now and switch to the layer's own mask (idempotent).

        Runs by itself at the first decoding step; call it (through
        :meth:`ScopeCache.finish_prefill`) to inspect the compressed cache before decoding.
        """
        if not self._prefill_open:
            return  # (an open prefill means no decode step, so no queued eviction, since it ran)
        self._prefill_open = False
        memo, self._memo = self._memo, {}
        prompt = self.prefill_length
        if self.start is None:
            self.start = torch.zeros(self.keys.shape[0], dtype=torch.long, device=self.keys.device)
        if self.prefill is not None and self.length == prompt:
            real = prompt - self.start
            counts = self.prefill.keep_counts(real, self.layer_idx, self.num_layers, memo.get("module")).clamp(min=0)
            counts = torch.minimum(counts, real)
            if bool((counts < real).any()):
                keys, values = self.keys[:, :, :prompt], self.values[:, :, :prompt]
                scores = self.prefill.scores(memo, keys, values, self.start)
                self.length, self.start = keep_top_(self.keys, self.values, prompt, scores, counts, self.start)
                self.prefill_length = self.length
                self._shrink()
        self.own_mask = True

    def _unified_select(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None,
        softcap: float | None,
        t: int,
    ) -> None:
        """Unified baselines: one budget over every held entry, prompt included (SCOPE_SPEC §4)."""
        start = self.start if self.start is not None else torch.zeros_like(self.keys[:, 0, 0, 0], dtype=torch.long)
        held = self.length - start  # (batch,) valid entries per row
        select, self.skipped = self.decoding.plan(int(held.max()), t, self.skipped)
        if not select:
            return
        counts = held.clamp(max=self.decoding.budget_at(t))
        if bool((counts == held).all()):
            return
        self.selections += 1
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        valid = valid_keys(attention_mask, keys.shape[0], keys.shape[-2], keys.device)
        scores = self.decoding.prompt_scores(query, keys, valid, scale, softcap).clone()
        scores[..., self.length - self.decoding.recent :] = float("inf")  # the newest r stay
        self.length, self.start = keep_top_(self.keys, self.values, self.length, scores, counts, start)
        # Prompt and generated entries now share one pool: no boundary is left to record.
        self.prefill_length = 0
        self._shrink()  # the first eviction frees most of a long prompt's storage (copies once)

    def attention_mask_for(self, backend: str, q_len: int, dtype: torch.dtype) -> torch.Tensor | None:
        """The mask for this layer's held slots, in ``backend``'s format.

        Query ``i`` of the forward (slot ``length - q_len + i``) may see slot ``j`` when
        ``start[b] <= j <= length - q_len + i``.

        Parameters
        ----------
        backend : str
            ``"sdpa"`` (boolean ``(batch, 1, q, length)``, True = attend), ``"eager"`` (additive
            float ``(batch, 1, q, length)`` of ``dtype``, ``finfo.min`` = blocked) or a flash
            backend (2-D ``(batch, length)`` padding mask, causality left to the kernel; ``None``
            when nothing is invalid).
        q_len : int
            Queries in this forward.
        dtype : torch.dtype
            The query dtype (eager's additive mask).
        """
        length = self.length
        device = self.keys.device
        start = self.start if self.start is not None else torch.zeros(self.keys.shape[0], dtype=torch.long, device=device)
        slots = torch.arange(length, device=device)
        valid = slots[None, :] >= start[:, None]  # (batch, length)
        if backend.startswith("flash"):
            return None if bool(valid.all()) else valid.to(torch.int32)
        causal = slots[None, :] <= (length - q_len + torch.arange(q_len, device=device))[:, None]  # (q, length)
        allowed = (valid[:, None, :] & causal[None])[:, None]  # (batch, 1, q, length)
        if backend == "eager":
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
            return mask.masked_fill(~allowed, torch.finfo(dtype).min)
        return allowed

    # -- helpers --------------------------------------------------------------------------
    def _shrink(self) -> None:
        """Give back the storage prefill compression freed (one copy, once per prompt)."""
        if self.decoding is None:
            needed = self.length + _MIN_GROWTH
        elif self.decoding.evicts_prompt:
            needed = max(self.length, self.decoding.max_held)  # one budget over every entry
        else:
            needed = self.prefill_length + self.decoding.max_held
        if self.capacity <= needed:
            return
        shape = (*self.keys.shape[:2], needed, self.keys.shape[-1])
        keys = self.keys.new_empty(shape)
        values = self.values.new_empty(shape)
        keys[:, :, : self.length].copy_(self.keys[:, :, : self.length])
        values[:, :, : self.length].copy_(self.values[:, :, : self.length])
        self.keys, self.values = keys, values

    def _check_shapes(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        expected = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[-1])
        got = (key_states.shape[0], key_states.shape[1], key_states.shape[-1])
        if self.length > 0 and got != expected:
            raise ValueError(
                f"layer {self.layer_idx}: got key states (batch, kv_heads, dim) = {got} but this cache holds "
                f"{expected}. A ScopeCache belongs to one model and one batch: build a new one (or call "
                "cache.reset()) for another model or batch."
            )

    def _reserve(self, needed: int) -> None:
        """Make room for ``needed`` slots; copies only when the buffer must grow."""
        if needed <= self.capacity:
            return
        if self.decoding is None:
            needed = max(needed, math.ceil(self.capacity * _GROWTH), self.capacity + _MIN_GROWTH)
        shape = (*self.keys.shape[:2], needed, self.keys.shape[-1])
        keys = self.keys.new_empty(shape)
        values = self.values.new_empty(shape)
        keys[:, :, : self.length].copy_(self.keys[:, :, : self.length])
        values[:, :, : self.length].copy_(self.values[:, :, : self.length])
        self.keys, self.values = keys, values

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated by this layer."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def summary(self) -> dict[str, int]:
        return {
            "layer": self.layer_idx,
            "seen": self.seen,
            "held": self.length,
            "prefill": self.prefill_length,
            "decoding": self.length - self.prefill_length,
            "capacity": self.capacity,
            "step": self.step,
            "selections": self.selections,
            "compressed": self.own_mask,
            "bytes": self.nbytes(),
        }


class ScopeCache(Cache):
    """KV cache implementing SCOPE's decoding-phase compression for any transformers decoder.

    Parameters
    ----------
    model : PreTrainedModel
        The model this cache will be used with. Its attention is switched (idempotently) to
        scope_kv's attention function, which passes through unchanged for any other cache.
    decoding : DecodingStrategy or None
        :class:`~scope_kv.Slide`, :class:`~scope_kv.Adaptive` or :class:`~scope_kv.Discontinuous`;
        a unified baseline (:class:`~scope_kv.UnifiedH2O`, :class:`~scope_kv.UnifiedStreamingLLM`),
        whose one budget covers prompt and generated entries; or ``None`` to keep every
        generated entry.
    prefill : PrefillCompressor or None
        Compresses each layer's prompt entries once, when prefill ends (:class:`~scope_kv.SnapKV`,
        :class:`~scope_kv.PyramidKV`, :class:`~scope_kv.H2O`, :class:`~scope_kv.StreamingLLM`, or an
        adapter such as ``scope_kv.integrations.kvpress.KVPressPrefill``); ``None`` keeps the
        prompt whole.

    Notes
    -----
    Full-attention layers are managed; sliding-window layers (Gemma 3 style) stay transformers'
    own layers, which already bound them. On a new ``generate`` call with the same cache
    (multi-turn), the new turn's prompt tokens and what the previous turn's decoding pool held
    both join the prefill pool; the decoding schedule (step, skip counter) starts afresh.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        decoding: DecodingStrategy | None = None,
        prefill: PrefillCompressor | None = None,
    ):
        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                f"ScopeCache(model, ...) takes the transformers model itself, got {type(model).__name__}."
            )
        if decoding is not None and not isinstance(decoding, DecodingStrategy):
            raise TypeError(
                f"decoding must be Slide(...), Adaptive(...), Discontinuous(...), UnifiedH2O(...), "
                f"UnifiedStreamingLLM(...) or None, got {decoding!r}."
            )
        if prefill is not None and not isinstance(prefill, PrefillCompressor):
            raise TypeError(
                f"prefill must be SnapKV(...), PyramidKV(...), H2O(...), StreamingLLM(...), a "
                f"KVPressPrefill(press) adapter or None, got {prefill!r}."
            )
        config = model.config.get_text_config(decoder=True)
        template = DynamicCache(config=config)
        module_ids = frozenset(id(m) for m in model.modules())
        self._evictions = EvictionBatch()
        layers: list[Any] = []
        for idx, layer in enumerate(template.layers):
            if isinstance(layer, DynamicSlidingWindowLayer):
                layers.append(layer)  # bounded by its window already; transformers' own layer
            elif type(layer) is DynamicLayer:
                layers.append(ScopeLayer(idx, decoding, module_ids, prefill, len(template.layers), self._evictions))
            elif not isinstance(layer, CacheLayerMixin) and type(layer).__name__ == "DummyLayer":
                layers.append(layer)
            else:
                raise ValueError(
                    f"layer {idx} of {type(model).__name__} needs a {type(layer).__name__}; scope_kv manages "
                    "plain attention KV caches only (full or sliding-window attention)."
                )
        if not any(isinstance(layer, ScopeLayer) for layer in layers):
            window = getattr(config, "sliding_window", None)
            raise ValueError(
                f"every attention layer of {type(model).__name__} is a sliding-window layer (sliding_window={window}), "
                "so there is nothing for ScopeCache to compress. If your prompts plus outputs stay within the "
                "window, or the checkpoint was trained without one (e.g. Mistral-7B v0.2+), set "
                "`model.config.sliding_window = None` before building the cache."
            )
        scope_layers = [layer for layer in layers if isinstance(layer, ScopeLayer)]
        scope_layers[-1].flush_evictions = True  # a forward runs the layers in order: flush after the last
        super().__init__(layers=layers)
        self.decoding = decoding
        self.prefill = prefill
        self.attn_implementation = enable_scope_attention(model)
        if prefill is not None and prefill.needs_hidden_states:
            _install_input_capture(model)

    def finish_prefill(self) -> None:
        """Compress every layer's prompt entries now, instead of at the first decoding step.

        For inspection (e.g. measuring what a prefill compressor keeps); generation does not
        need it. Without a prefill compressor or unified baseline this only switches layers to
        their own masks.
        """
        for layer in self.layers:
            if isinstance(layer, ScopeLayer):
                layer.finish_prefill()

    # -- lengths --------------------------------------------------------------------------
    def get_query_offset(self, layer_idx: int = 0) -> int:
        layer = self.layers[layer_idx]
        if isinstance(layer, ScopeLayer):
            return layer.length  # physical: the mask describes held slots
        return super().get_query_offset(layer_idx)

    def kv_length(self, layer_idx: int) -> int:
        """Entries physically held by layer ``layer_idx`` (per batch row and KV head; pad slots included)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, ScopeLayer):
            return layer.length
        keys = getattr(layer, "keys", None)
        return 0 if keys is None or keys.numel() == 0 else keys.shape[-2]

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated now, over every layer (what the cache costs in memory)."""
        total = 0
        for layer in self.layers:
            if isinstance(layer, ScopeLayer):
                total += layer.nbytes()
            else:
                for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                    if isinstance(t, torch.Tensor):
                        total += t.nbytes
        return total

    def summary(self) -> list[dict[str, Any]]:
        """Per-layer state: tokens seen, entries held (prefill / decoding), capacity, bytes."""
        rows = []
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, ScopeLayer):
                rows.append(layer.summary())
            else:
                rows.append({"layer": idx, "kind": type(layer).__name__, "held": self.kv_length(idx)})
        return rows

    def __repr__(self) -> str:
        managed = sum(isinstance(layer, ScopeLayer) for layer in self.layers)
        return (
            f"ScopeCache(decoding={self.decoding!r}, prefill={self.prefill!r}, layers={len(self.layers)}, "
            f"managed={managed})"
        )


_CAPTURE_HANDLE = "_scope_kv_input_capture"


def _capture_attention_input(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: hand a prefill forward's attention input to the module's ScopeLayer.

    Stateless: the cache is read from the call's own ``past_key_values``, so the hook does
    nothing for any other cache and keeps no reference to any ScopeCache.
    """
    cache = kwargs.get("past_key_values")
    if not isinstance(cache, ScopeCache):
        return
    layer = cache.layers[module.layer_idx]
    if not isinstance(layer, ScopeLayer):
        return
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if hidden_states is not None:
        layer.capture_input(hidden_states, kwargs.get("position_embeddings"))


def _install_input_capture(model: PreTrainedModel) -> None:
    """Register :func:`_capture_attention_input` once on each attention module (idempotent).

    Attention modules are found without per-architecture code: the innermost modules that
    carry a ``layer_idx`` (decoder layers may carry one too, and contain the attention).
    """
    indexed = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None]
    inner = [m for m in indexed if not any(c is not m and getattr(c, "layer_idx", None) is not None for c in m.modules())]
    for module in inner:
        if getattr(module, _CAPTURE_HANDLE, None) is None:
            handle = module.register_forward_pre_hook(_capture_attention_input, with_kwargs=True)
            setattr(module, _CAPTURE_HANDLE, handle)
