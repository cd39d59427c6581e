"""Cache specs: one short string names a :class:`~scope_kv.ScopeCache` configuration.

``scope_kv.make_cache(model, "snapkv:2048+slide:512/256")`` builds the cache a spec names; the
``scope-kv eval`` command takes the same strings (``-m/--method``), so a configuration measured
there is one line away from ``generate``.

Grammar (whitespace is ignored; names are case-insensitive)::

    spec      := prefill "+" decoding | prefill | decoding
    decoding  := "full" [options]
               | ("slide" | "adaptive" | "discontinuous") ":" B "/" r [options]
               | ("unified-h2o" | "unified-streamingllm") ":" N "/" r [options]
               | ("rkv" | "morphkv") ":" B "/" r [options] | ("unified-rkv" | "unified-morphkv") ":" N "/" r [options]
    prefill   := ("snapkv" | "pyramidkv" | "h2o" | "streamingllm") ":" C [options]
    N         := tokens | "prompt" ["+" tokens] | "prompt/" D "+" tokens
    C         := tokens | "prompt/" D ["+" tokens]           (not pyramidkv)
    options   := ("," option)...
    option    := key "=" value | "static" | "per_query_head" | "uncapped"

``B`` is the decoding budget and ``r`` the recent window (:class:`~scope_kv.Slide` and friends),
``N`` the one budget of a unified baseline over prompt and output (the paper's ``C + B``), ``C``
a prefill compressor's budget; all count entries per layer and KV head.

``prompt`` is the length of each batch row's prompt (its real tokens, padding excluded),
``prompt/D`` that length divided by ``D`` (rounded down): a budget set per prompt. E.g.
``unified-h2o:prompt+512/256`` holds the same KV memory as ``slide:512/256`` on the whole prompt,
and ``snapkv:prompt/4+slide:512/256`` (a quarter of each prompt, then slide) the same as
``unified-h2o:prompt/4+512/256``. A unified budget set from the prompt is one number per cache,
so :func:`make_cache` needs ``prompt_tokens=`` for it.

Options:

* ``key=value`` sets a field of the strategy or compressor: ``T=4096`` (``max_new_tokens``) or
  ``delta=15`` for adaptive / discontinuous (otherwise they are planned for the ``max_new_tokens``
  given to :func:`make_cache`), ``cap_budget=false``; ``window=8,kernel=7,pooling=max`` for SnapKV
  and PyramidKV, ``beta=20`` for PyramidKV, ``recent=8`` for H2O, ``sinks=4`` for StreamingLLM,
  ``buffer=128,mix=0.1,kernel=7,threshold=0.5`` for R-KV, ``fusion=sum`` for MorphKV (for both, ``r``
  is the window of recent entries whose queries score the rest).
  Values are integers, decimals, ``true`` / ``false``, ``none`` or words.
* ``uncapped`` is ``cap_budget=false`` (adaptive / discontinuous grow their budget past ``B``, as
  the authors' research code does).
* ``static`` and ``per_query_head`` are the cache's own keyword arguments
  (``ScopeCache(static=True)``, ``ScopeCache(per_query_head=True)``); they may follow either part.
  ``static=true`` and ``per_query_head=true`` are the same.

Examples::

    full                                   ScopeCache(model)
    slide:512/256                          ScopeCache(model, decoding=Slide(512, 256))
    adaptive:512/256,T=4096                decoding=Adaptive(512, 256, max_new_tokens=4096)
    discontinuous:512/256,delta=15,uncapped  decoding=Discontinuous(512, 256, delta=15, cap_budget=False)
    snapkv:2048+slide:512/256              prefill=SnapKV(2048), decoding=Slide(512, 256)
    snapkv:2048,window=8,kernel=7,pooling=max   prefill only
    pyramidkv:2048,beta=20+full            prefill=PyramidKV(2048, beta=20), every generated entry kept
    unified-h2o:2560/256                   decoding=UnifiedH2O(2560, 256)
    unified-h2o:prompt+512/256             decoding=UnifiedH2O(prompt_tokens + 512, 256)
    rkv:512/8,buffer=128                   decoding=RKV(512, 8, buffer=128)
    unified-rkv:prompt+512/8               decoding=UnifiedRKV(prompt_tokens + 512, 8)
    morphkv:512/32,fusion=sum              decoding=MorphKV(512, 32, fusion="sum")
    slide:512/256,static                   ScopeCache(model, decoding=Slide(512, 256), static=True)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .cache import ScopeCache
from .decoding import Adaptive, DecodingStrategy, Discontinuous, Slide, UnifiedH2O, UnifiedStreamingLLM
from .morphkv import MorphKV, UnifiedMorphKV
from .prefill import H2O, PrefillCompressor, PyramidKV, SnapKV, StreamingLLM
from .prompt_share import SHARED_PREFILL, PromptShare, SharedBudget, share_text
from .rkv import RKV, UnifiedRKV

__all__ = [
    "CACHE_OPTIONS",
    "DECODING_KINDS",
    "PREFILL_KINDS",
    "CacheSpec",
    "PromptShare",
    "SpecError",
    "make_cache",
    "parse_spec",
]

# spec name -> class
DECODING_KINDS: dict[str, type[DecodingStrategy]] = {
    "slide": Slide,
    "adaptive": Adaptive,
    "discontinuous": Discontinuous,
    "unified-h2o": UnifiedH2O,
    "unified-streamingllm": UnifiedStreamingLLM,
    "rkv": RKV,
    "unified-rkv": UnifiedRKV,
    "morphkv": MorphKV,
    "unified-morphkv": UnifiedMorphKV,
}
PREFILL_KINDS: dict[str, type[PrefillCompressor]] = {
    "snapkv": SnapKV,
    "pyramidkv": PyramidKV,
    "h2o": H2O,
    "streamingllm": StreamingLLM,
}
# Options that configure the ScopeCache itself, not its strategy or compressor.
CACHE_OPTIONS = ("static", "per_query_head")
_ALIASES = {
    "uh2o": "unified-h2o",
    "unified_h2o": "unified-h2o",
    "ustreamingllm": "unified-streamingllm",
    "unified_streamingllm": "unified-streamingllm",
    "streaming": "streamingllm",
    "none": "full",
}
_SCHEDULED = ("adaptive", "discontinuous")  # need the generation length (docs/method.md §2, delta)
_KEY_ALIASES = {"t": "max_new_tokens", "T": "max_new_tokens", "per-query-head": "per_query_head"}
# Bare words accepted as options, and what they mean.
_FLAGS: dict[str, tuple[str, bool]] = {
    "static": ("static", True),
    "per_query_head": ("per_query_head", True),
    "per-query-head": ("per_query_head", True),
    "uncapped": ("cap_budget", False),
}
# A budget term: tokens, the prompt (+ tokens), or a share of the prompt (+ tokens).
_DECODING_TERM = r"\d+|prompt(?:\+\d+)?|prompt/\d+\+\d+"
_PREFILL_TERM = r"\d+|prompt/\d+(?:\+\d+)?"


class SpecError(ValueError):
    """A cache spec that cannot be parsed or built; the message says what to write instead."""


# The setting that must stay below a prefill budget (the floor of a shared budget is one more).
_PREFILL_FLOOR_FIELD = {"snapkv": "window", "h2o": "recent", "streamingllm": "sinks"}


@dataclass(frozen=True)
class _PerPrompt:
    """A unified baseline whose budget is set per prompt (``prompt+N``, ``prompt/D+N``)."""

    cls: type[DecodingStrategy]
    share: PromptShare
    recent: int
    settings: tuple[tuple[str, Any], ...] = ()  # the strategy's other settings (e.g. R-KV's buffer)

    def build(self, prompt_tokens: int) -> DecodingStrategy:
        return self.cls(self.share.of(prompt_tokens), self.recent, **dict(self.settings))


PromptTokens = int | Sequence[int] | torch.Tensor | None


def _prompt_lengths(prompt_tokens: PromptTokens) -> list[int]:
    """Per-row prompt lengths from an int, a sequence, 1-D lengths or a 2-D attention mask."""
    if prompt_tokens is None:
        return []
    if isinstance(prompt_tokens, torch.Tensor):
        if prompt_tokens.dim() == 2:  # an attention mask: real tokens per row
            return [int(n) for n in prompt_tokens.sum(-1).tolist()]
        if prompt_tokens.dim() <= 1:
            return [int(n) for n in prompt_tokens.reshape(-1).tolist()]
        raise SpecError(
            f"prompt_tokens: a tensor must be per-row lengths (1-D) or an attention mask (2-D), got shape "
            f"{tuple(prompt_tokens.shape)}."
        )
    if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int | Sequence):
        raise SpecError(f"prompt_tokens must be an int, a sequence of ints or a tensor, got {prompt_tokens!r}.")
    lengths = [prompt_tokens] if isinstance(prompt_tokens, int) else list(prompt_tokens)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in lengths):
        raise SpecError(f"prompt_tokens must be positive whole numbers, got {prompt_tokens!r}.")
    return lengths


@dataclass(frozen=True)
class CacheSpec:
    """A parsed, validated cache spec (:func:`parse_spec`): builds fresh caches on demand.

    Attributes
    ----------
    spec : str
        The spec as written (whitespace removed); the method's name in ``scope-kv eval`` results.
    prefill : PrefillCompressor or None
        The prefill compressor (e.g. ``scope_kv.SnapKV(...)``); ``None`` keeps the prompt whole.
    decoding : DecodingStrategy or None
        The decoding strategy (``Slide``, ``Adaptive``, ...); ``None`` keeps every generated entry
        -- or, for a budget set from the prompt, the strategy comes from :meth:`decoding_for`.
    static, per_query_head : bool
        The :class:`~scope_kv.ScopeCache` keyword arguments of the same names.
    """

    spec: str
    prefill: PrefillCompressor | None = None
    decoding: DecodingStrategy | None = None
    per_prompt: _PerPrompt | None = field(default=None, compare=False, repr=False)
    static: bool = False
    per_query_head: bool = False

    @property
    def is_full(self) -> bool:
        """Whether the cache evicts nothing (``full``)."""
        return self.prefill is None and self.decoding is None and self.per_prompt is None

    @property
    def depends_on_prompt(self) -> bool:
        """Whether the decoding strategy differs with the prompt's length (``prompt+N`` budgets):
        then one cache serves only rows whose prompts have one length."""
        return self.per_prompt is not None

    def decoding_for(self, prompt_tokens: int | None) -> DecodingStrategy | None:
        """The decoding strategy for a prompt of ``prompt_tokens`` real tokens (``prompt+N`` budgets).

        Raises
        ------
        SpecError
            If the budget is set from the prompt and ``prompt_tokens`` is ``None``.
        """
        if self.per_prompt is None:
            return self.decoding
        if prompt_tokens is None:
            raise SpecError(self._needs_prompt())
        return self.per_prompt.build(prompt_tokens)

    def _needs_prompt(self) -> str:
        return (
            f"{self.spec!r} sets its budget from the prompt length: pass it, e.g. "
            f"make_cache(model, {self.spec!r}, prompt_tokens=inputs['input_ids'].shape[-1]) "
            "(or prompt_tokens=inputs['attention_mask'] for a padded batch whose prompts have one length)."
        )

    def make_cache(
        self,
        model: Any,
        prompt_tokens: PromptTokens = None,
        *,
        static: bool | None = None,
        per_query_head: bool | None = None,
    ) -> ScopeCache:
        """A fresh :class:`scope_kv.ScopeCache` for ``model`` configured as this spec.

        Parameters
        ----------
        model : PreTrainedModel
            The model the cache is for.
        prompt_tokens : int, sequence of int, Tensor or None
            The prompt length of each batch row (real tokens, padding excluded): one int for
            batch 1, one per row, or the batch's 2-D attention mask. Needed by ``prompt+N``
            budgets, which need every row's prompt to have one length (group rows with
            :meth:`decoding_for` first); checks that ``prompt/D`` prefill shares leave each
            row more than the compressor's window.
        static, per_query_head : bool or None
            Override the spec's options of the same names (``None``: the spec's).

        Raises
        ------
        SpecError
            If a budget set from the prompt gets no prompt length or rows of different lengths,
            or a share of a prompt is too small for the compressor.
        ValueError
            From :class:`~scope_kv.ScopeCache` (e.g. ``static`` on a flash-attention model).
        """
        lengths = _prompt_lengths(prompt_tokens)
        if self.per_prompt is not None:
            if not lengths:
                raise SpecError(self._needs_prompt())
            if len(set(lengths)) != 1:
                raise SpecError(
                    f"{self.spec}: a unified budget set from the prompt is one number per cache, but the rows' "
                    f"prompts have {len(set(lengths))} different lengths; build one cache per prompt length."
                )
            decoding = self.decoding_for(lengths[0])
        else:
            decoding = self.decoding
        if isinstance(self.prefill, SharedBudget):
            floor = self.prefill.budget
            for n in lengths:
                if self.prefill.share.of(n) < floor and n > floor:
                    raise SpecError(
                        f"{self.spec}: {share_text(self.prefill.share)} of a {n}-token prompt is "
                        f"{self.prefill.share.of(n)} entries, fewer than the {floor} the compressor's window needs; "
                        "use a larger share."
                    )
        return ScopeCache(
            model,
            prefill=self.prefill,
            decoding=decoding,
            static=self.static if static is None else static,
            per_query_head=self.per_query_head if per_query_head is None else per_query_head,
        )


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


def _term(text: str) -> int | PromptShare:
    """``"512"`` -> 512; ``"prompt+64"`` / ``"prompt/4+64"`` / ``"prompt/4"`` -> a PromptShare."""
    if text.isdigit():
        return int(text)
    match = re.fullmatch(r"prompt(?:/(\d+))?(?:\+(\d+))?", text)
    assert match is not None  # callers matched the term grammar
    divisor, extra = match.groups()
    if divisor is not None and int(divisor) < 1:
        raise SpecError(f"prompt/{divisor}: the divisor must be at least 1.")
    return PromptShare(int(divisor or 1), int(extra or 0))


def _split_part(part: str, spec: str) -> tuple[str, str, dict[str, Any]]:
    """``name:budgets,key=value,flag`` (or ``name,flag``) -> (name, budgets text, {key: value})."""
    colon, comma = part.find(":"), part.find(",")
    budgets = ""
    if colon != -1 and (comma == -1 or colon < comma):
        head, items = part[:colon], part[colon + 1 :].split(",")
        if items[0] and "=" not in items[0] and items[0].lower() not in _FLAGS:
            budgets, items = items[0], items[1:]
    elif comma != -1:
        head, items = part[:comma], part[comma + 1 :].split(",")
    else:
        head, items = part, []
    name = _ALIASES.get(head.lower(), head.lower())
    kwargs: dict[str, Any] = {}
    for kv in items:
        key, eq, val = kv.partition("=")
        if not eq and key.lower() in _FLAGS:
            field_name, value = _FLAGS[key.lower()]
        elif not eq or not key:
            raise SpecError(
                f"{spec!r}: expected key=value, static, per_query_head or uncapped after ',' in {part!r}, got {kv!r}."
            )
        else:
            field_name, value = _KEY_ALIASES.get(key, key), _value(val)
        if field_name in kwargs and kwargs[field_name] != value:
            raise SpecError(f"{spec!r}: {field_name} is set twice, differently, in {part!r}; keep one.")
        kwargs[field_name] = value
    return name, budgets, kwargs


def _budget_terms(budgets: str, term: str, part: str, spec: str, example: str) -> list[int | PromptShare]:
    if not budgets:
        return []
    match = re.fullmatch(rf"({term})(?:/({term}))?", budgets)
    if match is None:
        raise SpecError(
            f"{spec!r}: cannot read the budgets {budgets!r} in {part!r}; write whole numbers, e.g. {example}."
        )
    return [_term(t) for t in match.groups() if t is not None]


def _build_decoding(name: str, budgets: str, kwargs: dict, spec: str, max_new_tokens: int | None) -> Any:
    if name == "full":
        if budgets or kwargs:
            raise SpecError(f"{spec!r}: 'full' takes no budget and no settings.")
        return None
    numbers = _budget_terms(budgets, _DECODING_TERM, f"{name}:{budgets}", spec, f"{name}:512/256")
    if len(numbers) != 2:
        raise SpecError(
            f"{spec!r}: {name} needs a budget and a recent window, e.g. {name}:512/256 (budget B / recent r)."
        )
    cls = DECODING_KINDS[name]
    budget, recent = numbers
    for key in ("budget", "recent"):
        if key in kwargs:
            raise SpecError(f"{spec!r}: {key} is set by '{name}:{budgets}' (budget / recent); drop {key}=.")
    if isinstance(recent, PromptShare):
        raise SpecError(f"{spec!r}: only the budget may be set from the prompt, not the recent window.")
    if "cap_budget" in kwargs and name not in _SCHEDULED:
        raise SpecError(
            f"{spec!r}: only adaptive and discontinuous have a growing budget to leave uncapped; {name}'s is fixed."
        )
    if isinstance(budget, PromptShare):
        if not cls.evicts_prompt:
            raise SpecError(
                f"{spec!r}: prompt-relative budgets are for the unified baselines; {name}'s budget counts generated "
                "tokens only (it keeps the prompt whole)."
            )
        per_prompt = _PerPrompt(cls, budget, recent, tuple(sorted(kwargs.items())))
        try:  # validate the settings once, at parse time
            cls(max(budget.extra, recent + 1), recent, **kwargs)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{spec!r}: {exc}") from exc
        return per_prompt
    if name in _SCHEDULED and "max_new_tokens" not in kwargs and "delta" not in kwargs:
        if max_new_tokens is None:
            raise SpecError(
                f"{spec!r}: {name} plans its budget for a generation length; add ',T=<max_new_tokens>' to the spec "
                f"(e.g. {name}:{budgets},T=4096) or pass make_cache(model, spec, max_new_tokens=...)."
            )
        kwargs = {**kwargs, "max_new_tokens": max_new_tokens}
    try:
        return cls(budget, recent, **kwargs)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{spec!r}: {exc}") from exc


def _build_prefill(name: str, budgets: str, kwargs: dict, spec: str) -> PrefillCompressor:
    numbers = _budget_terms(budgets, _PREFILL_TERM, f"{name}:{budgets}", spec, f"{name}:2048")
    if len(numbers) != 1:
        raise SpecError(
            f"{spec!r}: {name} takes one prefill budget (tokens kept), e.g. {name}:2048 or {name}:prompt/4; "
            "other settings go after a comma, e.g. snapkv:2048,window=8."
        )
    (budget,) = numbers
    try:
        if isinstance(budget, PromptShare):
            if name not in SHARED_PREFILL:
                raise SpecError(
                    f"{spec!r}: {name} shapes its budgets per layer; a share of the prompt works with "
                    f"{', '.join(SHARED_PREFILL)}. Give {name} a number of tokens."
                )
            cls: Any = SHARED_PREFILL[name]
            if "budget" in kwargs:
                raise SpecError(f"{spec!r}: the budget is {share_text(budget)}; drop budget=.")
            guard = _PREFILL_FLOOR_FIELD[name]
            floor = kwargs.get(guard, next(f.default for f in fields(cls) if f.name == guard)) + 1
            return cls(budget=floor, share=budget, **kwargs)
        return PREFILL_KINDS[name](budget, **kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, SpecError):
            raise
        raise SpecError(f"{spec!r}: {exc}") from exc


def _cache_options(kwargs: dict[str, Any], spec: str) -> dict[str, bool]:
    """Pop ``static`` / ``per_query_head`` (the cache's options) out of one part's settings."""
    options = {}
    for key in CACHE_OPTIONS:
        if key in kwargs:
            value = kwargs.pop(key)
            if not isinstance(value, bool):
                raise SpecError(f"{spec!r}: {key} is true or false, got {value!r}.")
            options[key] = value
    return options


def parse_spec(spec: str, max_new_tokens: int | None = None) -> CacheSpec:
    """Parse one cache spec (see :mod:`scope_kv.spec` for the grammar).

    Parameters
    ----------
    spec : str
        E.g. ``"snapkv:2048+slide:512/256"``.
    max_new_tokens : int or None
        The generation length; adaptive and discontinuous plan their schedule for it unless the
        spec gives ``T=`` or ``delta=``.

    Returns
    -------
    CacheSpec

    Raises
    ------
    SpecError
        With a message saying what to write instead.
    """
    if not isinstance(spec, str):
        raise SpecError(f"a cache spec is a string such as 'slide:512/256', got {spec!r}.")
    text = re.sub(r"\s+", "", spec)
    if not text:
        raise SpecError("empty cache spec; write e.g. 'full' or 'slide:512/256'.")
    parts = re.split(r"\+(?=[A-Za-z])(?<!prompt\+)", text)
    if len(parts) > 2:
        raise SpecError(f"{spec!r}: at most one '+' (prefill+decoding), e.g. snapkv:2048+slide:512/256.")
    prefill = decoding = None
    parsed = [_split_part(p, text) for p in parts]
    known = set(DECODING_KINDS) | set(PREFILL_KINDS) | {"full"}
    for name, _, _ in parsed:
        if name == "kvpress":
            raise SpecError(
                f"{spec!r}: a kvpress press is a Python object, which a spec cannot build. Build the cache "
                "in Python: ScopeCache(model, prefill=KVPressPrefill(press, budget=...), decoding=...) "
                "(scope_kv.integrations.kvpress; the decoding strategy can come from parse_spec('slide:512/256'))."
            )
        if name not in known:
            raise SpecError(
                f"{spec!r}: unknown method {name!r}; known: {', '.join(sorted(known))} "
                "(prefill compressor first, then '+', then the decoding strategy)."
            )
    options: dict[str, bool] = {}
    for _, _, kw in parsed:
        for key, value in _cache_options(kw, text).items():
            if options.get(key, value) != value:
                raise SpecError(f"{spec!r}: {key} is set twice, differently.")
            options[key] = value
    if len(parsed) == 2:
        (pname, pbudgets, pkw), (dname, dbudgets, dkw) = parsed
        if pname not in PREFILL_KINDS:
            raise SpecError(f"{spec!r}: the part before '+' must be a prefill compressor ({', '.join(PREFILL_KINDS)}).")
        if dname not in DECODING_KINDS and dname != "full":
            raise SpecError(f"{spec!r}: the part after '+' must be a decoding strategy or 'full'.")
        if dname.startswith("unified-"):
            raise SpecError(
                f"{spec!r}: unified baselines compress prompt and output under one budget; they take no prefill "
                f"compressor. Write {dname}:<C+B>/<r> alone."
            )
        prefill = _build_prefill(pname, pbudgets, pkw, text)
        decoding = _build_decoding(dname, dbudgets, dkw, text, max_new_tokens)
    else:
        name, budgets, kw = parsed[0]
        if name in PREFILL_KINDS:
            prefill = _build_prefill(name, budgets, kw, text)
        else:
            decoding = _build_decoding(name, budgets, kw, text, max_new_tokens)
    per_prompt = decoding if isinstance(decoding, _PerPrompt) else None
    if per_prompt is not None:
        decoding = None
    if options.get("static"):
        if decoding is None and per_prompt is None:
            raise SpecError(
                f"{spec!r}: static needs a bounded decoding pool (slide, adaptive, discontinuous or a unified "
                "baseline after the '+'); for an uncompressed cache with static shapes use transformers' StaticCache."
            )
        if decoding is not None and not decoding.bounded:
            raise SpecError(f"{spec!r}: static needs a bounded pool, and an uncapped schedule grows without bound.")
    return CacheSpec(spec=text, prefill=prefill, decoding=decoding, per_prompt=per_prompt, **options)


def make_cache(
    model: Any,
    spec: str | CacheSpec,
    *,
    prompt_tokens: PromptTokens = None,
    max_new_tokens: int | None = None,
    static: bool | None = None,
    per_query_head: bool | None = None,
) -> ScopeCache:
    """A fresh :class:`~scope_kv.ScopeCache` for ``model`` from a spec string.

    ``make_cache(model, "snapkv:2048+slide:512/256")`` is
    ``ScopeCache(model, prefill=SnapKV(2048), decoding=Slide(512, 256))``; the grammar is in
    :mod:`scope_kv.spec` and is the one ``scope-kv eval -m`` reads. Build one cache per
    ``generate`` call (or per conversation).

    Parameters
    ----------
    model : PreTrainedModel
        The model the cache is for.
    spec : str or CacheSpec
        E.g. ``"full"``, ``"slide:512/256"``, ``"adaptive:512/256,T=4096"``,
        ``"unified-h2o:prompt+512/256"``, or a spec :func:`parse_spec` returned.
    prompt_tokens : int, sequence of int, Tensor or None
        The prompt's length (real tokens), one per batch row, or the batch's attention mask.
        Required by budgets set from the prompt (``prompt+N``, ``prompt/D+N`` in a unified
        baseline); also checks that ``prompt/D`` prefill shares are large enough.
    max_new_tokens : int or None
        The ``max_new_tokens`` you give ``generate``: adaptive and discontinuous plan their
        schedule for it unless the spec says ``T=`` or ``delta=``.
    static, per_query_head : bool or None
        :class:`~scope_kv.ScopeCache`'s options; ``None`` takes the spec's (``,static``,
        ``,per_query_head``), default ``False``.

    Returns
    -------
    ScopeCache

    Raises
    ------
    SpecError
        (a ``ValueError``) If the spec cannot be read or built, with what to write instead --
        e.g. an adaptive spec without a length, or a ``prompt+N`` budget without ``prompt_tokens``.

    Examples
    --------
    >>> cache = make_cache(model, "slide:512/256")                           # doctest: +SKIP
    >>> cache = make_cache(model, "adaptive:512/256", max_new_tokens=4096)   # doctest: +SKIP
    >>> cache = make_cache(model, "unified-h2o:prompt+512/256",
    ...                    prompt_tokens=inputs["input_ids"].shape[-1])      # doctest: +SKIP
    """
    if isinstance(spec, CacheSpec):
        parsed = spec
    elif isinstance(spec, str):
        parsed = parse_spec(spec, max_new_tokens)
    else:
        raise SpecError(f"make_cache(model, spec): spec is a string such as 'slide:512/256', got {spec!r}.")
    return parsed.make_cache(model, prompt_tokens, static=static, per_query_head=per_query_head)
