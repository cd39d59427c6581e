"""Every difference between the transformers versions scope_kv supports, in one module.

Supported: transformers 5.17 (the floor) up to, but excluding, 6.0; 5.17 and the newest
release (:data:`NEWEST_TESTED`) run the test-suite (README, "Supported versions"). Nothing
else in the package looks at transformers' version or probes for attributes that come and go
between releases.

What differs, and where it is handled:

* the cache keyword: ``past_key_values=`` up to 5.23; 5.24 renames it ``cache=`` in
  ``generate``, in every model forward and in the output classes, keeping the old name with a
  ``FutureWarning`` (:data:`CACHE_KWARG`, :func:`cache_kwargs`, :func:`cache_argument`,
  :func:`output_cache`);
* ``Cache.update(key, value, layer_idx, kwargs=...)``: 5.24's modeling files hand the
  attention kwargs to the cache, which passes them on to the layer's ``update``
  (``ScopeLayer.update`` takes and ignores extra arguments on every version);
* the per-layer templates ``DynamicCache(config=...)`` builds, and ``DummyLayer`` (5.23) for
  layers without KV of their own (:func:`layer_templates`, :func:`is_dummy_layer`);
* switching a model to a registered flash-attention wrapper (:func:`set_attention_implementation`).
"""

from __future__ import annotations

import pathlib
import sys
import warnings
from types import FrameType
from typing import Any

import transformers
from packaging.version import Version
from transformers import PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache

from .masks import is_flash_backend

__all__ = [
    "CACHE_KWARG",
    "FLOOR",
    "NEWEST_TESTED",
    "TRANSFORMERS_VERSION",
    "cache_argument",
    "cache_kwargs",
    "is_dummy_layer",
    "layer_templates",
    "output_cache",
    "set_attention_implementation",
    "warn_if_untested",
]

TRANSFORMERS_VERSION: tuple[int, ...] = Version(transformers.__version__).release
"""The installed transformers' release numbers, e.g. ``(5, 24, 0)`` (a dev build counts as its release)."""

FLOOR = (5, 17)
"""The oldest supported transformers (``Cache.get_query_offset``; cache-position-free forwards)."""

NEWEST_TESTED = (5, 25)
"""The newest transformers release the test-suite ran against."""

# 5.24 renamed the cache argument of `generate`, of model forwards and of the output classes.
_CACHE_RENAMED = (5, 24)

CACHE_KWARG: str = "cache" if TRANSFORMERS_VERSION >= _CACHE_RENAMED else "past_key_values"
"""The keyword the installed transformers prefers for passing a cache to ``generate`` or a
model forward: ``"cache"`` from 5.24, ``"past_key_values"`` before (5.24 still accepts
``past_key_values=``, with a ``FutureWarning``; removal is announced for 6.0 in ``generate``
and 5.40 in forwards)."""

# Every name a module's forward may receive the call's cache under, preferred first
# (GPT-NeoX, Falcon and GPTBigCode hand it to their attention modules as `layer_past=`).
_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """Keyword arguments that pass ``cache`` the way the installed transformers prefers.

    Works for ``generate`` and for model forwards alike, without a deprecation warning on any
    supported version::

        model.generate(**inputs, **cache_kwargs(ScopeCache(model, decoding=Slide(512, 256))))
        model(input_ids=ids, **cache_kwargs(cache))

    Parameters
    ----------
    cache : Cache
        Any transformers cache (a :class:`~scope_kv.ScopeCache` or a stock one).

    Returns
    -------
    dict
        ``{"cache": cache}`` on transformers >= 5.24, ``{"past_key_values": cache}`` before.
    """
    return {CACHE_KWARG: cache}


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The cache a module's forward was called with (``None`` if none), whatever its keyword."""
    for name in _CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


def output_cache(output: Any) -> Any:
    """The cache a model forward's (or ``generate``'s dict) output carries, ``None`` if none.

    ``output.cache`` from 5.24 (where ``output.past_key_values`` still works but logs a
    deprecation), ``output.past_key_values`` before.
    """
    return getattr(output, CACHE_KWARG, None)


