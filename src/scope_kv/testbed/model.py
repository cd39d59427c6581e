"""The testbed model: a tiny GQA Llama, its configuration, loading and saving.

Full size (:func:`testbed_config`): 6 layers, hidden 256, 8 query heads / 2 KV heads (head dim
32), SwiGLU width 768, tied embeddings over the 3712-token vocabulary, RoPE theta 5e5:
5.48M parameters, 11.0 MB as fp16 safetensors. It is an ordinary ``LlamaForCausalLM``, so
evaluating a cache on it runs transformers' own attention path.

The trained weights are shipped in the package directory ``model/`` (:data:`DEFAULT_MODEL_DIR`):
``config.json``, ``generation_config.json``, ``model.safetensors`` (fp16), ``tokenizer.json``,
``tokenizer_config.json``. ``benchmarks/testbed/train.py`` writes exactly that directory.
"""

from __future__ import annotations

import copy
import logging
import pathlib
from typing import Any

import torch

from .tokenizer import BOS, EOS, PAD, VOCAB_SIZE, build_tokenizer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL_DIR",
    "MAX_FILE_BYTES",
    "TestbedModelMissingError",
    "load_testbed",
    "save_testbed",
    "testbed_config",
]

DEFAULT_MODEL_DIR = pathlib.Path(__file__).resolve().parent / "model"
MAX_FILE_BYTES = 16 * 1024 * 1024

_MISSING_HINT = (
    "The package ships its model in scope_kv/testbed/model/; to train another (about 35 minutes on one H100, over "
    "calls that resume; see benchmarks/testbed/NOTES.md):\n"
    "    python benchmarks/testbed/train.py --out OUT_DIR --ckpt /tmp/testbed_ckpt --time-budget-s 540 --train-s 1350\n"
    "and copy OUT_DIR's files into src/scope_kv/testbed/model/, or pass the directory to "
    "load_testbed(path) (scope-kv eval testbed --model-dir OUT_DIR)."
)


class TestbedModelMissingError(FileNotFoundError):
    """The testbed model directory does not hold a trained model; the message says how to get one."""

    __test__ = False  # not a pytest class


def testbed_config(
    *,
    hidden_size: int = 256,
    num_hidden_layers: int = 6,
    num_attention_heads: int = 8,
    num_key_value_heads: int = 2,
    intermediate_size: int = 768,
    head_dim: int | None = None,
    rope_theta: float = 5e5,
    max_position_embeddings: int = 8192,
    **overrides: Any,
) -> Any:
    """The testbed's ``LlamaConfig`` (full size by default; smaller sizes for tests).

    Parameters
    ----------
    hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size : int
        Geometry.
    head_dim : int, optional
        Width of one head; ``hidden_size // num_attention_heads`` by default.
    rope_theta : float
        RoPE base. Large, so that the slowest rotary pairs barely turn over the 8K positions
        of a 2x-length example and can match keys by content alone.
    max_position_embeddings : int
        Positions the model is trained to see (training shifts position ids at random up to
        this bound).
    **overrides
        Any other ``LlamaConfig`` field.

    Returns
    -------
    transformers.LlamaConfig
    """
    from transformers import LlamaConfig

    fields: dict[str, Any] = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim or hidden_size // num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        tie_word_embeddings=True,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rms_norm_eps=1e-5,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def save_testbed(model: Any, path: str | pathlib.Path, tokenizer: Any | None = None) -> list[pathlib.Path]:
    """Write ``model`` (as fp16 safetensors) and the tokenizer to ``path``.

    The model is copied before the cast, so the caller's weights and dtype are unchanged.

    Parameters
    ----------
    model : LlamaForCausalLM
    path : str or pathlib.Path
        Created if missing; existing files of the same names are replaced.
    tokenizer : PreTrainedTokenizerFast, optional
        :func:`~.tokenizer.build_tokenizer` by default.

    Returns
    -------
    list[pathlib.Path]
        The files written.

    Raises
    ------
    ValueError
        If a written file is larger than 16 MiB (:data:`MAX_FILE_BYTES`).
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(model).to(device="cpu", dtype=torch.float16)
    gen = half.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS, EOS, PAD
    gen.do_sample = False
    half.save_pretrained(path, safe_serialization=True)
    (tokenizer if tokenizer is not None else build_tokenizer()).save_pretrained(path)
    files = sorted(p for p in path.iterdir() if p.is_file())
    too_big = [f"{p.name} ({p.stat().st_size} bytes)" for p in files if p.stat().st_size > MAX_FILE_BYTES]
    if too_big:
        raise ValueError(f"files over {MAX_FILE_BYTES} bytes: {', '.join(too_big)}")
    return files


def load_testbed(
    path: str | pathlib.Path | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "sdpa",
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """Load the testbed model and its tokenizer (offline).

    Parameters
    ----------
    path : str or pathlib.Path, optional
        A directory written by :func:`save_testbed`; the shipped ``model/`` directory of this
        package by default.
    dtype : torch.dtype
        Weights' dtype after loading (fp32 by default: the fastest and most exact on CPU).
    attn_implementation : str
        ``"sdpa"`` or ``"eager"``.
    device : str or torch.device

    Returns
    -------
    model : LlamaForCausalLM
        In eval mode.
    tokenizer : PreTrainedTokenizerFast
        Left padding, pad token ``<pad>``.

    Raises
    ------
    TestbedModelMissingError
        If the directory has no ``config.json`` / ``model.safetensors``.
    """
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = pathlib.Path(path) if path is not None else DEFAULT_MODEL_DIR
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (path / name).is_file()]
    if missing:
        raise TestbedModelMissingError(
            f"No trained testbed model in {path} (missing {', '.join(missing)}).\n{_MISSING_HINT}"
        )
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    if torch.device(device) != model.device:
        model = model.to(device)  # type: ignore[arg-type]  # transformers types .to's first argument oddly
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = "<pad>"
    logger.info("loaded the testbed model from %s (%d parameters)", path, model.num_parameters())
    return model, tokenizer
