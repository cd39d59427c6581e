"""Every attention-mask format scope_kv reads or writes, in one place (docs/method.md §8).

A managed layer describes its held slots by one boolean ``valid`` tensor of shape
``(batch, length)`` (True = a real entry): left padding, and the filler a compressed row keeps
in front of its entries, are invalid. Each attention backend wants that fact in its own
format; this module turns ``valid`` into each format (:func:`layer_mask`), reads it back from
whatever mask transformers built (:func:`valid_slots`), and provides the mask functions that
transformers' ``AttentionMaskInterface`` calls for the ``scope_*`` implementations
(:func:`transformers_mask_function`).

Adding a backend means adding one :class:`MaskFormat` to ``_FORMATS``.

Coordinates are physical: column ``j`` of every mask is slot ``j`` of the layer's storage,
and the query of a forward with ``q`` tokens at position ``i`` sits at slot
``length - q + i`` (causality in slots).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.masking_utils import causal_mask_function, eager_mask, sdpa_mask

__all__ = [
    "MaskFormat",
    "RowValidity",
    "causal_allowed",
    "additive_key_bias",
    "decode_key_mask",
    "head_mask",
    "layer_mask",
    "leading_invalid",
    "mask_format",
    "slot_validity_bytes",
    "transformers_mask_function",
    "valid_slots",
]


def valid_slots(
    attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device
) -> torch.Tensor | None:
    """Which key slots the forward's *last* query may attend to, read from a backend's mask.

    Parameters
    ----------
    attention_mask : Tensor or None
        What the model passed to its attention function: ``None``; a boolean
        ``(batch or 1, heads or 1, q, kv)`` mask (sdpa); an additive float mask of the same shape
        (eager, ``finfo.min`` = blocked); or a 2-D ``(batch, kv)`` padding mask (flash attention).
    batch, length : int
        Batch size and number of key slots held.
    device : torch.device
        Where the result lives.

    Returns
    -------
    Tensor or None
        Boolean ``(batch, length)``, or ``None`` when every slot is valid.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        mask = attention_mask[:, :length].to(device=device, dtype=torch.bool)
    elif attention_mask.dim() == 4:
        # (per-head masks, as a static-layout layer builds, are read for their first head: such a
        # layer hands its per-KV-head validity to the step record itself)
        row = attention_mask[:, 0, -1, :length]
        mask = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
    else:
        raise ValueError(f"unexpected attention mask of shape {tuple(attention_mask.shape)}")
    return mask.expand(batch, length).to(device)


