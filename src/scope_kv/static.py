"""The static layout: one physical shape for a whole generation, so a decode step can be captured.

`ScopeCache(..., static=True)` builds its layers as :class:`StaticScopeLayer` (the layer type is
chosen once, with the cache), and each layer moves, when prefill ends, into this layout::

    slot:  0 .............. P ................................ P + D
           [ prefill pool   | decoding slots: D = B + slack + 1 ]
             (pads/filler     (filled in any order; per (row, KV head) a validity bit and
              invalid)         the decode step each entry arrived at)

and every decode step then has the same shapes: the step's entry is written into a free slot
(per row and KV head, on the device), attention runs over all ``P + D`` slots with a per-KV-head
validity mask, and eviction clears validity bits. Every decision -- the budget ``B(t)``, whether
to select, which entry goes -- is computed on the device; nothing on the host changes between
steps, so ``torch.compile`` and CUDA graphs see one graph (docs/method.md §3-§4 for the rule,
which is the same as the dynamic layout's; ties as in §9, by arrival).

A unified baseline (one budget over prompt and output) enters the layout holding the whole prompt,
since its first selection needs the first decode step's query, as in the dynamic layout; after that
step has cut the pool to the budget the layer moves, once, into ``budget + 1`` slots
(:meth:`StaticPools.repack`), so its memory is bounded as in the dynamic layout. A compiled run then
traces two graphs (the first step's shape, then the bounded one) instead of one.

What it costs: the step attends over ``D`` decoding slots even while the pool fills up (masked),
and Discontinuous computes its selection every step and applies it on its schedule (the memory
schedule is the same; the saving in score passes is not realised). Unified baselines select over
every slot with a sort.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .decoding import DecodingStrategy, defined_in
from .kernels import default_splits
from .layer import ScopeLayer
from .masks import head_mask
from .selection import Plan, gather_
from .step import AttentionStep

__all__ = ["StaticPools", "StaticScopeLayer", "check_static_strategy", "mark_static_addresses"]


def mark_static_addresses(*tensors: torch.Tensor) -> None:
    """Tell torch.compile the tensors keep their addresses across steps.

    A captured step's inputs that are not marked are copied into the graph's own buffers before
    every replay, and a buffer the step writes in place (the layer's keys and values, the pools'
    state) is then also copied back: per step that is the whole KV storage moved twice."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        torch._dynamo.mark_static_address(t)


