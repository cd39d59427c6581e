"""The testbed's vocabulary and tokenizer: one token per variable name, value or symbol.

Text is written without spaces. A variable name is two ASCII letters (``ab``, ``xQ``, ``Zz``:
52 x 52 = 2704 names) and is ONE token, so finding a variable's value is a single-key match
(the key is one token, not a pair of characters). A value is three digits (``000``-``999``)
and is one token too, so a lookup has one right answer in a thousand (chance is 0.1 %, and a
wrong binding rarely holds the same value). Every other character is its own token::

    <s> ab = 417 ; ... | ab > cd ; ... | ab > cd = 417 ; ... </s>

Ids (fixed; the task generator writes ids directly, without the tokenizer):

========= ===================================================
0-3       ``<pad>`` ``<s>`` ``</s>`` ``<unk>``
4-7       ``=`` ``;`` ``>`` ``|``
8-1007    the values ``000`` ... ``999``
1008-3711 the 2704 names, ``aa ab ... aZ ba ... ZZ`` (letters ``a-z`` then ``A-Z``)
========= ===================================================

:func:`build_tokenizer` makes a ``transformers`` fast tokenizer from a ``tokenizers`` WordLevel
model (a regex split into names and single characters, a fusing decoder, ``<s>`` prepended,
left padding), so ``AutoTokenizer.from_pretrained(path)`` loads the saved copy offline.
"""

from __future__ import annotations

import string
from typing import Any

__all__ = [
    "BOS",
    "EOS",
    "EQ",
    "GT",
    "NAME0",
    "NAMES",
    "N_NAMES",
    "PAD",
    "SEMI",
    "SEP",
    "SPECIAL_TOKENS",
    "SYMBOLS",
    "UNK",
    "VALUE0",
    "N_VALUES",
    "VOCAB",
    "VOCAB_SIZE",
    "build_tokenizer",
    "decode_ids",
    "encode_text",
]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
SYMBOLS: tuple[str, ...] = ("=", ";", ">", "|")
LETTERS = string.ascii_lowercase + string.ascii_uppercase
NAMES: tuple[str, ...] = tuple(a + b for a in LETTERS for b in LETTERS)
N_NAMES = len(NAMES)

PAD, BOS, EOS, UNK = 0, 1, 2, 3
EQ, SEMI, GT, SEP = 4, 5, 6, 7
N_VALUES = 1000
VALUE0 = 8
NAME0 = VALUE0 + N_VALUES

VOCAB: tuple[str, ...] = SPECIAL_TOKENS + SYMBOLS + tuple(f"{v:03d}" for v in range(N_VALUES)) + NAMES
VOCAB_SIZE = len(VOCAB)
_INDEX = {token: i for i, token in enumerate(VOCAB)}

# A name is two letters, a value three digits; anything else is one character. Specials are
# matched before this.
SPLIT_PATTERN = r"[A-Za-z]{2}|[0-9]{3}|."


def encode_text(text: str) -> list[int]:
    """Token ids of ``text`` (no ``<s>`` added), without the ``tokenizers`` library.

    Same split as the saved tokenizer: special tokens, two-letter names, three-digit values,
    then single characters; anything outside the vocabulary becomes ``<unk>``.

    Parameters
    ----------
    text : str

    Returns
    -------
    list[int]
    """
    import re

    pattern = re.compile("|".join(re.escape(s) for s in SPECIAL_TOKENS) + "|" + SPLIT_PATTERN, re.S)
    return [_INDEX.get(piece, UNK) for piece in pattern.findall(text)]


def decode_ids(ids: Any, skip_special_tokens: bool = True) -> str:
    """Text of token ids (the inverse of :func:`encode_text` on in-vocabulary text).

    Parameters
    ----------
    ids : Iterable[int]
        Token ids; out-of-range ids are written as ``<unk>``.
    skip_special_tokens : bool
        Leave out ``<pad> <s> </s> <unk>``.
    """
    out = []
    for i in ids:
        i = int(i)
        if i < len(SPECIAL_TOKENS) or not 0 <= i < VOCAB_SIZE:
            if not skip_special_tokens:
                out.append(VOCAB[i] if 0 <= i < VOCAB_SIZE else "<unk>")
            continue
        out.append(VOCAB[i])
    return "".join(out)


def build_tokenizer() -> Any:
    """A ``transformers`` fast tokenizer for the testbed vocabulary.

    ``tokenizer(text)`` prepends ``<s>``; padding is on the left (``<pad>``, id 0), as batched
    greedy generation needs; ``decode`` joins tokens without spaces. Save it with
    ``save_pretrained(path)`` and load it back with ``AutoTokenizer.from_pretrained(path)``.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
        model_max_length=1 << 16,
        clean_up_tokenization_spaces=False,
    )
