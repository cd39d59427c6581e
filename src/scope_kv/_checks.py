"""Validation shared by every configuration class (strategies, compressors)."""

from __future__ import annotations

__all__ = ["check_int"]


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ``TypeError`` / ``ValueError`` unless ``value`` is an int ``>= minimum``.

    Parameters
    ----------
    name : str
        How the message names the setting, e.g. ``"Slide.budget"``.
    value : object
        The value given.
    minimum : int
        The smallest allowed value.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r}).")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
