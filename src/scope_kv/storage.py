"""How a layer's K/V storage grows, shrinks and is handed to the attention.

Storage is ``(batch, kv_heads, capacity, dim)`` per tensor (keys and values may differ in width:
multi-head latent attention), written in place. Unbounded (``decoding=None``) layers grow by
:data:`GROWTH`, so appends cost O(1) amortised while at most a quarter of the storage sits unused.
Bounded strategies instead allocate ``prompt + max_held`` once at prefill: predictable memory, and
no transient copy of the whole buffer while decoding (a budget larger than the output reserves
slots never used).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["GROWTH", "MIN_GROWTH", "check_new_entries", "grown_capacity", "hand_out", "resized", "unseen_attention"]

GROWTH = 1.25
MIN_GROWTH = 128


class _CompressedCopy(torch.autograd.Function):
    """A copy of a compressing layer's held entries for an attention autograd records: the forward
    works as without autograd; the backward pass stops here with the reason (selection moves and
    evicts entries in place, which gradients cannot follow)."""

    @staticmethod
    def forward(ctx: Any, held: torch.Tensor) -> torch.Tensor:
        return held.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(
            "backward through a compressing ScopeCache: selection moves and evicts cached entries in place, "
            "which gradients cannot follow. Run the forward under torch.no_grad() or torch.inference_mode() "
            "(generate does); to backpropagate through a cache, use ScopeCache(model) without compression, "
            "or DynamicCache."
        )


def hand_out(
    keys: torch.Tensor, values: torch.Tensor, length: int, differentiable: bool, compressing: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The held slots ``[0, length)`` for a forward's attention: views of the storage, or, when
    autograd records the forward, copies -- the storage is written in place by later steps, which
    would invalidate what the attention saved for the backward pass. Uncompressed, gradients are then
    those of ``DynamicCache``; a compressing layer's copies refuse the backward pass with the reason,
    while forwards without it work."""
    keys, values = keys[:, :, :length], values[:, :, :length]
    if differentiable and torch.is_grad_enabled():
        if compressing:
            return _CompressedCopy.apply(keys), _CompressedCopy.apply(values)
        return keys.clone(), values.clone()
    return keys, values


def resized(keys: torch.Tensor, values: torch.Tensor, length: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """New storage of ``capacity`` slots holding the first ``length`` slots of ``keys`` / ``values``
    (one copy)."""
    new_keys = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
    new_values = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
    new_keys[:, :, :length].copy_(keys[:, :, :length])
    new_values[:, :, :length].copy_(values[:, :, :length])
    return new_keys, new_values


def grown_capacity(needed: int, capacity: int, bounded: bool) -> int:
    """The capacity to allocate for ``needed`` slots: exactly that for a bounded layer, else with
    room to grow (:data:`GROWTH`, at least :data:`MIN_GROWTH` slots more)."""
    if bounded:
        return needed
    return max(needed, math.ceil(capacity * GROWTH), capacity + MIN_GROWTH)


def unseen_attention(layer_idx: int) -> RuntimeError:
    """The error for a layer whose previous forward stored keys but never attended through scope_kv."""
    return RuntimeError(
        f"layer {layer_idx}: the previous forward stored keys here but its attention never went "
        "through transformers' AttentionInterface, so ScopeCache could not see it. Either the model "
        "computes this layer's attention in its own code (such models are not supported: use "
        "DynamicCache), or the cache was built for another model or before its attn_implementation "
        "was changed (build one ScopeCache(model) per model and generate call)."
    )


def check_new_entries(layer_idx: int, keys: torch.Tensor, key_states: torch.Tensor) -> None:
    """Refuse new entries of another batch, head count or width than the ``keys`` a layer holds."""
    expected = (keys.shape[0], keys.shape[1], keys.shape[-1])
    got = (key_states.shape[0], key_states.shape[1], key_states.shape[-1])
    if got != expected:
        raise ValueError(
            f"layer {layer_idx}: got key states (batch, kv_heads, dim) = {got} but this cache holds "
            f"{expected}. A ScopeCache belongs to one model and one batch: build a new one (or call "
            "cache.reset()) for another model or batch."
        )
