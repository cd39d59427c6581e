"""The attention-interface plumbing: registration, idempotence, flash mask coordinates."""

from __future__ import annotations

import torch

from conftest import make_model
from scope_kv import ScopeCache, Slide
from scope_kv.attention import _physical_flash_mask, enable_scope_attention


def test_enable_is_idempotent_and_keeps_the_backend():
    for backend in ("sdpa", "eager"):
        model = make_model("llama", backend)
        assert enable_scope_attention(model) == f"scope_{backend}"
        assert enable_scope_attention(model) == f"scope_{backend}"
        ScopeCache(model, decoding=Slide(8, 3))
        assert model.config._attn_implementation == f"scope_{backend}"


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
