"""SCOPE's decoding strategies: how many generated-token entries a layer keeps, when it
selects, and how it scores the candidates (Wu et al., 2025; docs/method.md §3-§5).

A strategy is a frozen, validated configuration. It holds no state: the per-layer state
(decoding step ``t`` and the discontinuous skip counter) lives on
:class:`scope_kv.layer.ScopeLayer`, which also does the top-k and the compaction
(:mod:`scope_kv.selection`). A strategy answers three questions:

* ``budget_at(t)`` -- the decoding budget ``B(t)`` at decode step ``t`` (and ``budget_tensor(t)``,
  the same on the device, for the static layout);
* ``plan(n_decoding, t, skipped)`` -- whether the step selects, and the new skip counter (and
  ``plan_tensor``, the same on the device);
* ``score(step, first, last)`` -- the score of each candidate slot (higher is kept). The
  default is SCOPE's: the current query's softmax probability over the whole held context,
  summed over each KV head's query group. Strategies that keep it get the fast paths (scores
  from the attention's log-sum-exp, the fused evict-one kernel); one that overrides it is
  scored by its own rule on every path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ._checks import check_int, spec_text

if TYPE_CHECKING:
    from .step import AttentionStep

__all__ = ["DecodingStrategy", "Slide", "Adaptive", "Discontinuous", "UnifiedH2O", "UnifiedStreamingLLM"]


def defined_in(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO that defines ``name``."""
    return next(c for c in cls.__mro__ if name in vars(c))


def _defines(cls: type, name: str) -> bool:
    """Whether ``cls`` has its own ``name`` rather than :class:`DecodingStrategy`'s."""
    return defined_in(cls, name) is not DecodingStrategy


def check_forms(cls: type) -> None:
    """Refuse a strategy class whose device form of the schedule or plan is newer than a host form
    that does not read it: the two layouts would run different rules."""
    for host, device in (("budget_at", "budget_tensor"), ("plan", "plan_tensor")):
        host_cls, device_cls = defined_in(cls, host), defined_in(cls, device)
        if host_cls is not DecodingStrategy and host_cls is not device_cls and issubclass(device_cls, host_cls):
            raise TypeError(
                f"{cls.__name__} overrides {device} (in {device_cls.__name__}) but {host} still comes from "
                f"{host_cls.__name__}, whose rule it replaces: override {host} in {device_cls.__name__} too, "
                f"with the same values, so that both layouts run the same {host.split('_')[0]}."
            )