def _outside_frames() -> int:
    """``warnings.warn``'s ``stacklevel`` for the first frame outside scope_kv and transformers,
    so that a warning points at the user's line (``ScopeCache(...)``, ``make_cache(...)``,
    ``model.generate(...)``), not into a library file."""
    inside = (str(pathlib.Path(__file__).resolve().parent), str(pathlib.Path(transformers.__file__).resolve().parent))
    frame: FrameType | None = sys._getframe(1)  # the caller of this helper: level 1 of its warn()
    level = 1
    while frame is not None and str(pathlib.Path(frame.f_code.co_filename).resolve()).startswith(inside):
        frame, level = frame.f_back, level + 1
    return level


def warn_if_untested() -> None:
    """Warn when the installed transformers is newer than :data:`NEWEST_TESTED`: it is allowed
    (the declared range is open up to 6.0), nothing has checked it yet. The warning points at
    the user's line (so Python's default filter shows it once per line of user code) and does
    not ask for a downgrade."""
    if TRANSFORMERS_VERSION[:2] > NEWEST_TESTED:
        newest = ".".join(map(str, NEWEST_TESTED))
        warnings.warn(
            f"scope_kv's test-suite last ran on transformers {newest}; {transformers.__version__} is newer and "
            f"allowed. If a ScopeCache without compression generates other tokens than DynamicCache here, "
            f"please report it (transformers {newest} is the newest tested).",
            UserWarning,
            stacklevel=_outside_frames(),
        )


def layer_templates(config: PretrainedConfig) -> list[Any]:
    """The cache layer transformers would build for each decoder layer of ``config``.

    ``DynamicCache(config=...)`` is the one constructor whose result (a ``DynamicLayer`` or
    ``DynamicSlidingWindowLayer`` per layer, or a ``DummyLayer`` for a layer that shares
    another's KV) has the same meaning on every supported version; the helper that computes it
    changed its return type between 5.17 and 5.23.
    """
    return list(DynamicCache(config=config).layers)


def is_dummy_layer(layer: Any) -> bool:
    """Whether ``layer`` is transformers' placeholder for a layer without KV of its own
    (``DummyLayer``, new in 5.23; it is not a ``CacheLayerMixin``)."""
    return type(layer).__name__ == "DummyLayer"


def set_attention_implementation(model: PreTrainedModel, name: str, base: str) -> None:
    """Switch ``model`` (and its sub-models) from attention implementation ``base`` to the
    registered function ``name``.

    sdpa / eager wrappers go through ``model.set_attn_implementation``. For a flash backend
    that call cannot work on any supported version (5.17-5.24): it treats every name
    containing ``flash`` as a flash kernel to preload and looks the kernel up by that name,
    which for a registered wrapper (``scope_flash_attention_2``) names nothing. The kernel
    ``base`` stands for was already checked when the model was given ``base``, so the configs
    that use ``base`` are switched directly, as ``set_attn_implementation`` itself stores the
    choice. A model class that does not dispatch through ``AttentionInterface`` is left as it
    is (transformers refuses to switch those too); the caller checks the result.

    Parameters
    ----------
    model : PreTrainedModel
        The model, currently on ``base``.
    name : str
        A name registered with ``AttentionInterface`` and ``AttentionMaskInterface``.
    base : str
        The model's current implementation (``sdpa``, ``eager``, ``flash_attention_2/3/4``).
    """
    if not is_flash_backend(base):
        model.set_attn_implementation(name)
        return
    if not model._can_set_attn_implementation():
        return
    # Every config a module reads its implementation from (sub-models and attention modules
    # keep a reference to theirs).
    configs = {id(model.config): model.config}
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PretrainedConfig):
            configs.setdefault(id(config), config)
    for config in configs.values():
        if config._attn_implementation == base:
            config._attn_implementation_internal = name
