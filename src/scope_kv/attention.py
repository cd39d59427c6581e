"""The scope-aware attention function, registered with transformers' attention interface.

`ScopeCache(model)` switches the model's ``attn_implementation`` from ``X`` to ``scope_X``
(``X`` in :data:`SUPPORTED_BACKENDS`: sdpa, eager, flash_attention_2/3/4). For a managed layer the
``scope_X`` function runs ``X`` over the layer's held slots (with the layer's own mask once
prompt entries were evicted), then hands the layer one :class:`~scope_kv.step.AttentionStep`
so it can score and select *after* the attention: the step attends to the pool before
eviction (docs/method.md §3). For any other cache it is a pure pass-through, so a model set up
once still works, token for token, with ``DynamicCache``.

How the function finds its layer: transformers passes an attention function the module, the
tensors and the attention module's ``**kwargs``, but not the cache. A forward pre-hook on each
attention module (:func:`_route_layer`) reads the cache from that call's own arguments and
adds the module's :class:`~scope_kv.layer.ScopeLayer` to the kwargs under :data:`LAYER_KWARG`;
transformers forwards those kwargs to the attention function unchanged. The hook holds no
state and does nothing for any other cache. It relies on one fact about transformers' decoder
layers -- they call the attention module with the cache as a keyword argument -- which
``tests/test_attention.py`` checks on every architecture tested.

Flash-attention backends run transformers' own flash wrapper and ``_flash_attention_forward``
(which picks the kernel, and unpads into the varlen kernel when given a 2-D mask). They return
no attention weights, so selection scores come from one float32 pass over the held keys. Their
mask is 2-D ``(batch, length)`` in physical slots or ``None``: transformers' padding mask sliced
as ``[0, length)`` (``masks._physical_flash_mask``) until prompt entries are evicted, then the
layer's own int32 mask (``None`` when every slot is valid); causality is the kernel's,
bottom-right aligned, which puts the queries at the last slots as the layer holds them.

Registering named functions is transformers' extension mechanism (the registries are
process-wide); it happens when the first ScopeCache is built, never at import, and is
idempotent. The functions hold no state.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .compat import cache_argument, set_attention_implementation, warn_if_untested
from .kernels import grouped_decode_attention
from .masks import BACKEND_PREFIX, is_flash_backend, transformers_mask_function

__all__ = ["LAYER_KWARG", "PREFIX", "SUPPORTED_BACKENDS", "disable_scope_attention", "enable_scope_attention"]

PREFIX = BACKEND_PREFIX
SUPPORTED_BACKENDS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")
# The attention kwarg that carries a managed layer from _route_layer to the attention function.
LAYER_KWARG = "scope_layer"
_ROUTE_HANDLE = "_scope_kv_route"


class _ConfigView:
    """A model config whose ``_attn_implementation`` reads ``backend``; every other attribute is
    the config's own."""

    def __init__(self, config: Any, backend: str):
        self._config = config
        self._attn_implementation = backend

    def __getattr__(self, name: str) -> Any:  # called only for attributes not set in __init__
        return getattr(self._config, name)


class _BackendView:
    """An attention module as transformers' flash wrapper sees it: the module itself, except that
    ``config._attn_implementation`` names ``backend``.

    The wrapper (``integrations.flash_attention.flash_attention_forward``) imports its kernel by
    ``module.config._attn_implementation``; for a model ScopeCache set up that reads
    ``scope_<backend>``, a name no kernel goes by. The view is built per call and holds nothing.
    """

    def __init__(self, module: torch.nn.Module, backend: str):
        self._module = module
        self.config = _ConfigView(module.config, backend)

    def __getattr__(self, name: str) -> Any:  # called only for attributes not set in __init__
        return getattr(self._module, name)


class _OneKVHeadPerQueryHead:
    """An attention module whose K/V come stored once per query head (``ScopeCache(per_query_head=
    True)``): the module itself, except that no head groups are left to repeat. Built per call."""

    num_key_value_groups = 1

    def __init__(self, module: torch.nn.Module):
        self._module = module

    def __getattr__(self, name: str) -> Any:  # called only for attributes not set here
        return getattr(self._module, name)