@dataclass(frozen=True)
class DecodingStrategy:
    """Base of every decoding strategy.

    Parameters
    ----------
    budget : int
        ``B``: the most decoding-pool entries kept per layer and KV head.
    recent : int
        ``r``: the newest generated entries that are always kept and never scored
        (``1 <= recent < budget``).
    """

    budget: int
    recent: int

    # Unified baselines (docs/method.md §7) evict from prompt and generated entries alike; SCOPE's
    # own strategies only ever touch the decoding pool.
    evicts_prompt: ClassVar[bool] = False
    # Stated by the class that defines the schedule (budget_at / budget_tensor), in its own body:
    # B(t) never drops, so at most one entry a step goes over it (the layouts' one-out path).
    # A class that changes the schedule without saying so is run by the general selection.
    budget_never_drops: ClassVar[bool] = True
    # Whether budget_at / plan read the device forms (decided once per class, off the decode path).
    _schedule_on_device: ClassVar[bool] = False
    _plan_on_device: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls._schedule_on_device = _defines(cls, "budget_tensor")
        cls._plan_on_device = _defines(cls, "plan_tensor")

    def __post_init__(self) -> None:
        check_forms(type(self))
        cls = type(self).__name__
        check_int(f"{cls}.budget", self.budget, 2)
        check_int(f"{cls}.recent", self.recent, 1)
        if self.recent >= self.budget:
            raise ValueError(
                f"{cls}: recent ({self.recent}) must be smaller than budget ({self.budget}); "
                f"SCOPE keeps the newest `recent` entries plus `budget - recent` heavy hitters. "
                f"Lower `recent` or raise `budget`, e.g. {cls}(budget={self.budget}, recent={self.budget // 2})."
            )

    # -- schedule -----------------------------------------------------------------------
    # A strategy states its schedule (and its plan) once. The device form, `budget_tensor`
    # (`plan_tensor`), serves both layouts: the host form then reads it. A strategy may instead
    # override only the host form, for the default layout (`static=True` refuses it, saying so).
    def budget_at(self, t: int) -> int:
        """``B(t)``: decoding budget at decode step ``t`` (``t = 0`` is the first decode forward).
        By default :meth:`budget_tensor` evaluated on the host, so a schedule stated there needs
        nothing here."""
        if self._schedule_on_device:
            return int(self.budget_tensor(torch.tensor(t)))
        return self.budget

    def budget_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """``B(t)`` computed on the device from a 0-d int64 tensor ``t``: what the static layout
        (``ScopeCache(static=True)``, :mod:`scope_kv.static`) uses, since a captured step cannot
        ask the host, and what :meth:`budget_at` reads unless it is overridden too (then the two
        must agree). A strategy that overrides only ``budget_at`` runs in the default layout; the
        static one refuses it."""
        return torch.full_like(t, self.budget)

    @property
    def slack(self) -> int:
        """Most entries the pool may hold above ``B(t)`` between steps (0 except discontinuous)."""
        return 0

    @property
    def max_held(self) -> int:
        """Most decoding entries ever held at once, during a step's attention included."""
        return self.budget + self.slack + 1

    @property
    def memory_budget(self) -> int:
        """The decoding budget ``B`` this strategy is compared at, at equal memory (the grids'
        groups): the most entries it holds between steps, less the ``slack`` of a schedule that
        skips selections (discontinuous is compared at its ``B``)."""
        return self.budget

    @property
    def query_window(self) -> int:
        """How many of the newest queries the strategy scores from: a layer then keeps them and hands
        them over as :attr:`AttentionStep.window` (0: the current query only, SCOPE's)."""
        return 0

    @property
    def bounded(self) -> bool:
        """Whether :attr:`max_held` bounds the pool (False for an uncapped schedule: then it is only
        the storage reserved up front)."""
        return True

    def plan(self, n_decoding: int, t: int, skipped: int) -> tuple[bool, int]:
        """Decide whether decode step ``t`` selects.

        Parameters
        ----------
        n_decoding : int
            Entries in the decoding pool, the step's new token included.
        t : int
            Decoding forwards completed before this one.
        skipped : int
            The layer's skip counter (only discontinuous uses it).

        Returns
        -------
        (select, skipped) : tuple[bool, int]
            Whether to cut the pool back to ``budget_at(t)`` now, and the new skip counter.
            By default :meth:`plan_tensor` evaluated on the host when a strategy states its plan
            there, else SCOPE's plan: select once the pool holds ``B(t)``.
        """
        if self._plan_on_device:
            select, new = self.plan_tensor(torch.tensor([[n_decoding]]), torch.tensor(t), torch.tensor(skipped))
            return bool(select.all()), int(new)
        return n_decoding >= self.budget_at(t), skipped

    def plan_tensor(
        self, n_decoding: torch.Tensor, t: torch.Tensor, skipped: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`plan` on the device, for the static layout.

        ``n_decoding`` is ``(batch, kv_heads)``: each pool's entries, the step's included (a unified
        baseline's pool holds the prompt too, so padded rows differ); ``t`` and ``skipped`` are 0-d
        int64. Returns ``select`` (broadcastable to ``n_decoding``: which pools are cut back to
        ``B(t)``) and the new skip counter. :meth:`plan` reads it unless it is overridden too; a
        strategy that overrides only ``plan`` runs in the default layout (``static=True`` refuses it)."""
        return n_decoding >= self.budget_tensor(t), skipped

    # -- scoring ------------------------------------------------------------------------
    def score(self, step: AttentionStep, first: int, last: int) -> torch.Tensor:
        """Score the held slots ``[first, last)`` of a decode step; the best are kept.

        Parameters
        ----------
        step : AttentionStep
            The step's attention: ``query`` ``(batch, q_heads, 1, dim)``, ``keys`` / ``values``
            ``(batch, kv_heads, length, dim)`` (every held entry, this step's included), ``valid``,
            ``scaling``, ``softcap``, ``lse``.
        first, last : int
            The candidate slots (SCOPE's strategies: the decoding pool but its newest ``recent``;
            unified baselines: every held slot).

        Returns
        -------
        Tensor
            ``(batch, kv_heads, last - first)`` float scores; ties are broken as
            docs/method.md §9 says.
        """
        return step.probabilities(first, last)

    @property
    def default_scores(self) -> bool:
        """Whether this strategy scores by SCOPE's rule (then the fused fast paths apply)."""
        return type(self).score is DecodingStrategy.score

    # The spec grammar's name for this class (scope_kv.spec), declared by each class it names, and
    # the settings its spec string writes (``key=value``, when they differ from the default).
    spec_kind: ClassVar[str] = ""
    spec_fields: ClassVar[tuple[str, ...]] = ()

    def spec_budget(self) -> str:
        """The budget part of this strategy's spec string: ``B/r``."""
        return f"{self.budget}/{self.recent}"

    def spec_settings(self) -> tuple[str, ...]:
        """The fields its spec string writes as ``key=value`` when they differ from the default."""
        return self.spec_fields

    def describe(self) -> str:
        """This strategy as a spec string that builds it again (:func:`scope_kv.spec.parse_spec`)."""
        return spec_text(self)


@dataclass(frozen=True)
class Slide(DecodingStrategy):
    """SCOPE *slide*: a constant budget ``B``; selects at every step once the pool holds ``B``.

    Memory stays flat at ``prompt + B`` entries per layer and KV head.
    """

    spec_kind: ClassVar[str] = "slide"


def _resolve_delta(cls: str, budget: int, recent: int, max_new_tokens: int | None, delta: int | None) -> int:
    if max_new_tokens is None and delta is None:
        raise ValueError(
            f"{cls} needs the generation length its schedule is planned for: pass "
            f"max_new_tokens=<the max_new_tokens you give generate> (the paper uses 4096), "
            f"or the schedule step directly with delta=<int>."
        )
    if max_new_tokens is not None and delta is not None:
        raise ValueError(
            f"{cls}: pass either max_new_tokens or delta, not both "
            f"(delta is derived as (max_new_tokens - recent) // (budget - recent))."
        )
    if delta is not None:
        check_int(f"{cls}.delta", delta, 1)
        return delta
    check_int(f"{cls}.max_new_tokens", max_new_tokens, 1)
    assert max_new_tokens is not None
    derived = (max_new_tokens - recent) // (budget - recent)
    if derived < 1:
        raise ValueError(
            f"{cls}: max_new_tokens ({max_new_tokens}) must be at least budget ({budget}) for the "
            f"schedule to grow (delta = (max_new_tokens - recent) // (budget - recent) = {derived}). "
            f"For outputs shorter than the budget, use Slide or decoding=None."
        )
    return derived


@dataclass(frozen=True)
class Adaptive(DecodingStrategy):
    """SCOPE *adaptive*: ``B(t) = min(B, r + t // delta)`` grows with the output.

    ``delta = (max_new_tokens - recent) // (budget - recent)`` unless given directly, so the
    budget reaches ``B`` near the end of a ``max_new_tokens``-long output. Selects at every
    step at which the pool holds ``B(t)``. The paper's formula leaves ``B(t)`` unbounded past
    ``t = (B - r) * delta``; we cap it at ``B``, the documented maximum (docs/method.md §4).

    Parameters
    ----------
    cap_budget : bool
        ``False`` reproduces the authors' research code: ``B(t) = r + t // delta`` with no cap, so
        an output longer than ``max_new_tokens`` keeps growing the pool (docs/method.md §11).
        Storage is reserved for the planned length (``r + max_new_tokens // delta``) and grows
        beyond it; such a pool has no static shape (``ScopeCache(static=True)`` refuses it).
    """

    spec_kind: ClassVar[str] = "adaptive"
    budget_never_drops: ClassVar[bool] = True  # B(t) grows with t (or stays at B, capped)

    max_new_tokens: int | None = None
    delta: int | None = field(default=None)
    cap_budget: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.cap_budget, bool):
            raise TypeError(f"{type(self).__name__}.cap_budget must be True or False, got {self.cap_budget!r}.")
        resolved = _resolve_delta(type(self).__name__, self.budget, self.recent, self.max_new_tokens, self.delta)
        object.__setattr__(self, "delta", resolved)

    @property
    def schedule_delta(self) -> int:
        """δ, resolved (an int; ``delta`` is typed for the unresolved input)."""
        assert self.delta is not None  # resolved in __post_init__
        return self.delta

    def budget_at(self, t: int) -> int:
        grown = self.recent + t // self.schedule_delta
        return min(self.budget, grown) if self.cap_budget else grown

    def budget_tensor(self, t: torch.Tensor) -> torch.Tensor:
        grown = self.recent + torch.div(t, self.schedule_delta, rounding_mode="floor")
        return torch.clamp(grown, max=self.budget) if self.cap_budget else grown

    @property
    def max_held(self) -> int:
        if self.cap_budget or self.max_new_tokens is None:
            return super().max_held
        return self.budget_at(self.max_new_tokens) + self.slack + 1

    @property
    def bounded(self) -> bool:
        return self.cap_budget

    def spec_settings(self) -> tuple[str, ...]:
        # the schedule as it was given: the length it was planned for, or delta itself
        return ("max_new_tokens" if self.max_new_tokens is not None else "delta", "cap_budget")


@dataclass(frozen=True)
class Discontinuous(Adaptive):
    """SCOPE *discontinuous*: the adaptive budget, but selection runs on one eligible step in
    ``delta + 1``; between selections the pool grows freely (by at most ``delta + 1``).

    A step is eligible when the pool holds at least ``B(t)``. The skip counter starts at 0
    with every new generation (prefill), so the first ``delta`` eligible steps are skipped.
    """

    spec_kind: ClassVar[str] = "discontinuous"

    @property
    def slack(self) -> int:
        # After a selection the pool holds B(t); `delta` skipped eligible steps add one entry each.
        return self.schedule_delta

    def plan(self, n_decoding: int, t: int, skipped: int) -> tuple[bool, int]:
        if n_decoding < self.budget_at(t):
            return False, skipped
        if skipped < self.schedule_delta:
            return False, skipped + 1
        return True, 0

    def plan_tensor(
        self, n_decoding: torch.Tensor, t: torch.Tensor, skipped: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        eligible = n_decoding[0, 0] >= self.budget_tensor(t)  # every pool of the layer holds as many
        select = eligible & (skipped >= self.schedule_delta)
        return select, torch.where(select, 0, torch.where(eligible, skipped + 1, skipped))


@dataclass(frozen=True)
class UnifiedH2O(DecodingStrategy):
    """Unified H2O baseline (H2O, Zhang et al., NeurIPS 2023, as the unified baseline of Wu et al., 2025; docs/method.md §7).

    One budget over the prompt's and the generated entries together: once a layer holds more
    than ``budget`` entries, keep the newest ``recent`` and the top ``budget - recent`` of all
    older entries (prompt included) by the current query's attention, which is SCOPE's score
    (softmax over the whole held context per query head, summed over the KV head's group).

    Parameters
    ----------
    budget : int
        Total entries kept per layer and KV head, the paper's ``C + B`` (e.g. ``2048 + 512``).
    recent : int
        Newest entries always kept.
    """

    spec_kind: ClassVar[str] = "unified-h2o"

    evicts_prompt: ClassVar[bool] = True


@dataclass(frozen=True)
class UnifiedStreamingLLM(UnifiedH2O):
    """Unified StreamingLLM baseline (Xiao et al., ICLR 2024, as the unified baseline of Wu et al., 2025; docs/method.md §7).

    One budget over prompt and generated entries: keep the first ``budget - recent`` entries
    (attention sinks and the start of the prompt) and the newest ``recent``.

    Parameters
    ----------
    budget : int
        Total entries kept per layer and KV head (``C + B``).
    recent : int
        Newest entries always kept.
    """

    spec_kind: ClassVar[str] = "unified-streamingllm"

    def score(self, step: AttentionStep, first: int, last: int) -> torch.Tensor:
        return -step.arrival_order(first, last).float()  # the earliest entries score highest
