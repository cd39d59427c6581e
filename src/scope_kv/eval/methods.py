"""Method specs for the evaluation harnesses: several specs at once, and the gold harness's grid.

A method spec is a cache spec (:mod:`scope_kv.spec`, the grammar; ``scope_kv.make_cache`` builds
one): the CLI's ``-m/--method`` and the library read the same strings with the same parser.
``Method``, ``MethodSpecError`` and ``parse_method`` are that module's ``CacheSpec``,
``SpecError`` and ``parse_spec`` under the names the harnesses use.

Examples: ``full``, ``slide:512/256``, ``adaptive:512/256`` (planned for the run's generation
length unless ``,T=<tokens>`` or ``,delta=<step>`` is given), ``snapkv:2048+slide:512/256``,
``snapkv:2048,window=8,kernel=7,pooling=max``, ``pyramidkv:2048,beta=20+full``,
``unified-h2o:2560/256`` (one budget over prompt and generated entries, docs/method.md §7),
``unified-h2o:prompt+512/256`` (that budget set per prompt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..decoding import DecodingStrategy
from ..spec import DECODING_KINDS, PREFILL_KINDS, CacheSpec, PromptShare, SpecError, parse_spec

__all__ = [
    "DECODING_KINDS",
    "PREFILL_KINDS",
    "Method",
    "MethodSpecError",
    "PromptShare",
    "gold_grid",
    "idle_methods",
    "never_evicts",
    "parse_method",
    "parse_methods",
]

Method = CacheSpec
MethodSpecError = SpecError
parse_method = parse_spec


def _scope_cuts(decoding: DecodingStrategy, decode_entries: int, held: int = 0) -> bool:
    """Whether the strategy's plan evicts an entry within ``decode_entries`` decode steps of a pool
    that starts with ``held`` entries (SCOPE's split: 0; a unified baseline: the prompt), by the
    layer's rule: a step that selects cuts the pool when it holds more than ``B(t)``."""
    skipped = 0
    for t in range(decode_entries):
        held += 1
        select, skipped = decoding.plan(held, t, skipped)
        if select:
            if decoding.budget_at(t) < held:
                return True
            held = decoding.budget_at(t)
    return False


def _prefill_evicts(method: Method, lengths: Sequence[int], num_layers: int) -> bool:
    assert method.prefill is not None
    real = torch.tensor(list(lengths), dtype=torch.long)
    return any(bool((method.prefill.keep_counts(real, i, num_layers) < real).any()) for i in range(num_layers))


def never_evicts(
    method: Method,
    decode_entries: int,
    prompt_tokens: Sequence[int] | None = None,
    num_layers: int = 1,
    length_option: str = "the run's length",
) -> str | None:
    """Why ``method`` evicts nothing in a run, or ``None`` when it does (or cannot be told).

    A run is ``decode_entries`` decode steps (each adds one generated entry: ``steps`` in the
    fidelity harness, ``max_new_tokens - 1`` in ``generate``) after prompts of
    ``prompt_tokens`` tokens. Such a "compressed" method measures the full cache; the CLI warns.

    Parameters
    ----------
    method : Method
        A parsed spec.
    decode_entries : int
        Decode steps of the run.
    prompt_tokens : sequence of int or None
        Each prompt's length; without them, what depends on the prompt (prefill compressors,
        fixed unified budgets) is taken to evict (no warning).
    num_layers : int
        Decoder layers (for per-layer prefill budgets).
    length_option : str
        What sets the run's length where the message is read (a harness's own flag, e.g.
        ``"--max-gold-tokens"``), named in the advice.

    Returns
    -------
    str or None
        A sentence saying what never happens, and what to change.
    """
    if method.is_full:
        return None
    lengths = list(prompt_tokens) if prompt_tokens else None
    fix = f"raise {length_option} or lower the budget"
    prefill_idle = method.prefill is None or (lengths is not None and not _prefill_evicts(method, lengths, num_layers))
    decoding = method.decoding
    if decoding is not None and not decoding.evicts_prompt:
        if _scope_cuts(decoding, decode_entries):
            return None
        pool = (
            f"{decode_entries} decode steps never take the decoding pool past its budget, "
            f"{decoding.budget_at(max(decode_entries - 1, 0))} at the last step"
        )
        if method.prefill is None:
            return f"{method.spec} evicts nothing in this run: {pool}, so it holds what the full cache holds; {fix}."
        what = "nothing is evicted" if prefill_idle else "only the prefill compressor can evict"
        return f"{method.spec}: its decoding strategy evicts nothing in this run ({pool}), so {what}; {fix}."
    # A unified baseline: its own plan over prompt + output (R-KV's selects only once the pool
    # is a buffer past the budget).
    if method.per_prompt is not None:
        per_prompt = method.per_prompt
        if per_prompt.share.divisor == 1 and lengths is None:
            lengths = [0]  # prompt + N: whether it evicts does not depend on the prompt
        if lengths is None or any(_scope_cuts(per_prompt.build(n), decode_entries, n) for n in lengths):
            return None
        return (
            f"{method.spec} evicts nothing in this run: prompt and {decode_entries} generated entries never "
            f"take it to a selection ({per_prompt.share.describe()}); {fix}."
        )
    if decoding is not None:  # a unified baseline with a fixed budget
        if lengths is None or _scope_cuts(decoding, decode_entries, max(lengths)):
            return None
        return (
            f"{method.spec} evicts nothing in this run: the longest prompt ({max(lengths)}) and {decode_entries} "
            f"generated entries never take it to a selection (budget {decoding.budget}); {fix}."
        )
    if prefill_idle:  # a prefill compressor alone, every prompt within its budget
        return f"{method.spec} evicts nothing in this run: every prompt fits in the prefill budget; lower the budget."
    return None


def idle_methods(
    methods: Sequence[Method],
    decode_entries: int,
    prompt_tokens: Sequence[int] | None = None,
    num_layers: int = 1,
    length_option: str = "the run's length",
) -> dict[str, str]:
    """``{spec: reason}`` for the methods that evict nothing in a run (:func:`never_evicts`)."""
    found = {}
    for method in methods:
        reason = never_evicts(method, decode_entries, prompt_tokens, num_layers, length_option)
        if reason is not None:
            found[method.spec] = reason
    return found


def parse_methods(specs: Sequence[str], max_new_tokens: int | None = None) -> tuple[list[Method], dict[str, str]]:
    """Parse several specs; a spec that fails does not stop the others.

    Returns
    -------
    (methods, errors) : tuple[list[Method], dict[str, str]]
        The parsed methods in order, and ``{spec: message}`` for those that failed.
    """
    methods: list[Method] = []
    errors: dict[str, str] = {}
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


def gold_grid(budgets: Sequence[int] = (128, 256, 512), prefill_divisor: int = 4) -> list[str]:
    """The gold-output harness's default methods: every comparison at equal KV memory.

    For each decoding budget ``B`` (recent window ``r = B / 2``), per layer and KV head, with
    ``P`` a row's prompt length and ``C = P / prefill_divisor``:

    * SCOPE on the whole prompt, ``P + B`` entries: ``slide``, ``adaptive``, ``discontinuous``;
    * the unified baselines at the same ``P + B``: ``unified-h2o``, ``unified-streamingllm``;
    * SnapKV(``C``) + slide(``B``) against unified H2O at ``C + B``;
    * R-KV on the split and unified (``rkv``, ``unified-rkv:prompt+...``), whose pool grows by a
      buffer ``b = min(128, B / 4)`` between selections: budget ``B - b``, so it too holds at most
      ``B`` generated (``P + B`` in all) entries; observation window ``min(8, (B - b) / 2)``;
    * MorphKV on the split and unified (``morphkv``, ``unified-morphkv:prompt+...``) at ``B``, with a
      window of ``min(B / 2, max(8, B / 16))`` recent entries (the authors' runs: about 5 %).

    The full cache is the harness's reference (one teacher-forced forward), so it is not listed.
    """
    specs: list[str] = []
    for b in budgets:
        if b < 4 or b % 2:
            raise ValueError(f"gold-grid budgets must be even and >= 4 (recent = B/2), got {b}.")
        r = b // 2
        specs += [f"slide:{b}/{r}", f"adaptive:{b}/{r}", f"discontinuous:{b}/{r}"]
        specs += [f"unified-h2o:prompt+{b}/{r}", f"unified-streamingllm:prompt+{b}/{r}"]
        specs += [f"snapkv:prompt/{prefill_divisor}+slide:{b}/{r}", f"unified-h2o:prompt/{prefill_divisor}+{b}/{r}"]
        buffer = min(128, b // 4)
        budget, window = b - buffer, min(8, (b - buffer) // 2)
        specs += [f"rkv:{budget}/{window},buffer={buffer}", f"unified-rkv:prompt+{budget}/{window},buffer={buffer}"]
        morph = min(b // 2, max(8, b // 16))
        specs += [f"morphkv:{b}/{morph}", f"unified-morphkv:prompt+{b}/{morph}"]
    return specs
