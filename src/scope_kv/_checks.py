"""Shared by every configuration class (strategies, compressors): validation, and the option
text of their spec strings."""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

__all__ = ["check_int", "spec_options"]


def spec_options(config: Any, names: tuple[str, ...]) -> str:
    """``",key=value"`` for each field of ``names`` whose value differs from the class default:
    the option part of a spec string (``scope_kv.spec``) that rebuilds ``config``.

    >>> from scope_kv import SnapKV
    >>> spec_options(SnapKV(2048, window=16), ("window", "kernel", "pooling"))
    ',window=16'
    """
    defaults = {f.name: f.default for f in fields(config) if f.default is not MISSING}
    parts = []
    for name in names:
        value = getattr(config, name)
        if name not in defaults or value != defaults[name]:
            parts.append(f",{name}={str(value).lower() if isinstance(value, bool) else value}")
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
