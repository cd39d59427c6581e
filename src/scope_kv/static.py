"""The static layout: one physical shape for a whole generation, so a decode step can be captured.

`ScopeCache(..., static=True)` puts each layer, when prefill ends, into this layout::

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

import torch

from .decoding import Adaptive, DecodingStrategy, Discontinuous
from .step import AttentionStep

__all__ = ["StaticPools", "check_static_strategy", "mark_static_addresses"]


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
    free : Tensor
        ``(batch, kv_heads)`` int64: the slot the next step's entry is written to.
    t : Tensor
        ``()`` int64: decode steps completed (SCOPE's ``t``).
    skipped : Tensor
        ``()`` int64: the discontinuous skip counter.
    seen : Tensor
        ``()`` int64: logical tokens processed.
    """

    prefill: int
    valid: torch.Tensor
    arrival: torch.Tensor
    free: torch.Tensor
    t: torch.Tensor
    skipped: torch.Tensor
    seen: torch.Tensor

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
            free=torch.full((batch, kv_heads), prefill, dtype=torch.long, device=device),
            t=torch.zeros((), dtype=torch.long, device=device),
            skipped=torch.zeros((), dtype=torch.long, device=device),
            seen=torch.tensor(seen, dtype=torch.long, device=device),
        )
        mark_static_addresses(state.valid, state.arrival, state.free, state.t, state.skipped, state.seen)
        return state

    # -- one decode step ------------------------------------------------------------------
    def write(
        self, keys: torch.Tensor, values: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor
    ) -> None:
        """Write the step's entry ``(batch, kv_heads, 1, dim)`` into each (row, KV head)'s free slot."""
        slot = self.free[:, :, None]
        index = slot[..., None].expand(-1, -1, 1, keys.shape[-1])
        keys.scatter_(2, index, key_states.to(keys.dtype))
        values.scatter_(2, index, value_states.to(values.dtype))
        self.valid.scatter_(2, slot, True)
        self.arrival.scatter_(2, slot, self.t.expand_as(slot))
        self.seen.add_(1)

    def select(self, decoding: DecodingStrategy, step: AttentionStep, length: int) -> None:
        """After the step's attention: evict what the strategy's rule evicts, pick the next free slots."""
        t = self.t
        unified = decoding.evicts_prompt
        first = 0 if unified else self.prefill
        valid = self.valid[..., first:length]
        arrival = self.arrival[..., first:length]
        held = valid.sum(-1)  # (batch, kv_heads): entries of the region, this step's included
        budget = decoding.budget_tensor(t)
        if isinstance(decoding, Discontinuous):
            eligible = held[0, 0] >= budget
            go = eligible & (self.skipped >= decoding.schedule_delta)
            self.skipped.copy_(torch.where(eligible & ~go, self.skipped + 1, torch.where(go, 0, self.skipped)))
            evict = torch.where(go, (held - budget).clamp(min=0), 0)
        else:
            evict = (held - budget).clamp(min=0)  # (batch, kv_heads)
        candidates = valid & (arrival <= t - decoding.recent)  # the newest `recent` always stay
        scores = decoding.score(step, first, length).float()
        if decoding.slack == 0 and not unified and _budget_never_shrinks(decoding):
            # at most one entry over the budget: the pool grows by one a step, the budget never drops
            gone = _lowest_one(scores, candidates, arrival) & (evict > 0)[..., None]
        else:
            gone = _lowest(scores, candidates, arrival, evict)
        valid &= ~gone
        # The next entry goes to the first free slot of the region (the decoding slots; for a
        # unified baseline, any slot): there is always one, the region holds budget + slack + 1.
        self.free.copy_(first + (~valid).to(torch.int8).argmax(-1))
        self.t.add_(1)

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
            free=(~valid).to(torch.int8).argmax(-1),
            t=self.t.clone(),
            skipped=self.skipped.clone(),
            seen=self.seen.clone(),
        )
        mark_static_addresses(state.valid, state.arrival, state.free, state.t, state.skipped, state.seen)
        return state, new_keys, new_values

    def held(self, decoding_only: bool) -> torch.Tensor:
        """``(batch,)`` live entries per row (of the decoding slots, or of every slot)."""
        region = self.valid[..., self.prefill :] if decoding_only else self.valid
        return region[:, 0].sum(-1)


def _owner(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO that defines ``name``."""
    return next(c for c in cls.__mro__ if name in vars(c))


def _budget_never_shrinks(decoding: DecodingStrategy) -> bool:
    """The built-in schedules (constant, or adaptive's growing one) never lower ``B(t)``."""
    return _owner(type(decoding), "budget_at") in (DecodingStrategy, Adaptive)


def check_static_strategy(decoding: DecodingStrategy) -> None:
    """Refuse a strategy the static layout cannot run as the default layout does.

    The static layout evaluates the schedule on the device (:meth:`DecodingStrategy.budget_tensor`)
    and implements two selection plans, SCOPE's (select whenever the pool holds ``B(t)``) and
    discontinuous's; a strategy that changes ``budget_at`` without ``budget_tensor``, or ``plan``,
    would be run by a rule other than its own.
    """
    cls = type(decoding)
    schedule, device_schedule = _owner(cls, "budget_at"), _owner(cls, "budget_tensor")
    name = cls.__name__
    if not issubclass(device_schedule, schedule):
        raise ValueError(
            f"static=True evaluates the budget schedule on the device, and {name} overrides budget_at "
            f"(in {schedule.__name__}) but not budget_tensor: define {name}.budget_tensor(t), B(t) from a "
            "0-d int64 tensor with the same values as budget_at, or use static=False."
        )
    if _owner(cls, "plan") not in (DecodingStrategy, Discontinuous):
        raise ValueError(
            f"static=True runs SCOPE's selection plan (select whenever the pool holds B(t)) or "
            f"Discontinuous's, and {name} overrides plan: use static=False for a plan of its own."
        )


def _lowest_one(scores: torch.Tensor, candidates: torch.Tensor, arrival: torch.Tensor) -> torch.Tensor:
    """``(batch, kv_heads, n)`` bool marking the lowest-scored candidate (ties: the newest arrival)."""
    masked = scores.masked_fill(~candidates, float("inf"))
    low = masked.amin(-1, keepdim=True)
    pick = torch.where(masked == low, arrival, arrival.new_full((), -(2**62))).argmax(-1, keepdim=True)
    return torch.zeros_like(candidates).scatter_(-1, pick, True) & candidates.any(-1, keepdim=True)


def _lowest(scores: torch.Tensor, candidates: torch.Tensor, arrival: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The ``count[b, h]`` lowest-scored candidates (ties: the newest first), as a bool mask."""
    masked = scores.masked_fill(~candidates, float("inf"))
    # Order by arrival, newest first, then stably by score: equal scores keep newest-first order.
    by_arrival = torch.argsort(arrival, dim=-1, descending=True, stable=True)
    order = by_arrival.gather(-1, torch.argsort(masked.gather(-1, by_arrival), dim=-1, stable=True))
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    return (rank < count[..., None]) & candidates
