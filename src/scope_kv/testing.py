"""Drive a :class:`~scope_kv.layer.ScopeLayer` without a model, exactly as the attention function does.

Unit tests, oracles and benchmarks use these instead of writing a layer's private fields::

    layer = ScopeLayer(0, Slide(8, 4), frozenset({id(module)}))
    keys, values = layer.update(k, v)          # a prefill forward's entries
    attend(layer, module, q)                    # ... and its attention
    keys, values = layer.update(k1, v1)        # one decode step
    attend(layer, module, q1)                   # plan, score, select, compact

To start deep into a generation, :meth:`ScopeLayer.load_state` puts a layer into the state a
prefill and many decode steps leave.
"""

from __future__ import annotations

import torch

from .layer import ScopeLayer
from .step import AttentionStep

__all__ = ["attend"]


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
