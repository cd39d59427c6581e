"""The testbed task: execute a program of copies, one line per output item.

The prompt holds ``n_bindings`` facts ``ab=417;`` (a two-letter variable and a three-digit
value), then a
*program* of ``n_items`` lines ``ab>cd;`` ("the new variable ``cd`` gets the value of ``ab``").
The model writes the program executed line by line: for each line it copies the line from the
prompt and appends the value, ``ab>cd=417;``, then ends with ``</s>``::

    prompt:  <s>ab=417;Xy=052;...|ab>cd;cd>ef;Xy>gh;...|
    output:  ab>cd=417;cd>ef=417;Xy>gh=052;...</s>

Every item needs

* the prompt (the *prefill pool*): its own program line (read in order: the pointer into the
  program moves through the prompt as the output grows), and the binding of its source when the
  source is a prompt variable;
* the output written so far (the *decoding pool*): the item that defined its source, when the
  source is an output variable. A value is found after the one ``name=`` of its variable, in the
  prompt (``ab=417;``) or in the output (``..>ab=417;``): the same single-key pattern in both pools.

Sources are drawn per item from three kinds (:class:`Mix`): a prompt variable (uniform); one of
a few *hot* output variables (each output item ``j`` with ``j % hot_period == phase`` is
referenced repeatedly over the next ``n_hot * hot_period`` items, then never again: the heavy
hitters drift along the output, as SCOPE observes in real long outputs, Wu et al., ACL 2025);
or an earlier output variable at a log-uniform distance (near and far references). Every
destination name is fresh, every source is defined before it is used, and each item's answer
is checked by exact match (:func:`score`).

Lengths (one token per name, value or symbol): the prompt is ``4 n_bindings + 4 n_items + 3``
tokens, the output ``6 n_items + 1``. The trained setting (:data:`TRAINED`: 64 bindings, 352
items) has a 1667-token prompt and a 2113-token output; any length with
``n_bindings + n_items <= 2704`` can be generated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .tokenizer import BOS, EOS, EQ, GT, N_NAMES, N_VALUES, NAME0, NAMES, SEMI, SEP, VALUE0

__all__ = [
    "DEFAULT_MIX",
    "KINDS",
    "TRAINED",
    "Example",
    "Item",
    "Mix",
    "Programs",
    "execute",
    "make_example",
    "output_length",
    "program_tokens",
    "prompt_length",
    "sample_programs",
    "score",
]

KINDS: tuple[str, ...] = ("prompt", "hot", "back")


@dataclass(frozen=True)
class Mix:
    """How each item's source variable is drawn.

    Attributes
    ----------
    prompt : float
        Probability that the source is a prompt binding (uniform over them).
    hot : float
        Probability that it is one of the ``n_hot`` current hot output variables.
        The rest (``1 - prompt - hot``) is an earlier output variable at a distance drawn
        log-uniformly in ``[1, i]`` (item ``i``, 0-based).
    n_hot : int
        Hot variables at any time.
    hot_period : int
        Every ``hot_period``-th output item becomes hot (from 2 items after it is written) and
        stays hot for ``n_hot * hot_period`` items.
    """

    prompt: float = 0.3
    hot: float = 0.3
    n_hot: int = 4
    hot_period: int = 16

    def __post_init__(self) -> None:
        if not (0 <= self.prompt <= 1 and 0 <= self.hot <= 1 and self.prompt + self.hot <= 1):
            raise ValueError(f"invalid source mix: prompt={self.prompt}, hot={self.hot}")
        if self.n_hot < 1 or self.hot_period < 1:
            raise ValueError("n_hot and hot_period must be >= 1")


DEFAULT_MIX = Mix()


@dataclass(frozen=True)
class TrainedSetting:
    """The lengths the shipped model is trained for (the final curriculum stage's centre)."""

    n_bindings: int = 64
    n_items: int = 352


TRAINED = TrainedSetting()


def prompt_length(n_bindings: int, n_items: int) -> int:
    """Prompt tokens, ``<s>`` and both ``|`` separators included: ``4 n_bindings + 4 n_items + 3``."""
    return 4 * n_bindings + 4 * n_items + 3


def output_length(n_items: int) -> int:
    """Gold output tokens, ``</s>`` included: ``6 n_items + 1``."""
    return 6 * n_items + 1


@dataclass(frozen=True)
class Programs:
    """A batch of sampled programs, as arrays (``V = n_bindings + n_items`` variables).

    Variable ``v < n_bindings`` is the ``v``-th prompt binding; variable ``n_bindings + i`` is
    the destination of item ``i``.

    Attributes
    ----------
    names : np.ndarray
        ``(B, V)`` int64: each variable's name index into :data:`~.tokenizer.NAMES` (distinct
        within a row).
    values : np.ndarray
        ``(B, V)`` int64 values ``0-999`` (written ``000``-``999``).
    sources : np.ndarray
        ``(B, n_items)`` int64: item ``i``'s source variable, ``< n_bindings + i``.
    kinds : np.ndarray
        ``(B, n_items)`` int8: index into :data:`KINDS` (how the source was drawn).
    n_bindings : int
    """

    names: np.ndarray
    values: np.ndarray
    sources: np.ndarray
    kinds: np.ndarray
    n_bindings: int

    @property
    def n_items(self) -> int:
        return self.sources.shape[1]


def _distinct_names(rng: np.random.Generator, batch: int, count: int) -> np.ndarray:
    """``(batch, count)`` name indices, distinct within each row, uniformly random."""
    if count > N_NAMES:
        raise ValueError(f"{count} variables need more than the {N_NAMES} names there are")
    if count * count <= N_NAMES:
        # Few names: draw with replacement and redraw the rows that repeat one (cheap).
        names = rng.integers(0, N_NAMES, (batch, count))
        while True:
            s = np.sort(names, axis=1)
            bad = (s[:, 1:] == s[:, :-1]).any(axis=1)
            if not bad.any():
                return names
            names[bad] = rng.integers(0, N_NAMES, (int(bad.sum()), count))
    return rng.permuted(np.tile(np.arange(N_NAMES), (batch, 1)), axis=1)[:, :count]


def sample_programs(
    rng: np.random.Generator, batch: int, n_bindings: int, n_items: int, mix: Mix = DEFAULT_MIX
) -> Programs:
    """Sample ``batch`` programs with the same lengths.

    Parameters
    ----------
    rng : np.random.Generator
    batch : int
    n_bindings : int
        Prompt bindings (>= 1).
    n_items : int
        Program lines = output items (>= 1).
    mix : Mix
        How sources are drawn.

    Returns
    -------
    Programs
    """
    if n_bindings < 1 or n_items < 1:
        raise ValueError("n_bindings and n_items must be >= 1")
    N, M, B = n_bindings, n_items, batch
    names = _distinct_names(rng, B, N + M)
    values = np.zeros((B, N + M), dtype=np.int64)
    values[:, :N] = rng.integers(0, N_VALUES, (B, N))

    i = np.arange(M)[None, :]  # item index
    u = rng.random((B, M))
    kind = np.where(u < mix.prompt, 0, np.where(u < mix.prompt + mix.hot, 1, 2))
    kind[:, 0] = 0  # nothing written yet
    prompt_src = rng.integers(0, N, (B, M))
    # earlier output item at a log-uniform distance d in [1, i]
    d = np.floor((i + 1.0) ** rng.random((B, M))).astype(np.int64)
    back_item = i - np.clip(d, 1, np.maximum(i, 1))
    # hot: anchors j = phase (mod hot_period), j <= i - 2; one of the n_hot most recent
    phase = rng.integers(0, mix.hot_period, (B, 1))
    newest = (i - 2) - np.mod(i - 2 - phase, mix.hot_period)
    hot_item = newest - mix.hot_period * rng.integers(0, mix.n_hot, (B, M))
    kind = np.where((kind == 1) & (hot_item < 0), 2, kind)
    src_item = np.where(kind == 1, hot_item, back_item)
    sources = np.where(kind == 0, prompt_src, N + src_item)

    rows = np.arange(B)
    for k in range(M):
        values[:, N + k] = values[rows, sources[:, k]]
    return Programs(names=names, values=values, sources=sources, kinds=kind.astype(np.int8), n_bindings=N)


def program_tokens(programs: Programs) -> tuple[np.ndarray, int]:
    """Token ids of prompt + gold output, one row per program.

    Layout: ``<s>``, bindings (4 tokens each), ``|``, program (4 each), ``|``, then the output
    (6 tokens per item, item ``i`` at ``prompt_len + 6 i``) and ``</s>``.

    Parameters
    ----------
    programs : Programs

    Returns
    -------
    ids : np.ndarray
        ``(B, prompt_len + 6 n_items + 1)`` int64.
    prompt_len : int
        Tokens before the first output token.
    """
    N, M = programs.n_bindings, programs.n_items
    B = programs.names.shape[0]
    rows = np.arange(B)[:, None]
    name_tok = NAME0 + programs.names
    src_tok = name_tok[rows, programs.sources]
    dst_tok = name_tok[:, N:]
    val_tok = VALUE0 + programs.values
    const = lambda t, n: np.full((B, n), t, dtype=np.int64)  # noqa: E731
    bind = np.stack([name_tok[:, :N], const(EQ, N), val_tok[:, :N], const(SEMI, N)], axis=-1).reshape(B, 4 * N)
    prog = np.stack([src_tok, const(GT, M), dst_tok, const(SEMI, M)], axis=-1).reshape(B, 4 * M)
    out = np.stack([src_tok, const(GT, M), dst_tok, const(EQ, M), val_tok[:, N:], const(SEMI, M)], axis=-1).reshape(
        B, 6 * M
    )
    ids = np.concatenate([const(BOS, 1), bind, const(SEP, 1), prog, const(SEP, 1), out, const(EOS, 1)], axis=1)
    return ids, prompt_length(N, M)


@dataclass(frozen=True)
class Item:
    """One output item (one program line, executed).

    Attributes
    ----------
    index : int
        Position in the output (0-based).
    src, dst : str
        Source and (fresh) destination variable names.
    value : int
        The gold value (the source's value), 0-999.
    kind : str
        How the source was drawn: ``"prompt"``, ``"hot"`` or ``"back"``.
    src_item : int
        Index of the output item that defined ``src``; -1 for a prompt variable.
    text : str
        The gold item, ``"ab>cd=417;"``.
    chars : tuple[int, int]
        ``[start, end)`` of ``text`` in the gold output text.
    tokens : tuple[int, int]
        ``[start, end)`` of the item's tokens in the gold output tokens (the first generated
        token is 0).
    """

    index: int
    src: str
    dst: str
    value: int
    kind: str
    src_item: int
    text: str
    chars: tuple[int, int]
    tokens: tuple[int, int]


@dataclass(frozen=True)
class Example:
    """One testbed example.

    Attributes
    ----------
    seed, n_bindings, n_items : int
    prompt : str
        Prompt text, without ``<s>`` (the tokenizer adds it).
    output : str
        Gold output text, without ``</s>``.
    bindings : tuple[tuple[str, int], ...]
        The prompt's ``(name, value)`` facts, in order.
    items : tuple[Item, ...]
    prompt_ids : tuple[int, ...]
        Prompt token ids, ``<s>`` first (what ``tokenizer(prompt)`` gives).
    output_ids : tuple[int, ...]
        Gold output token ids, ``</s>`` last.
    """

    seed: int
    n_bindings: int
    n_items: int
    prompt: str
    output: str
    bindings: tuple[tuple[str, int], ...]
    items: tuple[Item, ...] = field(repr=False)
    prompt_ids: tuple[int, ...] = field(repr=False)
    output_ids: tuple[int, ...] = field(repr=False)

    @property
    def answers(self) -> tuple[str, ...]:
        """Each item's gold text, ``"ab>cd=7;"``."""
        return tuple(item.text for item in self.items)


def make_example(
    seed: int, n_bindings: int = TRAINED.n_bindings, n_items: int = TRAINED.n_items, mix: Mix = DEFAULT_MIX
) -> Example:
    """The testbed example of ``seed`` (deterministic: same arguments, same example).

    Parameters
    ----------
    seed : int
        Seeds ``numpy.random.default_rng(seed)``.
    n_bindings : int
        Facts in the prompt.
    n_items : int
        Program lines = output items. ``n_bindings + n_items <= 2704``.
    mix : Mix
        How sources are drawn.

    Returns
    -------
    Example
    """
    progs = sample_programs(np.random.default_rng(seed), 1, n_bindings, n_items, mix)
    ids, plen = program_tokens(progs)
    ids = ids[0]
    N = n_bindings
    names = [NAMES[k] for k in progs.names[0]]
    values = progs.values[0].tolist()
    sources = progs.sources[0].tolist()
    kinds = progs.kinds[0].tolist()
    bindings = tuple((names[v], values[v]) for v in range(N))
    prompt = "".join(f"{n}={v:03d};" for n, v in bindings) + "|"
    prompt += "".join(f"{names[s]}>{names[N + i]};" for i, s in enumerate(sources)) + "|"
    items, pos = [], 0
    for i, s in enumerate(sources):
        text = f"{names[s]}>{names[N + i]}={values[N + i]:03d};"
        items.append(
            Item(
                index=i,
                src=names[s],
                dst=names[N + i],
                value=values[N + i],
                kind=KINDS[kinds[i]],
                src_item=s - N if s >= N else -1,
                text=text,
                chars=(pos, pos + len(text)),
                tokens=(6 * i, 6 * i + 6),
            )
        )
        pos += len(text)
    return Example(
        seed=seed,
        n_bindings=n_bindings,
        n_items=n_items,
        prompt=prompt,
        output="".join(item.text for item in items),
        bindings=bindings,
        items=tuple(items),
        prompt_ids=tuple(int(t) for t in ids[:plen]),
        output_ids=tuple(int(t) for t in ids[plen:]),
    )


_BINDING = re.compile(r"([A-Za-z]{2})=([0-9]{3});")
_LINE = re.compile(r"([A-Za-z]{2})>([A-Za-z]{2});")
_ITEM = re.compile(r"([A-Za-z]{2})>([A-Za-z]{2})=([0-9]{3})")


def execute(prompt: str) -> str:
    """Run a prompt's program directly on its text: the gold output (a reference interpreter).

    Parameters
    ----------
    prompt : str
        ``"ab=417;...|ab>cd;...|"`` (a leading ``<s>`` is ignored).

    Returns
    -------
    str
        ``"ab>cd=417;..."``.

    Raises
    ------
    ValueError
        If the prompt is malformed or uses a variable before defining it.
    """
    prompt = prompt.removeprefix("<s>")
    parts = prompt.split("|")
    if len(parts) != 3 or parts[2]:
        raise ValueError("a prompt is 'bindings|program|'")
    env: dict[str, int] = {}
    for name, value in _BINDING.findall(parts[0]):
        env[name] = int(value)
    out = []
    for src, dst in _LINE.findall(parts[1]):
        if src not in env:
            raise ValueError(f"{src} used before it is defined")
        env[dst] = env[src]
        out.append(f"{src}>{dst}={env[dst]:03d};")
    return "".join(out)


def score(example: Example, generated: str) -> list[bool]:
    """Per-item exact match of a generated output against the example's gold items.

    The generated text is cut at ``</s>`` and split at ``;``; each piece that reads
    ``src>dst=value`` answers the item whose destination is ``dst`` (destinations are unique;
    the first such piece counts). Item ``i`` is correct iff its answer is exactly
    ``src_i>dst_i=value_i``: right line, right value. Missing items (the model stopped early,
    skipped a line, wrote garbage) are wrong; later items are still scored.

    Parameters
    ----------
    example : Example
    generated : str
        The decoded generation (special tokens other than ``</s>`` may be left in).

    Returns
    -------
    list[bool]
        ``n_items`` flags, in output order.
    """
    generated = generated.split("</s>", 1)[0]
    answers: dict[str, str] = {}
    for piece in generated.split(";"):
        m = _ITEM.fullmatch(piece.replace("<pad>", "").replace("<s>", ""))
        if m and m.group(2) not in answers:
            answers[m.group(2)] = f"{m.group(1)}>{m.group(2)}={m.group(3)};"
    return [answers.get(item.dst) == item.text for item in example.items]
