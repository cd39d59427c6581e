"""Decode attention that returns its log-sum-exp, and SCOPE's candidate scores from it.

Grouped decode attention lays the ``G = q_heads / kv_heads`` queries of a KV head out as ``G`` query
rows of that KV head: one call over ``(batch, kv_heads, G, dim)`` reads each cached K/V once and
returns the per-head log-sum-exp, from which a candidate's score is ``exp(s * q.k - m)``: O(budget)
work per head instead of a second pass over the prompt (docs/method.md §5). On CUDA it runs the
split-KV Triton kernels (also as the ``scope_kv::split_kv_decode_attention`` operator, which a
compiled step calls) or PyTorch's flash / memory-efficient kernels; the plain-torch reference runs
elsewhere and is what the tests compare with.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ..masks import additive_key_bias, decode_key_mask, slot_validity_bytes
from ._device import on_device, triton_available


# -- grouped decode attention -------------------------------------------------------------
def _grouped_query(query: torch.Tensor, kv_heads: int) -> torch.Tensor:
    batch, q_heads, q_len, dim = query.shape
    if q_len != 1 or q_heads % kv_heads:
        raise ValueError(
            f"grouped decode attention needs one query token and q_heads % kv_heads == 0, got "
            f"query {tuple(query.shape)} and {kv_heads} KV heads."
        )
    return query.reshape(batch, kv_heads, q_heads // kv_heads, dim)


def grouped_decode_attention_reference(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch (float32) decode attention with its log-sum-exp.

    Parameters
    ----------
    query : Tensor
        ``(batch, q_heads, 1, dim)``, post-RoPE.
    keys, values : Tensor
        ``(batch, kv_heads, length, dim)``.
    attention_mask : Tensor or None
        Boolean ``(batch or 1, 1 or q_heads, 1, length)`` (True = attend), as transformers' sdpa
        mask (per query head when a static-layout layer's slots differ per KV head).
    scaling : float
        Softmax scale.

    Returns
    -------
    (output, lse) : tuple[Tensor, Tensor]
        ``(batch, 1, q_heads, dim)`` in the query's dtype (the layout transformers' attention
        functions return) and ``(batch, q_heads)`` float32 natural-log log-sum-exp of the scaled
        logits over the attended keys.
    """
    batch, q_heads, _, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    q = _grouped_query(query, kv_heads).float()
    logits = torch.matmul(q, keys.float().transpose(-1, -2)) * scaling  # (batch, kv_heads, group, length)
    mask = decode_key_mask(attention_mask, length, kv_heads)
    if mask is not None:
        logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.matmul(torch.exp(logits - lse[..., None]), values.float())
    return out.to(query.dtype).reshape(batch, 1, q_heads, dim), lse.reshape(batch, q_heads)


def _fused_supported(query: torch.Tensor, keys: torch.Tensor) -> bool:
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and keys.dtype == query.dtype
        and query.shape[-1] % 8 == 0
        and query.shape[-1] <= 256
        and keys.stride(-1) == 1
        and query.stride(-1) == 1
    )