def leading_invalid(valid: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
    """Leading invalid (padding) slots per batch row.

    Parameters
    ----------
    valid : Tensor or None
        Boolean ``(batch, length)`` from :func:`valid_slots`; ``None`` means every slot is valid.

    Returns
    -------
    Tensor
        ``(batch,)`` int64: how many slots at the front of each row are invalid.
    """
    if valid is None:
        return torch.zeros(batch, dtype=torch.long, device=device)
    return (valid.long().cumsum(-1) == 0).sum(-1)


def valid_from_start(start: torch.Tensor, length: int) -> torch.Tensor:
    """``(batch, length)`` boolean: slot ``j`` of row ``b`` is valid when ``j >= start[b]``."""
    return torch.arange(length, device=start.device)[None, :] >= start[:, None]


class RowValidity:
    """Which of a layer's held slots are real entries, row by row.

    Until something in the prefill pool is evicted, pads lead every row and transformers' mask
    describes the slots. After a prefill compressor or a unified baseline evicted prompt entries,
    rows hold different numbers of leading invalid slots (pads, or filler that keeps the physical
    length one number for the batch): ``start``. A prefill whose mask has an invalid slot behind a
    valid one (a masked span, right padding, a padded later turn) leaves ``holes`` until the layer
    compacts them away.

    Attributes
    ----------
    start : Tensor or None
        ``(batch,)`` leading invalid slots per row (``None``: not learned yet, every slot valid).
    holes : Tensor or None
        ``(batch, length)`` validity of every held slot while invalid slots sit behind valid ones.
    all_valid : bool
        No slot is invalid (then a decode step needs no mask).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start: torch.Tensor | None = None
        self.holes: torch.Tensor | None = None
        self.all_valid = False
        self._host: tuple[torch.Tensor, tuple[int, ...]] | None = None  # (the start it mirrors, values)

    def map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.start is not None:
            self.start = fn(self.start)
        if self.holes is not None:
            self.holes = fn(self.holes)

    def starts(self, batch: int, device: torch.device) -> torch.Tensor:
        """``start``, or zeros while it is not known."""
        if self.start is None:
            return torch.zeros(batch, dtype=torch.long, device=device)
        return self.start

    def set_start(self, start: torch.Tensor, host: list[int] | None = None) -> None:
        """Every invalid slot now leads its row: ``start[b]`` of them (``host``: the same numbers
        known on the host, which spares reading them back from the device)."""
        self.start, self.holes = start, None
        self._host = None if host is None else (start, tuple(host))
        self.all_valid = not any(host) if host is not None else not bool(start.any())

    def host_starts(self, batch: int) -> tuple[int, ...]:
        """``start`` on the host: read from the device once after it changed there, then kept."""
        if self.start is None:
            return (0,) * batch
        if self._host is None or self._host[0] is not self.start:
            self._host = (self.start, tuple(self.start.tolist()))
        return self._host[1]

    def slots(self, batch: int, length: int, device: torch.device) -> torch.Tensor:
        """``(batch, length)`` boolean: which held slots are real entries."""
        if self.holes is not None:
            return self.holes[:, :length]
        return valid_from_start(self.starts(batch, device), length)

    def observe(self, valid: torch.Tensor) -> bool:
        """Learn the ``(batch, length)`` validity of every slot a prefill forward attends; whether
        it leaves holes (an invalid slot behind a valid one)."""
        batch, length = valid.shape
        self.start = leading_invalid(valid, batch, valid.device)
        if self.holes is None and bool((valid == valid_from_start(self.start, length)).all()):
            return False
        self.holes = valid
        return True

    def hole_choice(
        self, kv_heads: int, length: int, scores: torch.Tensor | None = None, counts: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What compacting the holes away keeps: ``(scores, counts, lead)`` for
        :func:`scope_kv.selection.keep_top_` (invalid slots scored ``-inf``; per row, the valid
        slots, or a prefill compressor's ``scores`` / ``counts`` among them; the leading invalid
        slots). The kept entries then move to the end of ``[0, n)`` in order, and the filler in
        front of them becomes ``start`` (:meth:`set_start`)."""
        valid = self.holes
        assert valid is not None
        real = valid.sum(-1)
        counts = real if counts is None else torch.minimum(counts, real)
        if scores is None:
            scores = torch.zeros(valid.shape[0], kv_heads, length, device=valid.device)
        scores = scores.float().masked_fill(~valid[:, None, :length], float("-inf"))
        return scores, counts, leading_invalid(valid, valid.shape[0], valid.device)


def causal_allowed(
    start: torch.Tensor | None, first_slot: int, q_len: int, length: int, batch: int, device: torch.device
) -> torch.Tensor:
    """``(batch, q_len, length)`` boolean: which held slots each of a block of queries may see.

    Query ``i`` sits at slot ``first_slot + i`` and sees slots ``start[b] <= j <= first_slot + i``
    (``start``: leading invalid slots per row; ``None``: every slot valid)."""
    slots = torch.arange(length, device=device)
    positions = first_slot + torch.arange(q_len, device=device)
    allowed = slots[None, :] <= positions[:, None]  # (q, length)
    if start is None:
        return allowed[None].expand(batch, q_len, length)
    return allowed[None] & (slots[None, None, :] >= start[:, None, None])


def _causal(valid: torch.Tensor, q_len: int) -> torch.Tensor:
    """``(batch, 1, q, length)`` boolean: query ``i`` sees valid slots up to its own."""
    length = valid.shape[-1]
    slots = torch.arange(length, device=valid.device)
    last = length - q_len + torch.arange(q_len, device=valid.device)
    causal = slots[None, :] <= last[:, None]  # (q, length)
    return (valid[:, None, :] & causal[None])[:, None]


def _sdpa_format(valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    return _causal(valid, q_len)


def _eager_format(valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    allowed = _causal(valid, q_len)
    return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _flash_format(valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    # Flash kernels take causality themselves (bottom-right aligned) and padding as a 2-D mask
    # that sends them down the varlen path; no mask at all when nothing is invalid.
    return None if bool(valid.all()) else valid.to(torch.int32)


def _physical_padding(attention_mask: torch.Tensor | None, q_length: int, kv_length: int, kv_offset: int) -> Any:
    """The 2-D padding mask in a managed layer's physical slots.

    transformers reads column ``j`` of the logical 2-D mask (one column per token seen) for slot
    ``j``. A managed layer's held slots ``[0, kv_length - q_length)`` are the prompt's (pads in
    front, never moved while transformers' mask is used) followed by entries in arrival order,
    so the prefix reads right; but once entries were evicted the layer holds fewer slots than
    tokens seen, and the forward's own ``q_length`` tokens -- the last slots -- would read columns
    of earlier tokens. They take the mask's last ``q_length`` columns instead, so a padded later
    turn (or a chunk's pads) is seen where it is. (Layers that were compressed or met a hole use
    their own mask for the held slots; the forward's columns are read from here, :mod:`scope_kv.layer`.)
    Stock caches (logical = physical) and sliding-window layers (``kv_offset > 0``) are unchanged.
    """
    if (
        attention_mask is None
        or attention_mask.dim() != 2
        or kv_offset != 0
        or attention_mask.shape[-1] <= kv_length
        or not 0 < q_length <= kv_length
    ):
        return attention_mask
    return torch.cat([attention_mask[:, : kv_length - q_length], attention_mask[:, -q_length:]], dim=-1)


def _scope_eager_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """transformers' eager mask, over the physical padding mask (:func:`_physical_padding`)."""
    attention_mask = _physical_padding(attention_mask, q_length, kv_length, kv_offset)
    return eager_mask(
        batch_size, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset, attention_mask=attention_mask, **kwargs
    )


def _scope_sdpa_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Callable[..., Any] = causal_mask_function,
    attention_mask: torch.Tensor | None = None,
    local_size: int | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """transformers' sdpa mask, except that one new token with no padding and every held slot
    behind it gets no mask even while tracing or capturing a CUDA graph (transformers then
    materialises an all-True mask, which costs a mask build and the slower masked kernel per
    layer). Exact for any cache: every slot is visible to the query. Padding is read in physical
    slots (:func:`_physical_padding`)."""
    attention_mask = _physical_padding(attention_mask, q_length, kv_length, kv_offset)
    if (
        attention_mask is None
        and q_length == 1
        and isinstance(q_offset, int)
        and kv_offset + kv_length - 1 <= q_offset
        and mask_function is causal_mask_function
        and local_size is None
    ):
        return None
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        **kwargs,
    )


def _physical_flash_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """Flash attention's 2-D padding mask in physical slots (:func:`_physical_padding`), else sliced
    as ``[kv_offset, kv_offset + kv_length)``.

    transformers' own version slices from the right, which for ScopeCache (physical length
    shorter than the logical mask) would drop the pad columns at the front. For every stock
    cache the slicings coincide.
    """
    if attention_mask is None:
        return None
    mask = _physical_padding(attention_mask, q_length, kv_length, kv_offset)[:, kv_offset : kv_offset + kv_length]
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


@dataclass(frozen=True)
class MaskFormat:
    """How one attention backend takes its mask.

    Attributes
    ----------
    build : callable
        ``build(valid, q_len, dtype)`` -> the backend's mask for a layer whose valid slots are
        ``valid`` (boolean ``(batch, length)``), for a forward of ``q_len`` queries of ``dtype``.
    transformers_mask : callable
        The function registered with transformers' ``AttentionMaskInterface`` for the
        ``scope_<backend>`` implementation (transformers calls it once per forward).
    """

    build: Callable[[torch.Tensor, int, torch.dtype], torch.Tensor | None]
    transformers_mask: Callable[..., Any]


_FLASH = MaskFormat(_flash_format, _physical_flash_mask)
_FORMATS: dict[str, MaskFormat] = {
    "sdpa": MaskFormat(_sdpa_format, _scope_sdpa_mask),
    "eager": MaskFormat(_eager_format, _scope_eager_mask),
    "flash_attention_2": _FLASH,
    "flash_attention_3": _FLASH,
    "flash_attention_4": _FLASH,
}


# The prefix of the attention implementations scope_kv registers (``scope_sdpa`` ...); defined here,
# where the backends' mask formats are, and re-exported by scope_kv.attention as PREFIX.
BACKEND_PREFIX = "scope_"


def is_flash_backend(backend: str) -> bool:
    """Whether ``backend`` (an attention implementation's name, with or without scope_kv's prefix)
    is a flash-attention kernel: no per-head masks, padding passed as a 2-D mask."""
    return backend.removeprefix(BACKEND_PREFIX).startswith("flash_attention")


def mask_format(backend: str) -> MaskFormat:
    """The :class:`MaskFormat` of ``backend`` (``sdpa``, ``eager``, ``flash_attention_2/3/4``)."""
    try:
        return _FORMATS[backend]
    except KeyError:
        raise ValueError(f"no mask format for attention backend {backend!r}; known: {sorted(_FORMATS)}.") from None


def layer_mask(backend: str, valid: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor | None:
    """A layer's own mask in ``backend``'s format.

    Parameters
    ----------
    backend : str
        ``"sdpa"`` gives boolean ``(batch, 1, q, length)`` (True = attend); ``"eager"`` additive
        float ``(batch, 1, q, length)`` of ``dtype`` (``finfo.min`` = blocked); a flash backend a
        2-D int32 ``(batch, length)`` padding mask (causality left to the kernel), or ``None``
        when every slot is valid.
    valid : Tensor
        ``(batch, length)`` boolean, the layer's valid slots.
    q_len : int
        Queries in this forward (they sit at the last ``q_len`` slots).
    dtype : torch.dtype
        The query dtype (eager's additive mask).
    """
    return mask_format(backend).build(valid, q_len, dtype)


def transformers_mask_function(backend: str) -> Callable[..., Any]:
    """The mask function to register with ``AttentionMaskInterface`` for ``scope_<backend>``."""
    return mask_format(backend).transformers_mask


def decode_key_mask(attention_mask: torch.Tensor | None, length: int, kv_heads: int = 1) -> torch.Tensor | None:
    """``(batch or 1, kv_heads or 1, length)`` boolean "may attend" of a one-query forward, from an sdpa mask.

    The grouped decode attention (:mod:`scope_kv.kernels`) takes this form: one row of slots per
    KV head (a static-layout layer's validity differs per KV head, shared by its query group).

    Parameters
    ----------
    attention_mask : Tensor or None
        Boolean ``(batch or 1, 1 or q_heads, q, kv)`` sdpa mask.
    length : int
        Key slots held.
    kv_heads : int
        KV heads of the layer; a per-query-head mask is reduced to one row per KV head (the
        heads of a query group share their KV head's slots).

    Raises
    ------
    ValueError
        If the mask is not ``None`` or a boolean 4-D sdpa mask.
    """
    if attention_mask is None:
        return None
    if attention_mask.dtype != torch.bool or attention_mask.dim() != 4:
        raise ValueError("grouped decode attention takes None or a boolean 4-D sdpa mask.")
    rows = attention_mask[:, :, -1, :length]
    if rows.shape[1] > 1:
        rows = rows[:, :: rows.shape[1] // kv_heads]
    return rows


def slot_validity_bytes(
    attention_mask: torch.Tensor | None, batch: int, length: int, kv_heads: int
) -> torch.Tensor | None:
    """A :func:`decode_key_mask` as the split-KV kernel reads it: ``(batch, kv_heads, length)`` int8,
    1 where a slot may be attended (``None``: every slot)."""
    mask = decode_key_mask(attention_mask, length, kv_heads)
    return None if mask is None else mask.expand(batch, kv_heads, length).to(torch.int8)


def additive_key_bias(mask: torch.Tensor, batch: int, kv_heads: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """A :func:`decode_key_mask` as the additive bias PyTorch's memory-efficient kernel takes:
    ``(batch, kv_heads, group, length)``, 0 where a slot may be attended and -inf elsewhere.

    The kernel wants bias rows that start 16-element aligned, so the storage is padded to a
    multiple of 16 slots and sliced (as torch's own sdpa front end does).
    """
    rows, heads, length = mask.shape
    padded = -(-length // 16) * 16
    bias = torch.zeros((rows, heads, padded), dtype=dtype, device=mask.device)
    bias = bias[..., :length].masked_fill_(~mask, float("-inf"))
    return bias[:, :, None, :].expand(batch, kv_heads, group, length)


def head_mask(backend: str, valid: torch.Tensor, q_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """A one-query mask from per-KV-head valid slots, in ``backend``'s format.

    Parameters
    ----------
    backend : str
        ``"sdpa"`` gives boolean ``(batch, q_heads, 1, length)``; ``"eager"`` the additive float
        equivalent of ``dtype``. Flash kernels take no per-head masks.
    valid : Tensor
        ``(batch, kv_heads, length)`` boolean.
    q_heads : int
        Query heads (each KV head's row is repeated over its query group).
    dtype : torch.dtype
        The query dtype (eager's additive mask).
    """
    if is_flash_backend(backend):
        raise ValueError(
            "a static-layout ScopeCache needs per-head masks, which flash kernels do not take; "
            "load the model with attn_implementation='sdpa' (or 'eager')."
        )
    allowed = valid.repeat_interleave(q_heads // valid.shape[1], dim=1)[:, :, None, :]
    if backend == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=valid.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    return allowed
