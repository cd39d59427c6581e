"""Drive a :class:`~scope_kv.layer.ScopeLayer` without a model, exactly as the attention function does.

Unit tests, oracles and benchmarks use these instead of writing a layer's private fields::

    layer = ScopeLayer(0, Slide(8, 4), frozenset({id(module)}))
    keys, values = layer.update(k, v)          # a prefill forward's entries
    attend(layer, module, q)                    # ... and its attention
    keys, values = layer.update(k1, v1)        # one decode step
    attend(layer, module, q1)                   # plan, score, select, compact

To start deep into a generation, :func:`load_state` puts a layer into the state a
prefill and many decode steps leave.
"""

from __future__ import annotations

import torch

from .layer import ScopeLayer
from .step import AttentionStep

__all__ = ["attend", "load_state"]


def attend(
    layer: ScopeLayer,
    module: torch.nn.Module,
    query: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scaling: float | None = None,
    softcap: float | None = None,
    lse: torch.Tensor | None = None,
    backend: str = "sdpa",
) -> AttentionStep:
    """Hand ``layer`` the attention of the forward its last :meth:`~ScopeLayer.update` began.

    Builds the :class:`~scope_kv.step.AttentionStep` the scope attention function would build
    (the layer's own mask once it has one, else ``mask``) and runs
    :meth:`~ScopeLayer.after_attention`. The attention output itself is not computed.

    Parameters
    ----------
    layer : ScopeLayer
        A layer whose ``update`` ran for this forward.
    module : nn.Module
        Stands for the attention module (its ``id`` must be one the layer was built with).
    query : Tensor
        ``(batch, q_heads, q, dim)`` the forward's queries.
    mask : Tensor or None
        The mask transformers would have built, in ``backend``'s format.
    scaling : float, optional
        Softmax scale (``dim ** -0.5`` by default).
    softcap : float, optional
        Logit soft-capping.
    lse : Tensor, optional
        ``(batch, q_heads)`` float32 log-sum-exp of a decode step's attention (what the grouped
        decode attention returns); with it the layer takes its fast paths.
    backend : str
        The attention backend whose mask format is used.

    Returns
    -------
    AttentionStep
        The record handed to the layer.
    """
    keys = layer.attending
    if keys is None:
        raise RuntimeError("attend() follows a layer.update(...) whose attention has not run yet.")
    step = layer.open_step(module, query, keys, layer.values[:, :, : layer.length], mask, backend, scaling, softcap)
    if lse is not None:
        step = step.with_lse(lse)
    layer.after_attention(step)
    return step


def load_state(
    layer: ScopeLayer,
    keys: torch.Tensor,
    values: torch.Tensor,
    *,
    prefill_length: int,
    seen: int | None = None,
    step: int = 0,
    skipped: int = 0,
) -> None:
    """Put the empty ``layer`` into the state a prefill and ``step`` decode steps leave it in.

    For benchmarks and tests that need a layer deep into a generation without running every
    step (e.g. the decode step at 4K generated tokens). Storage is reserved as a real prefill
    reserves it (``prompt + max_held`` for a bounded strategy).

    Parameters
    ----------
    layer : ScopeLayer
        A layer that holds nothing yet (new, or after ``reset()``).
    keys, values : Tensor
        ``(batch, kv_heads, held, dim)``: the prefill pool's ``prefill_length`` entries, then the
        decoding pool in arrival order.
    prefill_length : int
        Entries of the prefill pool (the prompt, or what a compressor left of it).
    seen : int, optional
        Logical tokens processed (default ``held``; more when entries were evicted).
    step : int
        Decode steps completed (SCOPE's ``t``).
    skipped : int
        The discontinuous skip counter.

    Raises
    ------
    ValueError
        If the layer is not empty, or the state is one the layer's strategy cannot be in.
    """
    if layer.length:
        raise ValueError(f"layer {layer.layer_idx}: load_state needs an empty layer; call reset() first.")
    if keys.shape != values.shape or keys.dim() != 4:
        raise ValueError(
            f"keys and values must both be (batch, kv_heads, held, dim), got {tuple(keys.shape)} "
            f"and {tuple(values.shape)}."
        )
    held = keys.shape[-2]
    n_decoding = held - prefill_length
    seen = held if seen is None else seen
    if not 0 < prefill_length <= held:
        raise ValueError(f"prefill_length must be in [1, held={held}], got {prefill_length}.")
    if seen < held or step < 0 or skipped < 0:
        raise ValueError(f"need seen >= held ({seen} < {held}?), step >= 0 and skipped >= 0.")
    if layer.decoding is not None:
        if layer.decoding.evicts_prompt or layer.prefill is not None:
            raise ValueError(
                "load_state supports SCOPE's strategies on a whole prefill pool (no prefill "
                "compressor, no unified baseline)."
            )
        limit = min(step, layer.decoding.budget_at(max(step - 1, 0)) + layer.decoding.slack)
        if n_decoding > limit:
            raise ValueError(
                f"a decoding pool of {n_decoding} entries exceeds what {layer.decoding.describe()} "
                f"holds after step {step} ({limit})."
            )
    layer.lazy_initialization(keys, values)
    # room for the next step: a bounded strategy reserves all it will ever hold
    layer.reserve(held + 1 if layer.decoding is None else prefill_length + layer.decoding.max_held)
    layer.keys[:, :, :held].copy_(keys)
    layer.values[:, :, :held].copy_(values)
    layer.length, layer.prefill_length, layer.seen = held, prefill_length, seen
    layer.step, layer.skipped = step, skipped