def _flash_attention(
    backend: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' flash-attention function for ``backend``, run as for a model on ``backend``.

    Parameters
    ----------
    query : Tensor
        ``(batch, q_heads, q, dim)``.
    key, value : Tensor
        ``(batch, kv_heads, length, dim)`` the held slots.
    attention_mask : Tensor or None
        ``(batch, length)`` 2-D padding mask in physical slots (varlen path), or ``None``.

    Returns
    -------
    (Tensor, None)
        ``(batch, q, q_heads, dim)`` output (transformers' layout for flash) and no weights.
    """
    flash = ALL_ATTENTION_FUNCTIONS[backend]
    return flash(_BackendView(module, backend), query, key, value, attention_mask, **kwargs)


def _base_function(backend: str, module: torch.nn.Module) -> Callable[..., Any]:
    if is_flash_backend(backend):
        return functools.partial(_flash_attention, backend)
    if backend != "eager":
        return ALL_ATTENTION_FUNCTIONS[backend]
    # "eager" is not in the registry: each modeling file defines its own (softcapping, sinks...).
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__} has no eager_attention_forward in its modeling file; "
            "load the model with attn_implementation='sdpa'."
        )
    return fn


def _plain_softmax(module: torch.nn.Module, attention_mask: torch.Tensor | None, kwargs: dict[str, Any]) -> bool:
    """Whether the call is plain softmax attention the grouped decode path computes exactly: no
    soft-capping, sinks, window or dropout, and no mask or a boolean 4-D one."""
    return (
        kwargs.get("softcap") is None
        and kwargs.get("sliding_window") is None
        and not (module.training and kwargs.get("dropout", 0.0))
        and getattr(module, "sinks", None) is None
        and (attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4))
    )


def _make_attention(backend: str) -> Callable[..., Any]:
    def scope_attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = kwargs.pop(LAYER_KWARG, None)
        if layer is None:
            return _base_function(backend, module)(module, query, key, value, attention_mask, **kwargs)
        step = layer.open_step(
            module, query, key, value, attention_mask, backend, kwargs.get("scaling"), kwargs.get("softcap")
        )
        attention_mask = step.mask
        fused = step.decode
        if backend == "sdpa" and fused is not None and _plain_softmax(module, attention_mask, kwargs):
            # Decode fast path (scope_kv.kernels): one grouped attention call that also returns the
            # log-sum-exp, from which the layer scores its candidates in O(budget).
            output, lse = grouped_decode_attention(
                query, key, value, attention_mask, step.scaling, kernel=fused.kernel, splits=fused.splits
            )
            layer.after_attention(step.with_lse(lse))
            return output, None
        viewed = _OneKVHeadPerQueryHead(module) if step.kv_repeat > 1 else module
        output = _base_function(backend, module)(viewed, query, key, value, attention_mask, **kwargs)
        layer.after_attention(step)
        return output

    scope_attention.__name__ = f"{PREFIX}{backend}_attention"
    return scope_attention


def _route_layer(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Forward pre-hook of an attention module: hand the call's managed layer to the attention
    function through the call's own kwargs (see the module docstring)."""
    cache = cache_argument(kwargs)
    managed_layer = getattr(cache, "managed_layer", None)
    if managed_layer is None:
        return None  # another cache, or none: a pass-through
    layer = managed_layer(module.layer_idx)
    if layer is None:
        return None  # a layer transformers manages itself (sliding window)
    layer.observe_input(
        kwargs.get("hidden_states", args[0] if args else None),
        kwargs.get("position_embeddings"),
        kwargs.get("position_ids"),
    )
    return args, {**kwargs, LAYER_KWARG: layer}


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The attention modules, found without per-architecture code: the innermost modules that
    carry a ``layer_idx`` (decoder layers may carry one too, and contain the attention)."""
    indexed = [m for m in model.modules() if getattr(m, "layer_idx", None) is not None]
    return [
        m for m in indexed if not any(c is not m and getattr(c, "layer_idx", None) is not None for c in m.modules())
    ]


def register_backend(backend: str) -> str:
    """Register scope_kv's attention function and mask for ``backend`` with transformers'
    ``AttentionInterface`` / ``AttentionMaskInterface`` (once) and return the name registered
    (``scope_<backend>``), which a model is then switched to."""
    name = PREFIX + backend
    if name not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        AttentionInterface.register(name, _make_attention(backend))
        AttentionMaskInterface.register(name, transformers_mask_function(backend))
    return name


def enable_scope_attention(model: PreTrainedModel) -> str:
    """Route ``model``'s attention through scope_kv's function; returns the implementation name.

    Idempotent: the implementation is switched and the routing hooks installed once.

    Raises
    ------
    ValueError
        If the model's backend is not supported, or the model does not dispatch attention
        through transformers' ``AttentionInterface`` (then SCOPE could never select).
    """
    modules = attention_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no attention module carrying a layer_idx, the index transformers' "
            "attention interface and caches go by: it keeps its own state or computes attention in its own "
            "code, so there is nothing ScopeCache can manage. Use the model's own cache (or DynamicCache)."
        )
    current = model.config._attn_implementation
    if not current.startswith(PREFIX):
        if current not in SUPPORTED_BACKENDS:
            raise ValueError(
                f"attn_implementation={current!r} is not supported by scope_kv; load the model with "
                f"attn_implementation= one of {SUPPORTED_BACKENDS}."
            )
        warn_if_untested()
        name = register_backend(current)
        set_attention_implementation(model, name, current)
        if model.config._attn_implementation != name:
            raise ValueError(
                f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface, "
                "so scope_kv cannot see its queries. Only models whose attention calls "
                "ALL_ATTENTION_FUNCTIONS.get_interface(...) are supported."
            )
        current = name
    for module in modules:
        if getattr(module, _ROUTE_HANDLE, None) is None:
            setattr(module, _ROUTE_HANDLE, module.register_forward_pre_hook(_route_layer, with_kwargs=True))
    return current


def disable_scope_attention(model: PreTrainedModel) -> str:
    """Undo :func:`enable_scope_attention`: ``model`` back on its own backend (``scope_X`` -> ``X``)
    and the routing hooks removed, so that another cache runs the stock attention with nothing of
    scope_kv's in its path (the pass-through costs a few microseconds a layer, which an eager step
    at a small batch feels). Returns the implementation now in use.

    Idempotent. A ScopeCache built afterwards switches the model back; one built before cannot be
    used until then (its first step after this raises).
    """
    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        set_attention_implementation(model, current[len(PREFIX) :], current)
    for module in attention_modules(model):
        handle = getattr(module, _ROUTE_HANDLE, None)
        if handle is not None:
            handle.remove()
            delattr(module, _ROUTE_HANDLE)
    return str(model.config._attn_implementation)
