"""Brute-force references for the prefill compressors and unified baselines, written from the
papers' definitions with explicit loops over heads and queries, in float64, for one unpadded
batch row. Nothing here is imported from scope_kv. Ties go to the lower position."""

from __future__ import annotations

import math

import torch


def _top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))[:k])


def causal_row(q: torch.Tensor, k: torch.Tensor, i: int, scale: float) -> torch.Tensor:
    """Softmax of query q (dim,) over keys k[: i + 1] (query at position i)."""
    logits = torch.stack([torch.dot(q, k[j]) * scale for j in range(i + 1)])
    return torch.softmax(logits, dim=0)


def snapkv(q, k, budget, window, kernel, pooling, scale):
    """q (q_heads, n, dim), k (kv_heads, n, dim) -> kept positions per KV head (SnapKV, Li et al. 2024):
    window queries' attention summed per head, pooled over positions, summed over the group,
    top (budget - window) of the prefix, plus the window."""
    q, k = q.double(), k.double()
    q_heads, n, _ = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    if n <= budget:
        return [list(range(n)) for _ in range(kv_heads)]
    prefix = n - window
    kept = []
    for kv in range(kv_heads):
        total = torch.zeros(prefix, dtype=torch.float64)
        for h in range(kv * group, (kv + 1) * group):
            summed = torch.zeros(prefix, dtype=torch.float64)
            for i in range(prefix, n):
                summed += causal_row(q[h, i], k[kv], i, scale)[:prefix]
            half = kernel // 2
            pooled = torch.empty(prefix, dtype=torch.float64)
            for j in range(prefix):
                neighbours = summed[max(0, j - half) : j + half + 1]
                # avg pooling counts the zero padding at the borders (kernel in the denominator)
                pooled[j] = neighbours.max() if pooling == "max" else neighbours.sum() / kernel
            total += pooled
        kept.append(_top(total, budget - window) + list(range(prefix, n)))
    return kept


def pyramid_budget(budget, window, beta, n, layer, layers):
    """PyramidKV (Cai et al. 2024) entries kept by `layer` for an n-token prompt, published arithmetic."""
    if n < budget:
        return n
    if n < 2 * (budget - window):
        return budget
    low = (budget - window) // beta
    high = 2 * (budget - window) - low
    if high >= n - window:
        high = n - window
        low = 2 * (budget - window) - high
    step = (high - low) // (layers - 1)
    return high - layer * step + window


def h2o(q, k, budget, recent, scale):
    """H2O (Zhang et al. 2023) prefill: every query's causal attention accumulated per key (the full
    n x n matrix), summed over the group; newest `recent` plus top (budget - recent) of the rest."""
    q, k = q.double(), k.double()
    q_heads, n, _ = q.shape
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    if n <= budget:
        return [list(range(n)) for _ in range(kv_heads)]
    kept = []
    for kv in range(kv_heads):
        total = torch.zeros(n, dtype=torch.float64)
        for h in range(kv * group, (kv + 1) * group):
            for i in range(n):
                total[: i + 1] += causal_row(q[h, i], k[kv], i, scale)
        kept.append(_top(total[: n - recent], budget - recent) + list(range(n - recent, n)))
    return kept


def streaming(n, budget, sinks, kv_heads):
    """StreamingLLM (Xiao et al. 2024): attention sinks plus the most recent tokens."""
    if n <= budget:
        return [list(range(n)) for _ in range(kv_heads)]
    return [list(range(sinks)) + list(range(n - (budget - sinks), n)) for _ in range(kv_heads)]


def unified_h2o_step(q, k, held, budget, recent, scale):
    """One unified-H2O step (docs/method.md §7): `held` lists, per KV head, the positions held after
    appending this step's entry. Returns the new lists."""
    q, k = q.double(), k.double()
    q_heads = q.shape[0]
    kv_heads = k.shape[0]
    group = q_heads // kv_heads
    out = []
    for kv in range(kv_heads):
        positions = held[kv]
        if len(positions) <= budget:
            out.append(list(positions))
            continue
        score = torch.zeros(len(positions), dtype=torch.float64)
        for h in range(kv * group, (kv + 1) * group):
            logits = torch.stack([torch.dot(q[h], k[kv, p]) * scale for p in positions])
            score += torch.softmax(logits, dim=0)
        older = len(positions) - recent
        chosen = _top(score[:older], budget - recent)
        out.append([positions[i] for i in chosen] + positions[older:])
    return out


def default_scale(dim: int) -> float:
    return 1.0 / math.sqrt(dim)
