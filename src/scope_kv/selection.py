"""Shared mechanics of heavy-hitter selection: scoring, top-k and in-place compaction.

Every decoding strategy uses these; none re-implements them (STYLE principle 1).
"""

from __future__ import annotations

import torch

__all__ = ["valid_keys", "attention_scores", "select_heavy", "compact_"]


def valid_keys(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor | None:
    """Which key slots the step's last query may attend to, from the mask transformers built.

    Parameters
    ----------
    attention_mask : Tensor or None
        Whatever the model passed to its attention function: ``None``; a boolean
        ``(batch or 1, heads or 1, q, kv)`` mask (sdpa); an additive float mask of the same shape
        (eager); or a 2-D ``(batch, kv)`` padding mask (flash attention).
    batch, length : int
        Batch size and number of key slots held.

    Returns
    -------
    Tensor or None
        Boolean ``(batch, length)``, or ``None`` when every slot is valid.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        mask = attention_mask[:, :length].to(device=device, dtype=torch.bool)
    elif attention_mask.dim() == 4:
        row = attention_mask[:, 0, -1, :length]
        if row.dtype == torch.bool:
            mask = row
        else:
            mask = row > torch.finfo(row.dtype).min / 2
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    return mask.expand(batch, length).to(device)


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
        Boolean ``(batch, length)``; invalid slots (padding) get probability 0.
    scaling : float
        The model's softmax scale.
    softcap : float, optional
        Logit soft-capping (Gemma 2 style), applied as the model applies it.

    Returns
    -------
    Tensor
        ``(batch, kv_heads, length)`` float32 scores; each query head's softmax is over the whole
        held context (SCOPE_SPEC §3), and a KV head's score is the sum over its query group
        (KV is stored per KV head, so this is the group's total attention to the entry).
    """
    batch, q_heads, _, dim = query.shape
    kv_heads = keys.shape[1]
    q = query[:, :, -1, :].reshape(batch, kv_heads, q_heads // kv_heads, dim).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # (batch, kv_heads, group, length)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if valid is not None:
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1).sum(dim=2)


def select_heavy(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores per ``(batch, kv_head)``, in ascending order.

    Parameters
    ----------
    scores : Tensor
        ``(batch, kv_heads, n)`` candidate scores.
    k : int
        How many to keep (``0 <= k <= n``).

    Returns
    -------
    Tensor
        ``(batch, kv_heads, k)`` int64 indices into the candidate axis, sorted ascending so the
        kept entries keep their order.
    """
    if k == 0:
        return scores.new_empty((*scores.shape[:2], 0), dtype=torch.long)
    return torch.topk(scores, k, dim=-1, sorted=False).indices.sort(dim=-1).values


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
    batch, heads, k = heavy.shape
    n = end - start
    tail = torch.arange(n - recent, n, device=heavy.device).expand(batch, heads, recent)
    index = torch.cat([heavy, tail], dim=-1)  # (batch, kv_heads, k + recent)
    new_end = start + k + recent
    for store in (keys, values):
        region = store[:, :, start:end]
        gathered = torch.gather(region, 2, index[..., None].expand(-1, -1, -1, store.shape[-1]))
        store[:, :, start:new_end].copy_(gathered)
    return new_end
