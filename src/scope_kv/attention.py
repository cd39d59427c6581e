"""The scope-aware attention function, registered with transformers' attention interface.

`ScopeCache(model)` switches the model's ``attn_implementation`` from ``X`` to ``scope_X``
(``X`` in sdpa / eager / flash_attention_2 / flash_attention_3). The ``scope_X`` function runs
``X`` unchanged and, when the keys it receives come from a :class:`~scope_kv.cache.ScopeLayer`,
hands the step's query to that layer so it can score and select *after* the attention (the
step attends to the pool before eviction, SCOPE_SPEC §3). For any other cache it is a pure
pass-through, so a model set up once still works, token for token, with ``DynamicCache``.

Registering named functions is transformers' extension mechanism (the registries are
process-wide); it happens when the first ScopeCache is built, never at import, and is
idempotent. The functions hold no state.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .kernels import grouped_decode_attention

__all__ = ["PREFIX", "SUPPORTED_BACKENDS", "enable_scope_attention"]

PREFIX = "scope_"
SUPPORTED_BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


def _eager_function(module: torch.nn.Module) -> Callable[..., Any]:
    # "eager" is not in the registry: each modeling file defines its own (softcapping, sinks...).
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file; "
            "load the model with attn_implementation='sdpa'."
        )
    return fn


def _physical_flash_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Flash attention's 2-D padding mask, sliced as ``[kv_offset, kv_offset + kv_length)``.

    transformers' own version slices from the right, which for ScopeCache (physical length
    shorter than the logical mask) would drop the pad columns at the front. For every stock
    cache both slicings coincide.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, kv_offset : kv_offset + kv_length]
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


def _make_attention(backend: str) -> Callable[..., Any]:
    def scope_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = getattr(key, "_scope_layer", None)
        if layer is not None and layer.own_mask:
            # Once prefill compression or a unified baseline has evicted prompt entries, rows keep
            # different numbers of pads (or filler) and layers different lengths (PyramidKV), so the
            # mask transformers built no longer describes this layer's slots: the layer supplies its
            # own, in this backend's format.
            attention_mask = layer.attention_mask_for(backend, query.shape[2], query.dtype)
        if layer is not None and backend == "sdpa" and _fast_decode(layer, module, query, attention_mask, kwargs):
            # Decode fast path (scope_kv.kernels): one grouped attention call that also returns the
            # log-sum-exp, from which the layer scores its candidates in O(budget).
            scaling = kwargs.get("scaling")
            scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
            output, lse = grouped_decode_attention(query, key, value, attention_mask, scaling)
            layer.after_attention(module, query, key, attention_mask, scaling, None, lse=lse)
            return output, None
        base = _eager_function(module) if backend == "eager" else ALL_ATTENTION_FUNCTIONS[backend]
        output = base(module, query, key, value, attention_mask, **kwargs)
        if layer is not None:
            layer.after_attention(
                module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap")
            )
        return output

    scope_attention.__name__ = f"{PREFIX}{backend}_attention"
    return scope_attention


def _fast_decode(layer: Any, module: torch.nn.Module, query: torch.Tensor, attention_mask: Any, kwargs: dict) -> bool:
    """Whether this step can take the grouped decode path: a ScopeLayer decode step (one query
    token) with plain softmax attention (no soft-capping, sinks, window or dropout) and no mask or
    a boolean one. ``layer.fast_decode``: None = on for CUDA tensors, True/False forces it."""
    wanted = layer.fast_decode if layer.fast_decode is not None else query.is_cuda
    return (
        wanted
        and query.shape[2] == 1
        and layer._decode_pending
        and kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and not (module.training and kwargs.get("dropout", 0.0))
        and getattr(module, "sinks", None) is None
        and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4))
    )


def _scope_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' sdpa mask, except that one new token with no padding and every held slot
    behind it gets no mask even while tracing or capturing a CUDA graph (transformers then
    materialises an all-True mask, which costs a mask build and the slower masked kernel per
    layer). Exact for any cache: every slot is visible to the query."""
    if (
        attention_mask is None
        and q_length == 1
        and isinstance(q_offset, int)
        and kv_offset + kv_length - 1 <= q_offset
        and mask_function is causal_mask_function
        and local_size is None
    ):
        return None
    return sdpa_mask(
        batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
        attention_mask=attention_mask, local_size=local_size, **kwargs,
    )


def _mask_function(backend: str) -> Callable[..., Any]:
    if backend == "sdpa":
        return _scope_sdpa_mask
    if backend == "eager":
        return eager_mask
    return _physical_flash_mask


def _register(backend: str) -> str:
    name = PREFIX + backend
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_attention(backend))
        AttentionMaskInterface.register(name, _mask_function(backend))
    return name


def enable_scope_attention(model: torch.nn.Module) -> str:
    """Route ``model``'s attention through scope_kv's function; returns the implementation name.

    Raises
    ------
    ValueError
        If the model's backend is not supported, or the model does not dispatch attention
        through transformers' ``AttentionInterface`` (then SCOPE could never select).
    """
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return current
    if current not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"attn_implementation={current!r} is not supported by scope_kv; load the model with "
            f"attn_implementation= one of {SUPPORTED_BACKENDS}."
        )
    name = _register(current)
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ValueError(
            f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
            "so scope_kv cannot see its queries. Only models whose attention calls "
            "ALL_ATTENTION_FUNCTIONS.get_interface(...) are supported."
        )
    return name
