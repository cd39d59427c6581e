"""Method specs: one short string names a cache configuration to evaluate.

Grammar (whitespace is ignored)::

    spec     := prefill "+" decoding | prefill | decoding
    decoding := "full"
              | ("slide" | "adaptive" | "discontinuous") ":" B "/" r ["," key=value]...
              | ("unified-h2o" | "unified-streamingllm") ":" N "/" r
    N        := tokens | "prompt+" tokens      (the second: the prompt's length plus tokens)
    prefill  := ("snapkv" | "pyramidkv" | "h2o" | "streamingllm") ":" C ["," key=value]...

Examples: ``full``, ``slide:512/256``, ``adaptive:512/256`` (planned for the run's generation
length unless ``,T=<tokens>`` or ``,delta=<step>`` is given), ``snapkv:2048+slide:512/256``,
``snapkv:2048,window=8,kernel=7,pooling=max``, ``pyramidkv:2048,beta=20+full``,
``unified-h2o:2560/256`` (one budget over prompt and generated entries, SCOPE_SPEC §4),
``unified-h2o:prompt+512/256`` (that budget set per prompt to its length + 512: the same KV
memory as ``slide:512/256`` on the whole prompt).

Prefill compressors and unified baselines are looked up in :mod:`scope_kv` by name when a
spec is parsed, so a spec naming one that this install lacks fails with a message for that
method alone.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Method", "MethodSpecError", "parse_method", "parse_methods", "DECODING_KINDS", "PREFILL_KINDS"]

# spec name -> class name exported by scope_kv
DECODING_KINDS = {
    "slide": "Slide",
    "adaptive": "Adaptive",
    "discontinuous": "Discontinuous",
    "unified-h2o": "UnifiedH2O",
    "unified-streamingllm": "UnifiedStreamingLLM",
}
PREFILL_KINDS = {
    "snapkv": "SnapKV",
    "pyramidkv": "PyramidKV",
    "h2o": "H2O",
    "streamingllm": "StreamingLLM",
}
_ALIASES = {
    "uh2o": "unified-h2o",
    "unified_h2o": "unified-h2o",
    "ustreamingllm": "unified-streamingllm",
    "unified_streamingllm": "unified-streamingllm",
    "streaming": "streamingllm",
    "none": "full",
}
_SCHEDULED = ("adaptive", "discontinuous")  # need the generation length (SCOPE_SPEC §2, delta)
_KEY_ALIASES = {"t": "max_new_tokens", "T": "max_new_tokens"}


class MethodSpecError(ValueError):
    """A method spec that cannot be parsed or built; the message says what to write instead."""


@dataclass(frozen=True)
class Method:
    """A parsed, validated method spec.

    Attributes
    ----------
    spec : str
        The spec as written (whitespace removed); the method's name in result files.
    prefill : object or None
        The prefill compressor (e.g. ``scope_kv.SnapKV(...)``), ``None`` keeps the prompt whole.
    decoding : object or None
        The decoding strategy (``Slide``, ``Adaptive``, ...), ``None`` keeps every generated entry.
    """

    spec: str
    prefill: Any = None
    decoding: Any = None
    per_prompt: tuple | None = field(default=None, compare=False, repr=False)  # (class, extra, recent)

    @property
    def is_full(self) -> bool:
        return self.prefill is None and self.decoding is None and self.per_prompt is None

    def decoding_for(self, prompt_tokens: int | None) -> Any:
        """The decoding strategy for a prompt of ``prompt_tokens`` tokens (``prompt+N`` budgets)."""
        if self.per_prompt is None:
            return self.decoding
        if prompt_tokens is None:
            raise MethodSpecError(f"{self.spec}: a 'prompt+N' budget needs the prompt length (make_cache(model, prompt_tokens)).")
        cls, extra, recent = self.per_prompt
        return cls(prompt_tokens + extra, recent)

    def make_cache(self, model: Any, prompt_tokens: int | None = None) -> Any:
        """A fresh :class:`scope_kv.ScopeCache` for ``model`` configured as this method.

        ``prompt_tokens`` (the prompt's length, padding included) resolves ``prompt+N`` budgets.
        """
        import scope_kv

        decoding = self.decoding_for(prompt_tokens)
        if self.prefill is None:
            return scope_kv.ScopeCache(model, decoding=decoding)
        try:
            return scope_kv.ScopeCache(model, prefill=self.prefill, decoding=decoding)
        except TypeError as exc:  # a ScopeCache without the prefill argument
            raise MethodSpecError(
                f"{self.spec}: this version of scope_kv.ScopeCache takes no prefill compressor ({exc}). "
                "Drop the prefill part of the spec or upgrade scope_kv."
            ) from exc


@dataclass(frozen=True)
class _PerPrompt:
    cls: type
    extra: int
    recent: int


def _lookup(class_name: str, spec: str) -> type:
    module = importlib.import_module("scope_kv")
    cls = getattr(module, class_name, None)
    if cls is None:
        raise MethodSpecError(
            f"{spec!r} needs scope_kv.{class_name}, which this installation of scope_kv does not provide "
            f"(scope_kv {getattr(module, '__version__', '?')}). Remove this method from the run or upgrade scope_kv."
        )
    return cls


def _value(text: str) -> Any:
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    if re.fullmatch(r"[+-]?\d*\.\d+(e[+-]?\d+)?", text, flags=re.I):
        return float(text)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    return text


def _split_part(part: str, spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """``name:1/2,key=value`` -> (name, [1, 2], {key: value}); ``prompt+N`` -> ("prompt", N)."""
    head, _, rest = part.partition(":")
    name = _ALIASES.get(head.lower(), head.lower())
    numbers: list[int] = []
    kwargs: dict[str, Any] = {}
    if rest:
        fields = rest.split(",")
        if fields[0] and "=" not in fields[0]:
            for n in fields[0].split("/"):
                relative = re.fullmatch(r"prompt\+(\d+)", n)
                if relative:
                    numbers.append(("prompt", int(relative.group(1))))
                    continue
                if not re.fullmatch(r"\d+", n):
                    raise MethodSpecError(
                        f"{spec!r}: {n!r} in {part!r} is not a whole number; write budgets as e.g. slide:512/256."
                    )
                numbers.append(int(n))
            fields = fields[1:]
        for kv in fields:
            key, eq, val = kv.partition("=")
            if not eq or not key:
                raise MethodSpecError(f"{spec!r}: expected key=value after ',' in {part!r}, got {kv!r}.")
            kwargs[_KEY_ALIASES.get(key, key)] = _value(val)
    return name, numbers, kwargs


def _build_decoding(name: str, numbers: list[int], kwargs: dict, spec: str, max_new_tokens: int | None) -> Any:
    if name == "full":
        if numbers or kwargs:
            raise MethodSpecError(f"{spec!r}: 'full' takes no budgets.")
        return None
    if len(numbers) != 2:
        raise MethodSpecError(
            f"{spec!r}: {name} needs a budget and a recent window, e.g. {name}:512/256 (budget B / recent r)."
        )
    cls = _lookup(DECODING_KINDS[name], spec)
    budget, recent = numbers
    if isinstance(recent, tuple):
        raise MethodSpecError(f"{spec!r}: only the budget may be written prompt+N, not the recent window.")
    if isinstance(budget, tuple):
        if not name.startswith("unified-"):
            raise MethodSpecError(
                f"{spec!r}: prompt+N budgets are for the unified baselines; {name}'s budget counts generated tokens only."
            )
        try:
            cls(budget[1] + recent + 1, recent, **kwargs)  # validate the settings once, at parse time
        except (TypeError, ValueError) as exc:
            raise MethodSpecError(f"{spec!r}: {exc}") from exc
        return _PerPrompt(cls, budget[1], recent)
    if name in _SCHEDULED and "max_new_tokens" not in kwargs and "delta" not in kwargs:
        if max_new_tokens is None:
            raise MethodSpecError(
                f"{spec!r}: {name} plans its budget for a generation length; add ',T=<max_new_tokens>' to the spec."
            )
        kwargs = {**kwargs, "max_new_tokens": max_new_tokens}
    try:
        return cls(budget, recent, **kwargs)
    except (TypeError, ValueError) as exc:
        raise MethodSpecError(f"{spec!r}: {exc}") from exc


def _build_prefill(name: str, numbers: list[int], kwargs: dict, spec: str) -> Any:
    if len(numbers) != 1 or isinstance(numbers[0], tuple):
        raise MethodSpecError(
            f"{spec!r}: {name} takes one prefill budget (tokens kept), e.g. {name}:2048; "
            "other settings go after a comma, e.g. snapkv:2048,window=8."
        )
    cls = _lookup(PREFILL_KINDS[name], spec)
    try:
        return cls(numbers[0], **kwargs)
    except (TypeError, ValueError) as exc:
        raise MethodSpecError(f"{spec!r}: {exc}") from exc


def parse_method(spec: str, max_new_tokens: int | None = None) -> Method:
    """Parse one method spec (see the module docstring for the grammar).

    Parameters
    ----------
    spec : str
        E.g. ``"snapkv:2048+slide:512/256"``.
    max_new_tokens : int or None
        The run's generation length; adaptive and discontinuous plan their schedule for it
        unless the spec gives ``T=`` or ``delta=``.

    Raises
    ------
    MethodSpecError
        With a message saying what to write instead (or which scope_kv name is missing).
    """
    text = re.sub(r"\s+", "", spec)
    if not text:
        raise MethodSpecError("empty method spec; write e.g. 'full' or 'slide:512/256'.")
    parts = re.split(r"\+(?=[A-Za-z])(?<!prompt\+)", text)
    if len(parts) > 2:
        raise MethodSpecError(f"{spec!r}: at most one '+' (prefill+decoding), e.g. snapkv:2048+slide:512/256.")
    prefill = decoding = None
    parsed = [_split_part(p, text) for p in parts]
    known = set(DECODING_KINDS) | set(PREFILL_KINDS) | {"full"}
    for name, _, _ in parsed:
        if name not in known:
            raise MethodSpecError(
                f"{spec!r}: unknown method {name!r}; known: {', '.join(sorted(known))} "
                "(prefill compressor first, then '+', then the decoding strategy)."
            )
    if len(parsed) == 2:
        (pname, pnums, pkw), (dname, dnums, dkw) = parsed
        if pname not in PREFILL_KINDS:
            raise MethodSpecError(f"{spec!r}: the part before '+' must be a prefill compressor ({', '.join(PREFILL_KINDS)}).")
        if dname not in DECODING_KINDS and dname != "full":
            raise MethodSpecError(f"{spec!r}: the part after '+' must be a decoding strategy or 'full'.")
        if dname.startswith("unified-"):
            raise MethodSpecError(
                f"{spec!r}: unified baselines compress prompt and output under one budget; they take no prefill "
                f"compressor. Write {dname}:<C+B>/<r> alone."
            )
        prefill = _build_prefill(pname, pnums, pkw, text)
        decoding = _build_decoding(dname, dnums, dkw, text, max_new_tokens)
    else:
        name, nums, kw = parsed[0]
        if name in PREFILL_KINDS:
            prefill = _build_prefill(name, nums, kw, text)
        else:
            decoding = _build_decoding(name, nums, kw, text, max_new_tokens)
    if isinstance(decoding, _PerPrompt):
        return Method(spec=text, prefill=prefill, decoding=None, per_prompt=(decoding.cls, decoding.extra, decoding.recent))
    return Method(spec=text, prefill=prefill, decoding=decoding)


def parse_methods(specs: list[str], max_new_tokens: int | None = None) -> tuple[list[Method], dict[str, str]]:
    """Parse several specs; a spec that fails does not stop the others.

    Returns
    -------
    (methods, errors) : tuple[list[Method], dict[str, str]]
        The parsed methods in order, and ``{spec: message}`` for those that failed.
    """
    methods, errors = [], {}
    for spec in specs:
        try:
            method = parse_method(spec, max_new_tokens)
        except MethodSpecError as exc:
            errors[spec] = str(exc)
            continue
        if any(m.spec == method.spec for m in methods):
            errors[spec] = f"{spec!r} is listed twice."
            continue
        methods.append(method)
    return methods, errors
