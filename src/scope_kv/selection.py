"""Shared mechanics of heavy-hitter selection: scoring, choosing what goes, in-place compaction.

Every selection -- a decoding strategy's in either layout, a unified baseline's, a prefill
compressor's -- runs the same stages: a plan says how many entries each pool loses, and among
which (:class:`Plan`, stated by the layout from the strategy's schedule), a score ranks them,
:meth:`Plan.choose` chooses them by one rule (:func:`evicted`, or :func:`evicted_one` in the
one-entry case: the lowest scores go; among equal scores the newest goes first, docs/method.md
§9), and the layout applies the choice: the default layout compacts the kept entries
(:func:`compact_`, :func:`compact_kept_`), the static layout clears their validity bits
(:mod:`scope_kv.static`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .masks import causal_allowed

__all__ = [
    "Plan",
    "attention_scores",
    "causal_probs",
    "evicted",
    "evicted_one",
    "kept_slots",
    "select_heavy",
    "gather_",
    "compact_kept_",
    "compact_",
    "keep_top_",
]


@dataclass(frozen=True)
class Plan:
    """What one decode step's selection does, in either layout: score the region ``[first, end)``
    and evict ``count`` entries of each pool from it, among ``candidates``.

    A layout states it from the strategy's schedule and plan (on the host in the default layout,
    on the device in the static one); :meth:`choose` applies the one eviction rule to the
    strategy's scores, and the layout applies the choice.

    Attributes
    ----------
    first, end : int
        The region scored (``decoding.score(step, first, end)``), in slots of the layer's storage.
    count : int or Tensor
        Entries each pool loses: an int, or a tensor broadcastable to ``(batch, kv_heads)``.
    candidates : Tensor, optional
        ``(batch, kv_heads or 1, end - first)`` bool: the slots that may go (default all).
    arrival : Tensor, optional
        ``(batch, kv_heads, end - first)``: order of arrival, larger newer (default slot order).
    one : bool
        At most one entry goes per pool: the rule in reductions instead of sorts.
    fused : bool
        One kernel scores, chooses and applies (the default layout's ring at budget, with the
        strategy's default scores and the step's log-sum-exp): :meth:`choose` is not called.
    kept : tuple of int, optional
        Entries each batch row keeps, for a plan over each row's whole pool made on the host (the
        default layout's unified baselines): rows then keep different numbers, and the layout
        compacts them without a read from the device. ``None`` otherwise.
    """

    first: int
    end: int
    count: int | torch.Tensor
    candidates: torch.Tensor | None = None
    arrival: torch.Tensor | None = None
    one: bool = False
    fused: bool = False
    kept: tuple[int, ...] | None = None

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """``(batch, kv_heads, end - first)`` bool: the entries this plan evicts, given ``scores``."""
        if not self.one:
            return evicted(scores, self.count, self.candidates, self.arrival)
        gone = evicted_one(scores, self.candidates, self.arrival)
        return gone if isinstance(self.count, int) else gone & (self.count > 0)[..., None]


def attention_scores(
    query: torch.Tensor,
    keys: torch.Tensor,
    valid: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Softmax attention probabilities of the newest query, summed over each KV head's query group.

    Parameters
    ----------
    query : Tensor
        ``(batch, q_heads, q, dim)``; only the last query position is used.
    keys : Tensor
        ``(batch, kv_heads, length, dim)``: every key the step attended to.
    valid : Tensor or None
        Boolean ``(batch, length)``, or ``(batch, kv_heads, length)`` when it differs per KV head;
        invalid slots (padding) get probability 0.
    scaling : float
        The model's softmax scale.
    softcap : float, optional
        Logit soft-capping (Gemma 2 style), applied as the model applies it.

    Returns
    -------
    Tensor
        ``(batch, kv_heads, length)`` float32 scores; each query head's softmax is over the whole
        held context (docs/method.md §5), and a KV head's score is the sum over its query group
        (KV is stored per KV head, so this is the group's total attention to the entry).
    """
    batch, q_heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    q = query[:, :, -1, :].reshape(batch, kv_heads, q_heads // kv_heads, dim).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # (batch, kv_heads, group, length)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if valid is not None:
        rows = valid[:, None, None, :] if valid.dim() == 2 else valid[:, :, None, :]
        logits = logits.masked_fill(~rows, float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=2)


def causal_probs(
    query: torch.Tensor,
    keys: torch.Tensor,
    first_slot: int,
    start: torch.Tensor | None,
    scaling: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal softmax attention of a block of prompt queries over the held keys, in float32.

    Parameters
    ----------
    query : Tensor
        ``(batch, q_heads, q, dim)`` queries (post-RoPE) of the tokens held at slots
        ``[first_slot, first_slot + q)``.
    keys : Tensor
        ``(batch, kv_heads, length, dim)``.
    first_slot : int
        Slot of the first query; query ``i`` sees slots ``j <= first_slot + i`` (causal).
    start : Tensor or None
        ``(batch,)`` leading invalid slots per row; those keys get probability 0, and queries
        sitting on them (padding) get an all-zero row instead of NaN.
    scaling : float
        The model's softmax scale.
    softcap : float, optional
        Logit soft-capping, as the model applies it.

    Returns
    -------
    Tensor
        ``(batch, q_heads, q, length)`` probabilities. Memory is ``q x length`` per query head,
        so callers bound it by choosing ``q`` (H2O scores the prompt in blocks of queries).
    """
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = query.float().reshape(batch, kv_heads, group, q_len, dim)
    # (batch, kv_heads, 1, dim, length): every query head of a group shares its KV head's keys,
    # without materialising repeat_kv.
    logits = torch.matmul(q, keys.float()[:, :, None].transpose(-1, -2)) * scaling
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    allowed = causal_allowed(start, first_slot, q_len, length, batch, keys.device)[:, None, None]
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    probs = probs.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return probs.reshape(batch, q_heads, q_len, length)


def _newest_first(scores: torch.Tensor, arrival: torch.Tensor | None) -> torch.Tensor:
    """Slot indices ordered newest arrival first (``arrival=None``: slot order is arrival order)."""
    if arrival is None:
        n = scores.shape[-1]
        return torch.arange(n - 1, -1, -1, device=scores.device).expand(scores.shape)
    return torch.argsort(arrival, dim=-1, descending=True, stable=True)


def evicted(
    scores: torch.Tensor,
    count: torch.Tensor | int,
    candidates: torch.Tensor | None = None,
    arrival: torch.Tensor | None = None,
) -> torch.Tensor:
    """The ``count`` lowest-scored candidates of each pool: the entries a selection evicts.

    Parameters
    ----------
    scores : Tensor
        ``(batch, kv_heads, n)`` scores (higher is kept).
    count : Tensor or int
        Entries to evict per pool: an int, or a tensor broadcastable to ``(batch, kv_heads)``.
    candidates : Tensor, optional
        ``(batch, kv_heads, n)`` bool, or ``(batch, 1, n)``: the slots that may be evicted (default
        all). A pool never loses more than its candidates.
    arrival : Tensor, optional
        ``(batch, kv_heads, n)`` order of arrival (larger is newer); default: slot order.

    Returns
    -------
    Tensor
        ``(batch, kv_heads, n)`` bool. Among equal scores the newest entry goes first, so the older
        one stays (docs/method.md §9).
    """
    masked = _rank_keys(scores)
    if candidates is not None:  # NaN sorts after every number: the other slots rank last
        masked = masked.masked_fill(~candidates, float("nan"))
    # Order by arrival, newest first, then stably by score: equal scores keep newest-first order.
    by_arrival = _newest_first(masked, arrival)
    order = by_arrival.gather(-1, torch.argsort(masked.gather(-1, by_arrival), dim=-1, stable=True))
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order)
    )
    count = count[..., None] if isinstance(count, torch.Tensor) else count
    gone = rank < count
    return gone if candidates is None else gone & candidates


def evicted_one(
    scores: torch.Tensor, candidates: torch.Tensor | None = None, arrival: torch.Tensor | None = None
) -> torch.Tensor:
    """:func:`evicted` with ``count = 1`` (the same rule) in reductions instead of sorts: a pool at
    budget that grew by one entry loses one."""
    masked = _rank_keys(scores)
    if candidates is not None:  # above every candidate's key
        masked = masked.masked_fill(~candidates, float("inf"))
    pick = _lowest_newest(masked, arrival)
    gone = torch.zeros(masked.shape, dtype=torch.bool, device=masked.device).scatter_(-1, pick, True)
    return gone if candidates is None else gone & candidates.any(-1, keepdim=True)


def _rank_keys(scores: torch.Tensor) -> torch.Tensor:
    """Scores as the rule ranks them, all finite: NaN and +inf as the largest number (kept first,
    where a sort puts NaN), -inf as the lowest. A strategy's scorer may return any of them; the
    slots that are not candidates must still rank after every candidate, whatever it returned."""
    big = torch.finfo(torch.float32).max
    return torch.nan_to_num(scores.float(), nan=big, posinf=big, neginf=-big)


def _lowest_newest(scores: torch.Tensor, arrival: torch.Tensor | None = None) -> torch.Tensor:
    """``(batch, kv_heads, 1)`` slot of each pool's lowest score, the newest arrival among equals."""
    if arrival is None:  # slot order is arrival order: the last of the minima (argmin returns the first)
        return (scores.shape[-1] - 1) - scores.flip(-1).argmin(-1, keepdim=True)
    low = scores.amin(-1, keepdim=True)
    return torch.where(scores == low, arrival, arrival.new_full((), -(2**62))).argmax(-1, keepdim=True)


def kept_slots(gone: torch.Tensor, keep: int) -> torch.Tensor:
    """``(batch, kv_heads, keep)`` ascending indices of the slots :func:`evicted` left, when every
    pool keeps ``keep`` of them."""
    if keep == gone.shape[-1] - 1:  # one entry went: the others, in order, without a sort
        kept = torch.arange(keep, device=gone.device)
        return kept + (kept >= gone.to(torch.int8).argmax(-1, keepdim=True))
    return torch.argsort(gone.to(torch.uint8), dim=-1, stable=True)[..., :keep]


def select_heavy(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per ``(batch, kv_head)``, in ascending order.

    Parameters
    ----------
    scores : Tensor
        ``(batch, kv_heads, n)`` candidate scores, in arrival order.
    k : int
        How many to keep (``0 <= k <= n``).

    Returns
    -------
    Tensor
        ``(batch, kv_heads, k)`` int64 indices into the candidate axis, sorted ascending so the
        kept entries keep their order: what :func:`evicted` leaves of ``n - k`` evictions (among
        equal scores the older entry stays, docs/method.md §9).
    """
    n = scores.shape[-1]
    if k == n:
        return torch.arange(n, device=scores.device).expand(scores.shape)
    return kept_slots(evicted_one(scores) if k == n - 1 else evicted(scores, n - k), k)


def gather_(keys: torch.Tensor, values: torch.Tensor, start: int, end: int, index: torch.Tensor) -> int:
    """Rewrite slots ``[start, start + n)`` with the entries of ``[start, end)`` at ``index``, in place.

    Parameters
    ----------
    keys, values : Tensor
        ``(batch, kv_heads, capacity, dim)`` storage, modified in place.
    start, end : int
        The region read.
    index : Tensor
        ``(batch, kv_heads, n)`` int64 indices into the region. Keys and values move with the
        same indices, so every kept pair stays a pair.

    Returns
    -------
    int
        ``start + n``, the new end of the region.
    """
    new_end = start + index.shape[-1]
    for store in (keys, values):
        region = store[:, :, start:end]
        gathered = torch.gather(region, 2, index[..., None].expand(-1, -1, -1, store.shape[-1]))
        store[:, :, start:new_end].copy_(gathered)
    return new_end


def compact_(
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    end: int,
    heavy: torch.Tensor,
    recent: int,
) -> int:
    """Keep ``heavy`` candidates plus the newest ``recent`` entries of ``[start, end)``, in place.

    Only the decoding region is touched: one gather of at most ``end - start`` entries per
    head, written back at ``start``. Keys and values move with the same indices, so every
    kept pair stays a pair.

    Parameters
    ----------
    keys, values : Tensor
        ``(batch, kv_heads, capacity, dim)`` storage, modified in place.
    start, end : int
        The decoding region; candidates are ``[start, end - recent)``.
    heavy : Tensor
        ``(batch, kv_heads, k)`` ascending indices into the candidates.
    recent : int
        Newest entries always kept.

    Returns
    -------
    int
        The new end of the region, ``start + k + recent``.
    """
    batch, heads, _ = heavy.shape
    n = end - start
    tail = torch.arange(n - recent, n, device=heavy.device).expand(batch, heads, recent)
    index = torch.cat([heavy, tail], dim=-1)  # (batch, kv_heads, k + recent)
    return gather_(keys, values, start, end, index)


def keep_top_(
    keys: torch.Tensor,
    values: torch.Tensor,
    end: int,
    scores: torch.Tensor,
    counts: torch.Tensor,
    start: torch.Tensor,
    n: int | None = None,
) -> tuple[int, torch.Tensor]:
    """Keep, per batch row and KV head, the ``counts[b]`` best-scored valid slots of ``[0, end)``.

    Used wherever eviction reaches into the prompt: prefill compressors and the unified
    baselines. Rows may keep different numbers of entries, but the physical length must be
    one number for the whole batch, so the kept entries of row ``b`` go to the *end* of
    ``[0, n)`` with ``n = max(counts)``, and the ``n - counts[b]`` slots in front of them are
    invalid filler (masked by the layer's own attention mask, never scored, never counted).
    Kept entries keep their order. Ties are broken towards the lower slot (a stable sort), so
    the selection is deterministic and matches a brute-force reference.

    Parameters
    ----------
    keys, values : Tensor
        ``(batch, kv_heads, capacity, dim)`` storage, modified in place.
    end : int
        Slots ``[0, end)`` are candidates.
    scores : Tensor
        ``(batch, kv_heads, end)``: higher is kept first; ``+inf`` forces a slot to be kept.
    counts : Tensor
        ``(batch,)`` entries to keep per row, at most the row's valid slots.
    start : Tensor
        ``(batch,)`` leading invalid slots per row; they are never kept.
    n : int, optional
        ``max(counts)`` when the caller knows it on the host (else it is read from the device).

    Returns
    -------
    (n, new_start) : tuple[int, Tensor]
        The new physical length and the new ``(batch,)`` leading invalid slots, ``n - counts``.
    """
    valid = (torch.arange(end, device=scores.device)[None, :] >= start[:, None])[:, None, :]  # (batch, 1, end)
    gone = evicted(scores, (end - start - counts)[:, None], valid)
    return compact_kept_(keys, values, end, valid & ~gone, n)


def compact_kept_(
    keys: torch.Tensor, values: torch.Tensor, end: int, keep: torch.Tensor, n: int | None = None
) -> tuple[int, torch.Tensor]:
    """Move each pool's kept slots of ``[0, end)`` to the end of ``[0, n)``, in order, in place.

    Parameters
    ----------
    keys, values : Tensor
        ``(batch, kv_heads, capacity, dim)`` storage, modified in place.
    end : int
        Slots ``[0, end)`` are read.
    keep : Tensor
        ``(batch, kv_heads, end)`` bool; every KV head of a row keeps as many slots (rows may differ).
    n : int, optional
        The most any row keeps, when the caller knows it on the host (else read from the device).

    Returns
    -------
    (n, new_start) : tuple[int, Tensor]
        ``n``, the most any row keeps (the new physical length), and ``(batch,)`` the filler slots
        in front of each row's kept entries, ``n - kept``: invalid, masked by the layer.
    """
    counts = keep[:, 0].sum(-1)
    if n is None:
        n = int(counts.max())
    # kept slots sort last, in ascending order; the `n - counts` slots before them are filler
    index = torch.argsort(keep.to(torch.uint8), dim=-1, stable=True)[..., end - n :]
    gather_(keys, values, 0, end, index)
    return n, n - counts