@dataclass
class StaticPools:
    """One layer's decode-time state in the static layout (all device tensors).

    Attributes
    ----------
    prefill : int
        ``P``, slots of the prefill pool.
    valid : Tensor
        ``(batch, kv_heads, P + D)`` bool: which slots hold a live entry.
    arrival : Tensor
        ``(batch, kv_heads, P + D)`` int64: the decode step each entry arrived at; prompt slot ``j``
        holds ``j - P`` (older than any generated entry, in prompt order).
    counters : Tensor
        ``(batch * kv_heads + 3,)`` int64, read through views: :attr:`free`, then :attr:`t`,
        :attr:`skipped`, :attr:`seen`. One tensor rather than four, because a compiled step checks
        each tensor it reads (dtype, shape, strides, address) before every replay, every layer.
    last_slot : Tensor
        ``()`` int64: ``P + D - 1``, where a decode step's query sits (:meth:`StaticScopeLayer.query_offset`).
    """

    prefill: int
    valid: torch.Tensor
    arrival: torch.Tensor
    counters: torch.Tensor
    last_slot: torch.Tensor

    @property
    def free(self) -> torch.Tensor:
        """``(batch, kv_heads)`` int64: the slot the next step's entry is written to."""
        return self.counters[:-3].view(self.valid.shape[:2])

    @property
    def t(self) -> torch.Tensor:
        """``()`` int64: decode steps completed (SCOPE's ``t``)."""
        return self.counters[-3]

    @property
    def skipped(self) -> torch.Tensor:
        """``()`` int64: the discontinuous skip counter."""
        return self.counters[-2]

    @property
    def seen(self) -> torch.Tensor:
        """``()`` int64: logical tokens processed."""
        return self.counters[-1]

    @staticmethod
    def pack(free: torch.Tensor, scalars: torch.Tensor) -> torch.Tensor:
        """The :attr:`counters` tensor of ``free`` and ``scalars`` (``t, skipped, seen``); no host sync."""
        return torch.cat([free.reshape(-1).long(), scalars.to(device=free.device, dtype=torch.long)])

    @classmethod
    def build(
        cls,
        batch: int,
        kv_heads: int,
        prefill: int,
        slots: int,
        start: torch.Tensor | None,
        seen: int,
        device: torch.device,
    ) -> StaticPools:
        """A fresh state: the prefill pool's real entries valid, every decoding slot free."""
        length = prefill + slots
        index = torch.arange(length, device=device)
        first = torch.zeros(batch, dtype=torch.long, device=device) if start is None else start.to(device)
        valid = (index[None, :] >= first[:, None]) & (index[None, :] < prefill)
        state = cls(
            prefill=prefill,
            valid=valid[:, None, :].expand(batch, kv_heads, length).contiguous(),
            arrival=(index - prefill).expand(batch, kv_heads, length).contiguous(),
            counters=cls.pack(
                torch.full((batch, kv_heads), prefill, dtype=torch.long, device=device), torch.tensor([0, 0, seen])
            ),
            last_slot=torch.tensor(length - 1, dtype=torch.long, device=device),
        )
        mark_static_addresses(state.valid, state.arrival, state.counters)
        return state

    # -- one decode step ------------------------------------------------------------------
    def write(
        self, keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:
        """Write the step's entry ``(batch, kv_heads, 1, dim)`` into each (row, KV head)'s free slot.

        Every buffer is written through one flat index per (row, KV head), ``index_put_`` on a flat
        view: a compiler writes those entries in place, where ``scatter_`` into a graph input makes
        it copy the whole buffer (every layer's K and V, twice a step: the KV cache's bytes)."""
        batch, kv_heads, slots, dim = keys.shape
        rows = torch.arange(batch * kv_heads, device=keys.device)
        flat = (rows * slots + self.free.reshape(-1),)  # (batch * kv_heads,) slot of each (row, KV head)
        keys.view(-1, dim).index_put_(flat, key_states.reshape(-1, dim).to(keys.dtype))
        values.view(-1, dim).index_put_(flat, value_states.reshape(-1, dim).to(values.dtype))
        self.valid.view(-1).index_put_(flat, rows.new_ones((), dtype=torch.bool))  # (0-d values broadcast)
        self.arrival.view(-1).index_put_(flat, self.t)
        self.seen.add_(1)

    def plan(self, decoding: DecodingStrategy, t: torch.Tensor, length: int, rules: tuple[bool, bool]) -> Plan:
        """Decode step ``t``'s selection, on the device: every pool over ``B(t)`` loses what is over,
        among its entries but the newest ``recent``. ``rules``: :func:`_device_rules` of the
        strategy's class."""
        unified = decoding.evicts_prompt
        first = 0 if unified else self.prefill
        valid = self.valid[..., first:length]
        arrival = self.arrival[..., first:length]
        held = valid.sum(-1)  # (batch, kv_heads): entries of the region, this step's included
        evict = (held - decoding.budget_tensor(t)).clamp(min=0)  # (batch, kv_heads)
        own_plan, one_at_a_time = rules
        if own_plan:  # discontinuous, or a strategy's own: cut only the pools its plan selects
            select, skipped = decoding.plan_tensor(held, t, self.skipped)
            self.skipped.copy_(skipped)
            evict = torch.where(select, evict, 0)
        candidates = valid & (arrival <= t - decoding.recent)  # the newest `recent` always stay
        # at most one entry over the budget when the pool grows by one a step and B(t) never drops
        return Plan(first, length, evict, candidates, arrival, one=one_at_a_time and not unified)

    def apply(self, plan: Plan, gone: torch.Tensor) -> None:
        """Clear the chosen entries' validity bits, and pick the next free slots."""
        valid = self.valid[..., plan.first : plan.end]
        valid &= ~gone
        # The next entry goes to the first free slot of the region (the decoding slots; for a
        # unified baseline, any slot): there is always one, the region holds budget + slack + 1.
        self.free.copy_(plan.first + (~valid).to(torch.int8).argmax(-1))

    def repack(
        self, keys: torch.Tensor, values: torch.Tensor, slots: int
    ) -> tuple[StaticPools, torch.Tensor, torch.Tensor]:
        """The same live entries in ``slots`` slots: new storage and state (one copy).

        A unified baseline enters the layout with the whole prompt held (its first selection needs
        the first decode step's query); once that step has cut the pool to the budget, the layer
        moves into a buffer of ``budget + 1`` slots so the memory bound holds from then on, as in
        the dynamic layout. Per (row, KV head) the live entries move to the front in arrival order
        (their arrival steps kept, so "the newest r" and ties are unchanged); the decode counters
        carry over. The prefill boundary is gone (0): prompt and output share one pool.
        """
        key_order = torch.where(self.valid, self.arrival, torch.iinfo(self.arrival.dtype).max)
        index = torch.argsort(key_order, dim=-1, stable=True)[..., :slots]  # (batch, kv_heads, slots)
        new_keys = keys.gather(2, index[..., None].expand(-1, -1, -1, keys.shape[-1]))
        new_values = values.gather(2, index[..., None].expand(-1, -1, -1, values.shape[-1]))
        valid = self.valid.gather(-1, index)
        state = StaticPools(
            prefill=0,
            valid=valid,
            arrival=self.arrival.gather(-1, index),
            counters=self.pack((~valid).to(torch.int8).argmax(-1), self.counters[-3:]),
            last_slot=torch.tensor(slots - 1, dtype=torch.long, device=valid.device),
        )
        mark_static_addresses(state.valid, state.arrival, state.counters)
        return state, new_keys, new_values

    def held(self, decoding_only: bool) -> torch.Tensor:
        """``(batch,)`` live entries per row (of the decoding slots, or of every slot)."""
        region = self.valid[..., self.prefill :] if decoding_only else self.valid
        return region[:, 0].sum(-1)


def _device_rules(cls: type[DecodingStrategy]) -> tuple[bool, bool]:
    """(whether the strategy plans other than SCOPE's default -- then its ``plan_tensor`` runs --,
    whether a step evicts at most one entry: no slack, and a schedule whose defining class states
    that ``B(t)`` never drops, :attr:`DecodingStrategy.budget_never_drops`). Read once, when the
    layer is built."""
    own_plan = defined_in(cls, "plan_tensor") is not DecodingStrategy
    one_at_a_time = not own_plan and cls.slack is DecodingStrategy.slack
    never_drops = all(
        vars(defined_in(cls, name)).get("budget_never_drops", False) for name in ("budget_at", "budget_tensor")
    )
    return own_plan, one_at_a_time and never_drops


def check_static_strategy(decoding: DecodingStrategy) -> None:
    """Refuse a strategy the static layout cannot run as the default layout does.

    The static layout evaluates the schedule and the plan on the device
    (:meth:`DecodingStrategy.budget_tensor`, :meth:`DecodingStrategy.plan_tensor`); a strategy that
    changes ``budget_at`` or ``plan`` without its device form would be run by a rule other than its own.
    """
    cls = type(decoding)
    schedule, device_schedule = defined_in(cls, "budget_at"), defined_in(cls, "budget_tensor")
    name = cls.__name__
    if not issubclass(device_schedule, schedule):
        raise ValueError(
            f"static=True evaluates the budget schedule on the device, and {name} overrides budget_at "
            f"(in {schedule.__name__}) but not budget_tensor: state the schedule as {name}.budget_tensor(t) "
            "instead, B(t) from a 0-d int64 tensor (budget_at then reads it, in both layouts), or use static=False."
        )
    plan, device_plan = defined_in(cls, "plan"), defined_in(cls, "plan_tensor")
    if not issubclass(device_plan, plan):
        raise ValueError(
            f"static=True plans each step on the device, and {name} overrides plan (in {plan.__name__}) "
            f"but not plan_tensor: state the plan as {name}.plan_tensor(n_decoding, t, skipped) instead "
            "(plan then reads it, in both layouts), or use static=False."
        )


class StaticScopeLayer(ScopeLayer):
    """A :class:`~scope_kv.layer.ScopeLayer` that decodes in the static layout (``ScopeCache(static=True)``).

    Prefill forwards run as in the default layout. When the first decode step is sized
    (:meth:`prepare`), the prefill ends -- compression included -- and the layer moves into one fixed
    buffer whose state is a :class:`StaticPools`; every decode step then writes, attends and selects
    inside it without a host decision, so the step can be compiled and captured. A new turn's
    prefill moves the held entries back, in arrival order, and the layer continues as a default
    layer until the next decode step.
    """

    is_compileable = True

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._evicts_prompt = True  # the prefill must be finished before the layout is entered
        self._rules = (True, False) if self.decoding is None else _device_rules(type(self.decoding))

    def _clear(self) -> None:
        super()._clear()
        self._pools: StaticPools | None = None  # the layout's state while decoding in it
        self._splits: int | None = None  # split-KV chunks for the fixed shape (decided once)

    # -- layout changes, outside any compiled step ------------------------------------------
    def prepare(self, query_length: int) -> None:
        """Put the layer into the layout the coming forward needs.

        Called when transformers sizes the forward's mask (:meth:`ScopeCache.get_mask_sizes`), that
        is before any layer runs and, under ``generate``'s compiled decoding, outside the compiled
        step: a decode step (one query token after a prefill) finishes the prefill -- compression
        included -- and enters the static layout; a prefill forward (a new turn) leaves it, the
        held entries joining the prefill pool in arrival order.
        """
        if self.length == 0:
            return
        if query_length == 1 and self._pools is None:
            self._enter()
        elif query_length == 1 and self._pools is not None:
            self._fit()
        elif query_length > 1 and self._pools is not None:
            self._leave()

    def _enter(self) -> None:
        self.finish_prefill()
        decoding = self.decoding
        assert decoding is not None and self.start is not None
        prompt = self.length
        if decoding.evicts_prompt:
            total = max(prompt + 1, decoding.max_held)  # one pool: always a free slot after a step
        else:
            total = prompt + decoding.max_held
        if self.capacity != total:
            self._resize(total)
        # Free slots are attended (masked) from now on: they must hold finite numbers, since a
        # masked slot still multiplies its value by a zero probability.
        self.keys[:, :, prompt:].zero_()
        self.values[:, :, prompt:].zero_()
        batch, kv_heads = self.keys.shape[:2]
        self._pools = StaticPools.build(
            batch, kv_heads, prompt, total - prompt, self.start, self.seen, self.keys.device
        )
        mark_static_addresses(self.keys, self.values)
        if self.window.queries is not None and self.window.valid is not None:
            mark_static_addresses(self.window.queries, self.window.valid)
        self.length = total
        self._splits = default_splits(batch, kv_heads, total, self.keys.device)

    def _fit(self) -> None:
        """A unified baseline entered the layout holding a prompt longer than its budget; once its
        first selection has cut the pool, move into ``budget + 1`` slots (one copy, once)."""
        decoding, pools = self.decoding, self._pools
        assert decoding is not None and pools is not None
        slots = decoding.max_held
        if not decoding.evicts_prompt or self.length <= slots or torch.compiler.is_compiling():
            return  # (a traced region sees the layout it was called with; generate sizes the mask outside it first)
        if int(pools.valid.sum(-1).max()) >= slots:  # (one host sync, until the first selection ran)
            return
        self._pools, self.keys, self.values = pools.repack(self.keys, self.values, slots)
        mark_static_addresses(self.keys, self.values)
        self.length, self.prefill_length = slots, 0
        self._splits = default_splits(self.keys.shape[0], self.keys.shape[1], slots, self.keys.device)

    def _leave(self) -> None:
        """Back to the default layout: live entries in arrival order, rows' filler in front."""
        pools = self._pools
        assert pools is not None
        counts = pools.valid[:, 0].sum(-1)  # (batch,) live entries (the same for every KV head)
        n = int(counts.max())
        order = torch.where(pools.valid, pools.arrival.float(), float("-inf"))
        index = torch.argsort(order, dim=-1, stable=True)[..., self.length - n :]  # filler, then by arrival
        gather_(self.keys, self.values, 0, self.length, index)
        self.seen = int(pools.seen)
        self.step, self.skipped = int(pools.t), int(pools.skipped)
        self._pools = None
        self.length = self.prefill_length = n
        self.rows.set_start(n - counts)

    # -- the decode step inside the layout ----------------------------------------------------
    def _store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        decode = self.length > 0 and key_states.shape[-2] == 1
        self.prepare(key_states.shape[-2])  # (normally done already, when transformers sized the mask)
        if not decode:
            return super()._store(key_states, value_states)
        assert self._pools is not None
        self._pools.write(self.keys, self.values, key_states, value_states)
        self._pending = "decode"
        return self._hand_out(key_states.requires_grad or value_states.requires_grad)

    def _plan(self, decoding: DecodingStrategy, step: AttentionStep) -> Plan | None:
        if self._pools is None:  # (prepare always enters the layout before a decode step)
            return super()._plan(decoding, step)
        return self._pools.plan(decoding, self._pools.t, self.length, self._rules)

    def _apply(self, plan: Plan, gone: torch.Tensor) -> None:
        if self._pools is None:
            super()._apply(plan, gone)
        else:
            self._pools.apply(plan, gone)

    def _advance(self) -> None:
        if self._pools is None:
            super()._advance()
        else:
            self._pools.t.add_(1)

    def check_attended(self, keys: torch.Tensor) -> None:
        if self._pools is None:
            super().check_attended(keys)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # the step's entry is written inside the fixed buffer
        if self._pools is not None and query_length == 1:
            return self.length, 0
        return super().get_mask_sizes(query_length)

    def query_offset(self) -> Any:
        """Inside the layout the step's entry is written into the fixed buffer, so the query sits at
        its last slot. Once the layer holds entries the offset is a device tensor (as transformers'
        static layers give it), so that every decode step's forward gets a mask: with an int the
        mask is skipped where every held slot is behind the query, which holds from the second
        decode step on but not always at the first (transformers asks for the offset before it
        sizes the mask, and the sizing is what enters the layout), and a compiled step handed a
        mask at one step and none at the next is traced twice. The first prefill (nothing held)
        keeps an int: its causal mask is left to the kernel."""
        if self._pools is not None:
            return self._pools.last_slot
        if self.length == 0:
            return 0
        return torch.tensor(self.length, dtype=torch.long, device=self.keys.device)

    def get_seq_length(self) -> Any:
        # counted on the device (an int would change between captured steps)
        return self._pools.seen if self._pools is not None else super().get_seq_length()

    def decode_steps(self) -> Any:
        return self._pools.t if self._pools is not None else super().decode_steps()

    def attention_mask(self, backend: str, q_len: int, dtype: torch.dtype, q_heads: int = 1) -> torch.Tensor | None:
        """A decode step's mask is per head: ``q_heads`` rows, each its KV head's valid slots
        (:func:`scope_kv.masks.head_mask`); other forwards as in the default layout."""
        if self._pools is not None and q_len == 1:
            return head_mask(backend, self._pools.valid, q_heads, dtype)
        return super().attention_mask(backend, q_len, dtype, q_heads)

    @property
    def decode_splits(self) -> int | None:
        return self._splits if self._pools is not None else None

    def head_valid(self) -> torch.Tensor | None:
        return self._pools.valid if self._pools is not None else None

    def arrival(self) -> torch.Tensor | None:
        return self._pools.arrival if self._pools is not None else None

    def _map_batch(self, fn: Any) -> None:
        super()._map_batch(fn)
        if self._pools is not None:
            pools = self._pools
            pools.valid, pools.arrival = fn(pools.valid), fn(pools.arrival)
            pools.counters = pools.pack(fn(pools.free), pools.counters[-3:])

    def summary(self) -> dict[str, Any]:
        row = super().summary()
        if self._pools is not None:  # counted on the device (one sync here)
            pools = self._pools
            live = pools.valid[:, 0]  # (batch, slots): the first KV head's (every head holds as many)
            prefill, decoding = live[:, : pools.prefill].sum(-1), live[:, pools.prefill :].sum(-1)
            row.update(
                seen=int(pools.seen),
                step=int(pools.t),
                held=int((prefill + decoding).max()),
                prefill=int(prefill.max()),
                decoding=int(decoding.max()),
                static_slots=self.length,
                selections=None,
            )
        return row
