"""`ScopeLayer`: one decoder layer's SCOPE cache -- a prefill pool and a decoding pool in one buffer.

Layout of one managed layer's storage, per batch row and KV head (never per query head)::

    slot:  0 ......... prefill_length ............. length ........ capacity
           [ prefill pool (pads first) | decoding pool | free (pre-allocated) ]

* ``seen``            logical tokens this layer has processed (what `get_seq_length` reports;
                      generate slices ``input_ids`` with it and positions derive from it);
* ``length``          physical slots held (what the attention mask is sized for);
* ``prefill_length``  the prefill/decoding boundary, recorded when a prefill forward runs.

Left padding stays at the front of the prefill pool and is never evicted, so column ``j`` of
the 2-D attention mask transformers builds describes slot ``j`` (mask sizes ``(length + q,
0)``; docs/method.md §8). Selection happens *after* the step's attention: the scope attention
function (:mod:`scope_kv.attention`) hands the layer an :class:`~scope_kv.step.AttentionStep`
and :meth:`ScopeLayer.after_attention` runs the decode step's stages -- plan (does this step
cut, and how much: a :class:`~scope_kv.selection.Plan`), score (the strategy's
:meth:`~scope_kv.DecodingStrategy.score`), choose (one rule, :meth:`~scope_kv.selection.Plan.choose`)
and apply (compact in place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from .decoding import DecodingStrategy
from .kernels import EvictionBatch, EvictRing, host_to_device
from .masks import RowValidity, layer_mask, valid_slots
from .positions import PositionGuard
from .prefill.base import PrefillCompressor, PrefillMemo
from .selection import Plan, compact_, compact_kept_, keep_top_, kept_slots
from .step import AttentionStep, DecodeAttention
from .storage import MIN_GROWTH, check_new_entries, grown_capacity, hand_out, resized, unseen_attention
from .window import QueryWindow

__all__ = ["ScopeLayer"]


class ScopeLayer(CacheLayerMixin):
    """One decoder layer's SCOPE cache.

    Parameters
    ----------
    layer_idx : int
        Index of the decoder layer.
    decoding : DecodingStrategy or None
        Budget, schedule and scoring of the decoding pool; ``None`` keeps every entry.
    module_ids : frozenset[int]
        ``id`` of every module of the model the cache was built for (to refuse another model).
    prefill : PrefillCompressor or None
        Compresses the prefill pool once, when prefill ends; ``None`` keeps the prompt whole.
    num_layers : int
        The model's number of decoder layers (per-layer prefill budgets depend on depth).
    evictions : EvictionBatch or None
        Evict-one work shared by the cache's layers and done in one launch per step.

    Attributes
    ----------
    fast_decode : bool or None
        The grouped decode attention with log-sum-exp scores: ``None`` = on for CUDA tensors,
        True/False forces it.
    batch_evictions : bool or None
        Queue evict-one work in the shared :class:`~scope_kv.kernels.EvictionBatch`: ``None`` = on
        for CUDA tensors (with Triton), True forces it (on the CPU only under
        ``TRITON_INTERPRET=1``), False launches per layer.
    decode_kernel : str
        The grouped decode attention's kernel on CUDA: ``"auto"``, ``"split_kv"`` or ``"aten"``
        (:func:`scope_kv.kernels.grouped_decode_attention`).

    Notes
    -----
    Padding and the mask: once prompt entries were evicted (or a prefill's mask had a hole), the
    layer attends with its own mask (``own_mask``), built from ``rows``
    (:class:`scope_kv.masks.RowValidity`), instead of the one transformers built.
    """

    is_sliding = False
    is_compileable = False
    # `crop` cannot restore evicted entries, so assisted decoding stays off (stop_strings= works).
    is_croppable = False

    def __init__(
        self,
        layer_idx: int,
        decoding: DecodingStrategy | None,
        module_ids: frozenset[int],
        prefill: PrefillCompressor | None = None,
        num_layers: int = 1,
        evictions: EvictionBatch | None = None,
        kv_repeat: int = 1,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.decoding = decoding
        self.prefill = prefill
        self.num_layers = num_layers
        self._module_ids = module_ids
        self._checked_module: Any = None  # the attention module last found in the model (checked once)
        # evicting prompt entries: finish the prefill (compress, own mask) before a decode step appends
        self._evicts_prompt = prefill is not None or (decoding is not None and decoding.evicts_prompt)
        # per-query-head selection (docs/method.md §11): each KV head stored `kv_repeat` times
        self.kv_repeat = kv_repeat
        self.fast_decode: bool | None = None
        self.batch_evictions: bool | None = None
        self.decode_kernel = "auto"  # kernels.grouped_decode_attention's choice of kernel
        # Whether this layer checks that prefill forwards continue it (the cache sets it on one layer).
        self.checks_positions = False
        self.positions = PositionGuard()
        self.ring = EvictRing(evictions)
        self._clear()

    def _clear(self) -> None:
        # storage
        self.keys: torch.Tensor = torch.empty(0, 0, 0, 0)  # (batch, kv_heads, capacity, dim) once initialised
        self.values: torch.Tensor = torch.empty(0, 0, 0, 0)
        self.is_initialized = False
        self.seen = self.length = self.prefill_length = 0  # lengths (module docstring)
        # the decoding schedule, restarted by every prefill forward
        self.step = 0  # decoding forwards completed since the last prefill: SCOPE's t
        self.skipped = 0  # discontinuous: eligible steps skipped since the last selection
        self.selections = 0  # selections run since the last prefill (for reports)
        self.rows = RowValidity()  # which held slots are real entries (pads, filler, holes: class notes)
        self.own_mask = False
        # the newest queries, for a strategy that scores from a window of them
        self.window = QueryWindow(0 if self.decoding is None else self.decoding.query_window)
        # prefill compression
        self._prefill_open = False  # a prefill ran and its compression is still to do
        # the compressor's memo while the prompt runs, and its attention module (per-layer budgets)
        self._memo: PrefillMemo | None = None if self.prefill is None else self.prefill.new_memo()
        self._prefill_module: torch.nn.Module | None = None
        # the forward in flight: "prefill" / "decode" from update() until after_attention()
        self._pending: str | None = None
        self._attended: torch.Tensor | None = None  # the keys view update() returned
        self._prefill_from = 0  # first slot of the prefill forward in flight
        self.positions.reset()
        self.ring.reset()

    # -- CacheLayerMixin ------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = key_states.new_empty((*key_states.shape[:2], 0, key_states.shape[-1]))
        self.values = value_states.new_empty((*value_states.shape[:2], 0, value_states.shape[-1]))
        self.is_initialized = True

    @property
    def start(self) -> torch.Tensor | None:
        """``(batch,)`` leading invalid slots per row (:class:`scope_kv.masks.RowValidity`)."""
        return self.rows.start

    @property
    def capacity(self) -> int:
        return self.keys.shape[-2]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the forward's ``(batch, kv_heads, q, dim)`` new entries (RoPE already applied to keys)
        and return every held entry: ``(batch, kv_heads, length, dim)`` views of the held slots."""
        self.ring.settle()
        if self._pending is not None:
            raise unseen_attention(self.layer_idx)
        if self.kv_repeat > 1:
            key_states = key_states.repeat_interleave(self.kv_repeat, dim=1)
            value_states = value_states.repeat_interleave(self.kv_repeat, dim=1)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        held = self.keys.shape  # (the check inline: every layer of every step comes here; the call raises)
        if self.length > 0 and (key_states.shape[:2] != held[:2] or key_states.shape[-1] != held[-1]):
            check_new_entries(self.layer_idx, self.keys, key_states)
        return self._store(key_states, value_states)

    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hold a forward's new entries and hand out the keys and values its attention reads."""
        q = key_states.shape[-2]
        decode = self.length > 0 and q == 1
        if not decode:
            self.ring.unrotate(
                self.keys, self.values, self.length
            )  # a new turn joins the prefill pool in arrival order
        if decode and self._prefill_open:
            # Prefill is known to be over only now (a chunk looks like any prefill forward). Compressing
            # before this step's entry is appended is safe although transformers sized this forward's
            # mask already: from now on the layer attends with its own mask (`own_mask`).
            self.finish_prefill()
        if decode:
            if self.length >= self.keys.shape[-2]:  # (bounded layers reserved every slot at prefill)
                self.reserve(self.length + 1)
        else:
            # A prefill forward (the first, a chunk, a new turn's prompt): what the previous turn's
            # decoding pool held joins the prefill pool, and the schedule starts afresh.
            if self.decoding is not None and self.decoding.evicts_prompt:  # one pool of at most max_held
                self.reserve(max(self.length + q + 1, self.decoding.max_held))
            else:
                self.reserve(self.length + q + (0 if self.decoding is None else self.decoding.max_held))
        end = self.length + q
        self.keys[:, :, self.length : end].copy_(key_states)
        self.values[:, :, self.length : end].copy_(value_states)
        self._prefill_from = self.length
        self.length = end
        self.seen += q
        if decode:
            self._pending = "decode"
        else:
            self._pending = "prefill"
            self.prefill_length = end
            self.step = self.skipped = self.selections = 0
            self._prefill_open = self._evicts_prompt
        return self._hand_out(key_states.requires_grad or value_states.requires_grad)

    def _hand_out(self, differentiable: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The held slots for this forward's attention (:func:`scope_kv.storage.hand_out`)."""
        if differentiable:
            compressing = self.decoding is not None or self.prefill is not None
            keys, values = hand_out(self.keys, self.values, self.length, True, compressing)
        else:  # (the common case, inline: every layer of every step comes here)
            keys, values = self.keys[:, :, : self.length], self.values[:, :, : self.length]
        self._attended = keys
        return keys, values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # Physical coordinates: mask column j is slot j (pads stay at the front).
        return self.length + query_length, 0

    def get_seq_length(self) -> Any:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.ring.settle()
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "ScopeCache cannot be cropped: evicted entries cannot be restored. Assisted decoding "
            "(assistant_model=, prompt_lookup_num_tokens=) needs a croppable cache (DynamicCache)."
        )

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.ring.settle()
        if self.length > 0:
            idx = beam_idx.to(self.device)
            self._map_batch(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.ring.settle()
        if self.is_initialized:
            self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.ring.settle()
        if self.is_initialized:
            self._map_batch(lambda t: t[indices, ...])

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a batch re-indexing to every per-row tensor: K/V, ``start``, the ring, the memo."""
        self.keys, self.values = fn(self.keys), fn(self.values)
        self.rows.map_batch(fn)
        self.window.map_batch(fn)
        self.positions.map_batch(fn)
        self.ring.map_batch(fn)
        if self._memo is not None:
            self._memo.map_batch(fn)

    # -- what the attention function asks -------------------------------------------------
    @property
    def attending(self) -> torch.Tensor | None:
        """The keys view the last :meth:`update` returned while its attention is still to run
        (``None`` otherwise)."""
        return self._attended

    def check_attended(self, keys: torch.Tensor) -> None:
        """Refuse an attention call whose keys are not the ones this layer's update returned."""
        if keys is not self._attended:
            raise RuntimeError(
                f"layer {self.layer_idx}: the attention function received other keys than the ones this layer's "
                "update() returned: the model transforms the cached keys before attending (repeats or splits "
                "them, or attends twice per layer), or updated the cache twice. ScopeCache selects among the "
                "keys it hands out, so it cannot manage this model: use DynamicCache."
            )

    def _decode_attention(self, query: torch.Tensor) -> DecodeAttention | None:
        """The grouped decode attention for this step, which returns the log-sum-exp the candidates
        are then scored from in O(budget) (docs/method.md §5); ``None`` when it does not apply."""
        wanted = self.fast_decode if self.fast_decode is not None else query.is_cuda
        if not (wanted and query.shape[2] == 1 and self._pending == "decode"):
            return None
        return DecodeAttention(self.decode_kernel, self.decode_splits)

    def attention_mask(self, backend: str, q_len: int, dtype: torch.dtype, q_heads: int = 1) -> torch.Tensor | None:
        """The mask for this layer's held slots, in ``backend``'s format (:func:`scope_kv.masks.layer_mask`).

        Query ``i`` of the forward (slot ``length - q_len + i``) may see slot ``j`` when
        ``start[b] <= j <= length - q_len + i``. (A static-layout decode step gives a per-head mask:
        :class:`scope_kv.static.StaticScopeLayer`.)
        """
        if q_len == 1 and self.rows.all_valid:
            return None  # one query that may see every slot: no mask (and the faster kernel)
        return layer_mask(backend, self.valid_slots(), q_len, dtype)

    @property
    def decode_splits(self) -> int | None:
        """Split-KV chunks for a static-layout decode step (decided once, outside a compiled region)."""
        return None

    def query_offset(self) -> Any:
        """The physical slot of the coming forward's first query: after every held slot."""
        return self.length

    def head_valid(self) -> torch.Tensor | None:
        """``(batch, kv_heads, length)`` valid slots per KV head in the static layout (else ``None``)."""
        return None

    def arrival(self) -> torch.Tensor | None:
        """``(batch, kv_heads, length)`` arrival order of the slots in the static layout (else ``None``:
        slot order is arrival order)."""
        return None

    def valid_slots(self) -> torch.Tensor:
        """``(batch, length)`` boolean: which held slots are real entries."""
        return self.rows.slots(self.keys.shape[0], self.length, self.keys.device)

    def open_step(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        attention_mask: torch.Tensor | None,
        backend: str,
        scaling: float | None = None,
        softcap: float | None = None,
    ) -> AttentionStep:
        """Everything the layer does between its :meth:`update` and the attention, in one call: checks
        that ``keys`` are the ones :meth:`update` returned, learns a prefill forward's pads and holes
        (:meth:`observe_prefill_mask`), puts the layer's own mask in place of transformers'
        (``attention_mask``, in ``backend``'s format) where it has one, and returns the step record
        (:class:`~scope_kv.step.AttentionStep`) that says how to attend (its mask, ``decode``,
        ``kv_repeat``) and that :meth:`after_attention` then takes: the only two calls."""
        self.check_attended(keys)
        if self._pending == "prefill":
            self.observe_prefill_mask(attention_mask)
        if self.own_mask:
            # Once prompt entries were evicted (or a hole met), rows keep different numbers of pads
            # or filler and layers different lengths: the mask transformers built no longer
            # describes this layer's slots, so the layer supplies its own (docs/method.md §8).
            attention_mask = self.attention_mask(backend, query.shape[2], query.dtype, query.shape[1])
        if self.window.size:  # (a prefill's queries on padding or holes are not real tokens)
            self.window.observe(query, self.valid_slots()[:, -query.shape[2] :] if self._pending == "prefill" else None)
        return AttentionStep(
            module,
            query,
            keys,
            values,
            attention_mask,
            backend,
            scaling=float(scaling) if scaling is not None else query.shape[-1] ** -0.5,
            softcap=softcap,
            head_valid=self.head_valid(),
            arrival=self.arrival(),
            window=self.window.queries,
            window_valid=self.window.valid,
            decode=self._decode_attention(query),
            kv_repeat=self.kv_repeat,
        )

    def observe_prefill_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Before a prefill forward's attention: which of the slots it attends are real entries.

        Read from the mask transformers built for the forward (:func:`scope_kv.masks.valid_slots`):
        its columns for the forward's own tokens are right for every layer (:mod:`scope_kv.masks`
        reads them from the end of the 2-D mask), its columns for the held slots only while the
        layer uses transformers' mask (else the layer's own state describes them). A row whose invalid
        slots all lead is described by ``start``; an invalid slot behind a valid one (a masked
        span, right padding, a padded later turn) puts the layer in hole mode: it attends with
        its own mask, and the holes are compacted away after the attention. ``attention_mask`` is in
        its backend's format (``None``: every slot valid); a decode step returns at once.
        """
        if self._pending != "prefill":
            return
        batch, length = self.keys.shape[0], self.length
        device = self.keys.device
        q = length - self._prefill_from
        valid = valid_slots(attention_mask, batch, length, device)
        if valid is None:
            valid = torch.ones(batch, length, dtype=torch.bool, device=device)
        # the held slots: the layer's own record once it has one (holes imply it), else the mask's
        held = (self.valid_slots() if self.own_mask else valid)[:, : length - q]
        if self.rows.observe(torch.cat([held, valid[:, length - q :]], dim=-1)):
            self.own_mask = True  # a hole: transformers' mask cannot describe the slots

    def _compact_holes(self, scores: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> None:
        """Drop the invalid slots behind valid ones (:meth:`scope_kv.masks.RowValidity.hole_choice`)."""
        scores, counts, lead = self.rows.hole_choice(self.keys.shape[1], self.length, scores, counts)
        self.length, start = keep_top_(self.keys, self.values, self.length, scores, counts, lead)
        self.rows.set_start(start)
        self.prefill_length = self.length

    def observe_input(
        self, hidden_states: torch.Tensor | None, position_embeddings: Any, position_ids: torch.Tensor | None = None
    ) -> None:
        """A forward's attention input (``(batch, q, hidden)``, its ``(cos, sin)`` and positions), before
        the attention runs: the positions must continue what the layer holds (:class:`PositionGuard`),
        and prefill compressors that score from the input get it
        (:meth:`~scope_kv.PrefillCompressor.observe_input`)."""
        if hidden_states is None:
            return
        decode = self.length > 0 and hidden_states.shape[1] == 1
        if self.checks_positions:
            batch = hidden_states.shape[0]
            self.positions.observe(position_ids, batch, decode, self.length, self.get_seq_length(), self.decode_steps())
        if self.prefill is not None and not decode:
            self.prefill.observe_input(self._memo, hidden_states, position_embeddings)

    # -- after the attention: the decode step's stages ------------------------------------
    def after_attention(self, step: AttentionStep) -> None:
        """Run what follows the ``step``'s attention (built by the scope attention function, or by
        :func:`scope_kv.testing.attend`): observe a prefill forward, or plan, score, choose and apply
        a decode step's selection."""
        if step.module is not self._checked_module:  # once: compiled, a set read is compared whole each step
            if id(step.module) not in self._module_ids:
                raise ValueError(
                    f"layer {self.layer_idx}: this ScopeCache was built for another model. Build one "
                    "ScopeCache(model, ...) per model; a cache cannot move between models."
                )
            self._checked_module = step.module
        pending, self._pending, self._attended = self._pending, None, None
        if pending != "decode":
            self._after_prefill_attention(step)
            return
        self._after_decode_attention(step)

    def decode_steps(self) -> Any:
        """Decode steps completed since the last prefill (SCOPE's ``t``)."""
        return self.step

    def _after_decode_attention(self, step: AttentionStep) -> None:
        """The decode step's selection (docs/method.md §3), one pipeline for SCOPE's strategies, the
        unified baselines and both layouts: the layout plans (:meth:`_plan`, from the strategy's
        schedule), the strategy scores, one rule chooses (:meth:`Plan.choose`), the layout applies."""
        decoding = self.decoding
        if decoding is None:
            self.step += 1
            return
        plan = self._plan(decoding, step)
        if plan is not None and plan.fused:
            self._evict_one(step, plan)
        elif plan is not None:
            self._apply(plan, plan.choose(decoding.score(step, plan.first, plan.end)))
        self._advance()

    def _advance(self) -> None:
        self.step += 1

    def _plan(self, decoding: DecodingStrategy, step: AttentionStep) -> Plan | None:
        """What this decode step (``t``) evicts (``None``: nothing): SCOPE's decoding pool loses what is
        over ``B(t)``, its newest ``recent`` entries kept; a unified baseline's whole pool, per row."""
        t = self.step
        if decoding.evicts_prompt:
            return self._plan_unified(decoding, t)
        first = self.prefill_length
        n_decoding = self.length - first
        select, self.skipped = decoding.plan(n_decoding, t, self.skipped)
        self.selections += select
        count = n_decoding - decoding.budget_at(t) if select else 0
        fused = count == 1 and step.lse is not None and decoding.default_scores
        if not fused and self.ring.rotated:
            self.ring.unrotate(self.keys, self.values, self.length - 1)  # back to arrival order: O(recent)
        if count <= 0:
            return None
        return Plan(first, self.length - decoding.recent, count, one=count == 1, fused=fused)

    def _plan_unified(self, decoding: DecodingStrategy, t: int) -> Plan | None:
        held = [self.length - first for first in self.rows.host_starts(self.keys.shape[0])]
        select = [decoding.plan(n, t, self.skipped)[0] for n in held]  # each row's pool on its own
        self.skipped = decoding.plan(max(held), t, self.skipped)[1]
        budget = decoding.budget_at(t)
        kept = tuple(min(n, budget) if cut else n for n, cut in zip(held, select, strict=True))
        if kept == tuple(held):
            return None
        self.selections += 1
        valid = self.rows.slots(self.keys.shape[0], self.length, self.keys.device)
        candidates = valid & (torch.arange(self.length, device=valid.device) < self.length - decoding.recent)
        lose = host_to_device([n - k for n, k in zip(held, kept, strict=True)], torch.long, valid.device)
        return Plan(0, self.length, lose[:, None], candidates[:, None], kept=kept)

    def _apply(self, plan: Plan, gone: torch.Tensor) -> None:
        """Keep what the plan left, compacted in place (the decoding pool's newest ``recent`` too)."""
        if plan.kept is None:  # SCOPE's decoding pool: every pool keeps as many
            kept = kept_slots(gone, plan.end - plan.first - int(plan.count))
            self.length = compact_(self.keys, self.values, plan.first, self.length, kept, self.length - plan.end)
            return
        valid = self.rows.slots(self.keys.shape[0], self.length, self.keys.device)[:, None]
        self.length, start = compact_kept_(self.keys, self.values, self.length, valid & ~gone, max(plan.kept))
        self.rows.set_start(start, [self.length - k for k in plan.kept])
        self.prefill_length = 0  # prompt and generated entries now share one pool: no boundary
        self._shrink()  # the first eviction frees most of a long prompt's storage (copies once)

    def _evict_one(self, step: AttentionStep, plan: Plan) -> None:
        """The plan's fused form: one launch scores, evicts the weakest and moves two entries (kernels)."""
        assert step.lse is not None
        end, recent = self.length, self.length - plan.end
        self.length -= 1
        self.ring.evict(
            step.query, self.keys, self.values, step.lse, plan.first, end, recent, step.scaling, self.batch_evictions
        )

    # -- prefill ----------------------------------------------------------------------------
    def _after_prefill_attention(self, step: AttentionStep) -> None:
        """A prefill forward attended: let the prefill compressor observe; drop holes.

        (The pads were learned before the attention, :meth:`observe_prefill_mask`.) With a prefill
        compressor the holes stay until the prompt is compressed (:meth:`finish_prefill`), which
        never keeps them; otherwise they are compacted away now."""
        if self.prefill is not None:
            assert self.rows.start is not None
            self._prefill_module = step.module
            start = self.rows.start
            self.prefill.observe(self._memo, step.module, step.query, step.keys, start, step.scaling, step.softcap)
        elif self.rows.holes is not None:
            self._compact_holes()

    def finish_prefill(self) -> None:
        """Compress the prefill pool now and switch to the layer's own mask (idempotent).

        Runs by itself at the first decoding step; call it (through
        :meth:`ScopeCache.finish_prefill`) to inspect the compressed cache before decoding.
        """
        if not self._prefill_open:
            return  # (an open prefill means no decode step, so no queued eviction, since it ran)
        self._prefill_open = False
        memo, self._memo = self._memo, None if self.prefill is None else self.prefill.new_memo()
        prompt = self.prefill_length
        start = self.rows.starts(self.keys.shape[0], self.keys.device)
        self.rows.start = start
        if self.prefill is not None and self.length == prompt:
            holes = self.rows.holes
            real = holes.sum(-1) if holes is not None else prompt - start
            counts = self.prefill.keep_counts(real, self.layer_idx, self.num_layers, self._prefill_module).clamp(min=0)
            counts = torch.minimum(counts, real)
            if bool((counts < real).any()):
                keys, values = self.keys[:, :, :prompt], self.values[:, :, :prompt]
                scores = self.prefill.scores(memo, keys, values, start)
                if holes is not None:
                    self._compact_holes(scores, counts)  # the compressor's choice, among real entries only
                else:
                    self.length, start = keep_top_(self.keys, self.values, prompt, scores, counts, start)
                    self.rows.set_start(start)
                    self.prefill_length = self.length
                self._shrink()
        if self.rows.holes is not None:
            self._compact_holes()
        self.rows.set_start(self.rows.starts(self.keys.shape[0], self.keys.device))
        self.own_mask = True

    # -- storage ------------------------------------------------------------------------------
    def _resize(self, capacity: int) -> None:
        """Move the held slots into new storage of ``capacity`` slots (one copy)."""
        self.keys, self.values = resized(self.keys, self.values, self.length, capacity)

    def reserve(self, needed: int) -> None:
        """Make room for ``needed`` slots; copies only when the buffer must grow."""
        if needed > self.capacity:
            bounded = self.decoding is not None and self.decoding.bounded
            self._resize(grown_capacity(needed, self.capacity, bounded))

    def _shrink(self) -> None:
        """Give back the storage prefill compression freed (one copy, once per prompt)."""
        if self.decoding is None:
            needed = self.length + MIN_GROWTH
        elif self.decoding.evicts_prompt:
            needed = max(self.length, self.decoding.max_held)  # one budget over every entry
        else:
            needed = self.prefill_length + self.decoding.max_held
        if self.capacity > needed:
            self._resize(needed)

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated by this layer."""
        return self.keys.nbytes + self.values.nbytes

    def summary(self) -> dict[str, Any]:
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
