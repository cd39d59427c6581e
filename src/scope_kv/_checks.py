"""Shared by every configuration class (strategies, compressors): validation, and the option
text of their spec strings."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

__all__ = ["check_int", "spec_options", "spec_text"]

# How the spec grammar writes some settings (scope_kv.spec): ``T=`` for the generation length.
_WRITTEN_AS = {"max_new_tokens": "T"}


def spec_text(config: Any) -> str:
    """The spec string of a decoding strategy or prefill compressor (``scope_kv.spec``): its kind,
    its budget text and its settings, ``kind:budgets,key=value...``. The one formatter every
    strategy's and compressor's ``describe()`` is.

    The kind is the class's own ``spec_kind`` (a subclass that does not declare one is printed
    under its class name, which the grammar does not take for a built-in); the budget text is
    ``config.spec_budget()``, the settings ``config.spec_settings()`` (:func:`spec_options`).

    >>> from scope_kv import SnapKV, Slide
    >>> spec_text(SnapKV(2048, window=16)), spec_text(Slide(512, 256))
    ('snapkv:2048,window=16', 'slide:512/256')
    """
    kind = vars(type(config)).get("spec_kind") or type(config).__name__.lower()
    return f"{kind}:{config.spec_budget()}{spec_options(config, config.spec_settings())}"


def spec_options(config: Any, names: tuple[str, ...]) -> str:
    """``",key=value"`` for each field of ``names`` whose value differs from the class default:
    the option part of a spec string (``scope_kv.spec``) that rebuilds ``config``
    (``cap_budget=False`` is written ``uncapped``, ``max_new_tokens`` as ``T``).

    >>> from scope_kv import SnapKV
    >>> spec_options(SnapKV(2048, window=16), ("window", "kernel", "pooling"))
    ',window=16'
    """
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    parts = []
    for name in names:
        value = getattr(config, name)
        if name in defaults and value == defaults[name]:
            continue
        if name == "cap_budget" and value is False:
            parts.append(",uncapped")
            continue
        parts.append(f",{_WRITTEN_AS.get(name, name)}={str(value).lower() if isinstance(value, bool) else value}")
    return "".join(parts)


def check_int(name: str, value: object, minimum: int, optional: bool = False) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``value`` is an int ``>= minimum``.

    Every configuration and settings class validates its integers with this, so each says the
    same thing the same way.

    Parameters
    ----------
    name : str
        How the message names the setting, e.g. ``"Slide.budget"`` or ``"--seeds"``.
    value : object
        The value given.
    minimum : int
        The smallest allowed value.
    optional : bool
        ``None`` is allowed too (no limit).
    """
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        none = " (or None)" if optional else ""
        raise TypeError(f"{name} must be an int{none}, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