def grouped_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    kernel: str = "auto",
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention with its log-sum-exp; see :func:`grouped_decode_attention_reference`.

    On CUDA (fp16/bf16) this is either the split-KV Triton kernel
    (:func:`split_kv_decode_attention`) or one call of PyTorch's flash kernel (no mask) /
    memory-efficient kernel (boolean mask, as an additive bias) over ``(batch, kv_heads, group,
    dim)`` queries; elsewhere it is the reference.

    Parameters
    ----------
    kernel : str
        ``"auto"``: split-KV for a static-layout step (``splits`` given) or when the batch has at
        least ``_SPLIT_KV_ROWS`` (row, KV head) pairs -- where two extra launches per layer cost
        less than the bandwidth they win; PyTorch's kernels otherwise (eager decoding at small
        batches is bound by the host's launches) and always while torch.compile traces the step.
        ``"split_kv"`` / ``"aten"`` force one (outside torch.compile).
    splits : int, optional
        Chunks per (row, KV head) for the split-KV kernel.
    """
    if not _fused_supported(query, keys):
        return grouped_decode_attention_reference(query, keys, values, attention_mask, scaling)
    batch, q_heads, _, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    if kernel not in ("auto", "split_kv", "aten"):
        raise ValueError(f"kernel must be 'auto', 'split_kv' or 'aten', got {kernel!r}.")
    use_split = kernel == "split_kv" or (
        kernel == "auto" and (splits is not None or batch * kv_heads >= _SPLIT_KV_ROWS)
    )
    if use_split and triton_available() and _split_kv_supported(query, keys, values):
        if torch.compiler.is_compiling():
            # Traced: through the custom operator, which torch.compile keeps opaque (its CUDA-graph
            # backend in torch 2.11 cannot take a user-defined Triton kernel traced inline).
            if splits is None:
                splits = default_splits(batch, kv_heads, length, keys.device)
            out, lse = torch.ops.scope_kv.split_kv_decode_attention(
                query, keys, values, attention_mask, scaling, splits
            )
            return out, lse
        return split_kv_decode_attention(query, keys, values, attention_mask, scaling, splits)
    q = _grouped_query(query, kv_heads)
    group = q.shape[2]
    mask = None if attention_mask is None else decode_key_mask(attention_mask, length, kv_heads)
    if mask is None:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q, keys, values, 0.0, False, False, scale=scaling
        )[:2]
    else:
        bias = additive_key_bias(mask, batch, kv_heads, group, query.dtype)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, keys, values, bias, True, 0.0, False, scale=scaling
        )[:2]
        lse = lse[..., :group]
    return out.reshape(batch, 1, q_heads, dim), lse.reshape(batch, q_heads)


# (row, KV head) pairs from which eager decoding takes the split-KV kernel (Llama-3-8B: batch 32)
_SPLIT_KV_ROWS = 256


def default_splits(batch: int, kv_heads: int, length: int, device: torch.device) -> int:
    """Chunks per (row, KV head) for about two split-KV programs per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    return max(1, min(-(-2 * sms // (batch * kv_heads)), -(-length // 256)))


def split_kv_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-KV ("flash-decoding") decode attention in Triton; same contract as
    :func:`grouped_decode_attention_reference`.

    Each (row, KV head) reads its keys in ``splits`` chunks on different programs, so the GPU's
    memory bandwidth is used even at batch 1 (one program per head would leave most
    multiprocessors idle), and a per-KV-head validity mask (the static layout's) costs one byte
    per slot. A second small kernel merges the chunks' partial softmaxes.

    Parameters
    ----------
    splits : int, optional
        Chunks per (row, KV head); by default enough for about two programs per multiprocessor.
    """
    import triton

    batch, q_heads, _, dim = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    q = query.reshape(batch, q_heads, dim)
    mask = slot_validity_bytes(attention_mask, batch, length, kv_heads)
    block = 64
    if splits is None:
        splits = default_splits(batch, kv_heads, length, keys.device)
    per_split = -(-length // splits)  # ceil(length / splits)
    chunk = -(-per_split // block) * block  # rounded up to whole blocks
    splits = -(-length // chunk)
    group_pad = max(16, triton.next_power_of_2(group))
    rows = batch * kv_heads
    m = torch.empty((rows, splits, group_pad), dtype=torch.float32, device=keys.device)
    lsum = torch.empty_like(m)
    acc = torch.empty((rows, splits, group_pad, dim), dtype=torch.float32, device=keys.device)
    out = torch.empty((batch, q_heads, dim), dtype=query.dtype, device=keys.device)
    lse = torch.empty((batch, q_heads), dtype=torch.float32, device=keys.device)
    partial, combine = _split_kv_kernels()
    valid_arg = mask if mask is not None else m

    def launch() -> None:
        partial[(rows, splits)](
            q,
            keys,
            values,
            valid_arg,
            m,
            lsum,
            acc,
            length,
            chunk,
            float(scaling),
            kv_heads,
            q.stride(0),
            q.stride(1),
            keys.stride(0),
            keys.stride(1),
            keys.stride(2),
            values.stride(0),
            values.stride(1),
            values.stride(2),
            mask.stride(0) if mask is not None else 0,
            mask.stride(1) if mask is not None else 0,
            GROUP=group,
            GROUP_PAD=group_pad,
            DIM=dim,
            BLOCK=block,
            SPLITS=splits,
            HAS_VALID=mask is not None,
        )
        combine[(rows,)](m, lsum, acc, out, lse, GROUP=group, GROUP_PAD=group_pad, DIM=dim, SPLITS=splits)

    with on_device(keys):  # (a compiled step calls this through the operator below, never traced)
        launch()
    return out.reshape(batch, 1, q_heads, dim), lse


# The split-KV kernels as one PyTorch operator, so that a compiled decode step can call them: the
# compiler sees an opaque call with the output shapes below and captures its launches as they are.
# Defined here, in this package's own operator namespace (nothing of torch's or transformers' is
# changed).
@torch.library.custom_op("scope_kv::split_kv_decode_attention", mutates_args=())
def _split_kv_operator(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = split_kv_decode_attention(query, keys, values, attention_mask, scaling, splits)
    return out.contiguous(), lse


@_split_kv_operator.register_fake
def _split_kv_operator_shapes(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    splits: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, q_heads, _, dim = query.shape
    return query.new_empty((batch, 1, q_heads, dim)), query.new_empty((batch, q_heads), dtype=torch.float32)


def _split_kv_supported(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    dim = query.shape[-1]
    return (
        keys.stride(-1) == 1
        and values.stride(-1) == 1
        and query.is_contiguous()
        and not dim & (dim - 1)
        and 16 <= dim <= 256
        and query.shape[1] % keys.shape[1] == 0
        and keys.dtype == values.dtype == query.dtype
        and keys.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


@functools.cache
def _split_kv_kernels() -> tuple[Any, Any]:
    from .. import _triton_kernels

    return _triton_kernels.split_kv_partial_kernel, _triton_kernels.split_kv_combine_kernel


# -- candidate scores ---------------------------------------------------------------------
def candidate_scores(query: torch.Tensor, candidates: torch.Tensor, lse: torch.Tensor, scaling: float) -> torch.Tensor:
    """SCOPE scores of candidate entries from the step's log-sum-exp (plain torch, any device).

    Parameters
    ----------
    query : Tensor
        ``(batch, q_heads, 1, dim)``.
    candidates : Tensor
        ``(batch, kv_heads, n, dim)`` keys of the candidates.
    lse : Tensor
        ``(batch, q_heads)`` float32 log-sum-exp of the step's scaled logits over the whole
        attended context.
    scaling : float
        Softmax scale.

    Returns
    -------
    Tensor
        ``(batch, kv_heads, n)`` float32: each candidate's softmax probability (over the whole
        context) summed over the KV head's query group -- what
        :func:`scope_kv.selection.attention_scores` gives for these slots.
    """
    batch, kv_heads = candidates.shape[:2]
    q = _grouped_query(query, kv_heads).float()
    logits = torch.matmul(q, candidates.float().transpose(-1, -2)) * scaling
    return torch.exp(logits - lse.reshape(batch, kv_heads, -1, 1)).sum(dim=2)
