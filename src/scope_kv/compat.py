"""Every difference between the transformers versions scope_kv supports, in one module.

Supported: transformers 5.17 up to the newest release the test-suite ran against (README,
"Supported versions"). Nothing else in the package looks at transformers' version or probes
for attributes that come and go between releases.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig
from transformers.cache_utils import DynamicCache

__all__ = ["cache_argument", "is_dummy_layer", "layer_templates"]

# How the call's cache reaches a module's forward: `past_key_values=` everywhere up to 5.23;
# 5.24 renames it `cache=` (keeping the old name, with a FutureWarning, for a while).
_CACHE_KWARGS = ("cache", "past_key_values")


def cache_argument(kwargs: dict[str, Any]) -> Any:
    """The cache a module's forward was called with (``None`` if none), whatever its keyword."""
    for name in _CACHE_KWARGS:
        cache = kwargs.get(name)
        if cache is not None:
            return cache
    return None


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
