"""Every mask format scope_kv reads or writes (scope_kv.masks), without a model."""

from __future__ import annotations

import pytest
import torch
from transformers.masking_utils import sdpa_mask

from scope_kv.masks import (
    _physical_flash_mask,
    _scope_sdpa_mask,
    decode_key_mask,
    head_mask,
    layer_mask,
    leading_invalid,
    mask_format,
    valid_from_start,
    valid_slots,
)

CPU = torch.device("cpu")
PADS = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)


def test_valid_slots_understands_every_mask_format():
    batch, length = 2, 6
    sdpa = PADS[:, None, None, :]
    eager = torch.zeros(batch, 1, 1, length).masked_fill(~sdpa, torch.finfo(torch.float32).min)
    flash = PADS.long()
    for mask in (sdpa, eager, flash):
        assert torch.equal(valid_slots(mask, batch, length, CPU), PADS)
    assert valid_slots(None, batch, length, CPU) is None
    # longer 4-D masks (sized for a longer layer) are sliced to the held length
    assert valid_slots(torch.ones(1, 1, 1, 9, dtype=torch.bool), batch, length, CPU).shape == (2, 6)
    with pytest.raises(ValueError, match="unexpected attention mask"):
        valid_slots(torch.ones(2, 1, 6, dtype=torch.bool), batch, length, CPU)


def test_leading_invalid_and_valid_from_start_are_inverse():
    start = leading_invalid(PADS, 2, CPU)
    assert start.tolist() == [2, 0]
    assert torch.equal(valid_from_start(start, 6), PADS)
    assert leading_invalid(None, 3, CPU).tolist() == [0, 0, 0]


@pytest.mark.parametrize("q_len", [1, 3])
def test_layer_mask_formats_agree_with_each_other(q_len):
    """sdpa (bool), eager (additive) and flash (2-D) describe the same slots; sdpa/eager are causal
    in physical slots (query i at slot length - q_len + i)."""
    length = PADS.shape[1]
    sdpa = layer_mask("sdpa", PADS, q_len, torch.float32)
    eager = layer_mask("eager", PADS, q_len, torch.float16)
    flash = layer_mask("flash_attention_2", PADS, q_len, torch.float32)
    assert sdpa.dtype == torch.bool and sdpa.shape == (2, 1, q_len, length)
    assert eager.dtype == torch.float16 and torch.equal(eager == 0, sdpa)
    assert (eager[~sdpa] == torch.finfo(torch.float16).min).all()
    for i in range(q_len):
        last = length - q_len + i
        want = PADS & (torch.arange(length) <= last)
        assert torch.equal(sdpa[:, 0, i], want)
    assert flash.dtype == torch.int32 and torch.equal(flash.bool(), PADS)
    assert layer_mask("flash_attention_3", torch.ones(2, 6, dtype=torch.bool), q_len, torch.float32) is None
    # reading a built mask back gives the valid slots of the last query
    assert torch.equal(valid_slots(sdpa, 2, length, CPU), PADS)
    assert torch.equal(valid_slots(eager, 2, length, CPU), PADS)


def test_unknown_backend_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="sdpa"):
        mask_format("paged_attention")


def test_decode_key_mask():
    mask = layer_mask("sdpa", PADS, 1, torch.float32)
    assert torch.equal(decode_key_mask(mask, 6), PADS[:, None])
    assert decode_key_mask(None, 6) is None
    # a per-query-head mask (static layout: 2 KV heads x group 3) comes back one row per KV head
    per_head = torch.rand(2, 2, 6) > 0.5
    sdpa = head_mask("sdpa", per_head, 6, torch.float32)
    assert sdpa.shape == (2, 6, 1, 6) and torch.equal(sdpa[:, 3, 0], per_head[:, 1])
    assert torch.equal(decode_key_mask(sdpa, 6, kv_heads=2), per_head)
    eager = head_mask("eager", per_head, 6, torch.float16)
    assert torch.equal(eager == 0, sdpa)
    with pytest.raises(ValueError, match="per-head masks"):
        head_mask("flash_attention_2", per_head, 6, torch.float32)
    with pytest.raises(ValueError, match="boolean 4-D"):
        decode_key_mask(layer_mask("eager", PADS, 1, torch.float32), 6)


def test_flash_mask_is_sliced_in_physical_coordinates():
    # logical 2-D mask of 10 columns: row 0 has 3 left pads; the layer holds 6 physical slots
    # (pads first) and the step adds 1 query: kv_length = 7, offset 0.
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, :3] = False
    sliced = _physical_flash_mask(2, 1, 7, q_offset=6, kv_offset=0, attention_mask=mask)
    assert torch.equal(sliced, mask[:, :7])  # transformers' right-slicing would drop the pads
    assert not sliced[0, :3].any() and sliced[0, 3:].all()
    # no padding in the held slots -> None (plain causal flash path)
    assert _physical_flash_mask(2, 1, 7, attention_mask=torch.ones(2, 10, dtype=torch.bool)) is None
    assert _physical_flash_mask(2, 1, 7, attention_mask=None) is None
    # for a stock cache (offset + length == mask length) it equals transformers' right slice
    full = _physical_flash_mask(2, 1, 10, attention_mask=mask)
    assert torch.equal(full, mask[:, -10:])


def test_scope_sdpa_mask_skips_only_when_every_slot_is_visible():
    assert _scope_sdpa_mask(2, 1, 10, q_offset=9, kv_offset=0, device="cpu") is None
    # A static-style buffer (slots beyond the query) keeps its mask, identical to transformers'.
    got = _scope_sdpa_mask(2, 1, 16, q_offset=9, kv_offset=0, device="cpu", allow_is_causal_skip=False)
    expected = sdpa_mask(2, 1, 16, q_offset=9, kv_offset=0, device="cpu", allow_is_causal_skip=False)
    assert got is not None and torch.equal(got, expected)
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[0, :3] = False
    got = _scope_sdpa_mask(2, 1, 10, q_offset=9, kv_offset=0, attention_mask=padding, device="cpu")
    assert got is not None and not got[0, 0, 0, :3].any() and got[1].all()


def test_one_test_says_which_backends_are_flash_kernels():
    from scope_kv.attention import SUPPORTED_BACKENDS, register_backend
    from scope_kv.masks import is_flash_backend

    flash = {b for b in SUPPORTED_BACKENDS if is_flash_backend(b)}
    assert flash == {"flash_attention_2", "flash_attention_3", "flash_attention_4"}
    # the registered names (scope_<backend>) answer as their backends do
    assert all(is_flash_backend(register_backend(b)) == (b in flash) for b in SUPPORTED_BACKENDS if b not in flash)
    assert is_flash_backend("scope_flash_attention_2") and not is_flash_backend("scope_sdpa")
