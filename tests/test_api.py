"""The public API is explicit and pinned."""

from __future__ import annotations

import subprocess
import sys

import scope_kv

EXPECTED = {
    "Adaptive",
    "AttentionStep",
    "DecodingStrategy",
    "Discontinuous",
    "H2O",
    "MorphKV",
    "PrefillCompressor",
    "PyramidKV",
    "RKV",
    "ScopeCache",
    "ScopeLayer",
    "Slide",
    "SnapKV",
    "StreamingLLM",
    "UnifiedH2O",
    "UnifiedMorphKV",
    "UnifiedRKV",
    "UnifiedStreamingLLM",
    "make_cache",
    "__version__",
}


def test_public_names_are_pinned():
    assert set(scope_kv.__all__) == EXPECTED
    for name in scope_kv.__all__:
        assert hasattr(scope_kv, name)


def test_import_patches_nothing():
    """Importing scope_kv registers no attention function: that happens only in ScopeCache(model)."""
    code = (
        "import scope_kv\n"
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS\n"
        "names = list(ALL_ATTENTION_FUNCTIONS.valid_keys()) + list(ALL_MASK_ATTENTION_FUNCTIONS.valid_keys())\n"
        "assert not [n for n in names if n.startswith('scope_')], names\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_step_record_with_its_lse_is_a_copy_that_stays_frozen():
    """``AttentionStep.with_lse`` (every layer of every eager decode step) gives the same record
    with the log-sum-exp set, leaves the original as it was, and is as frozen as any record."""
    import dataclasses

    import pytest
    import torch

    from scope_kv.step import AttentionStep, DecodeAttention

    t = torch.zeros(1, 2, 1, 4)
    step = AttentionStep(torch.nn.Module(), t, t, t, None, "sdpa", 0.5, softcap=3.0,
                         decode=DecodeAttention("auto", None), kv_repeat=2)
    lse = torch.ones(1, 2, 1)
    with_lse = step.with_lse(lse)
    assert with_lse == dataclasses.replace(step, lse=lse) and with_lse is not step
    assert step.lse is None and with_lse.lse is lse
    with pytest.raises(dataclasses.FrozenInstanceError):
        with_lse.lse = None  # type: ignore[misc]


def test_a_compiled_step_makes_the_record_with_its_lse_without_a_graph_break():
    """A captured decode step builds the record inside the graph: ``with_lse`` must trace with
    ``fullgraph=True`` and give the same record as eager. (torch 2.11's compiler cannot trace the
    eager copy's write into ``__dict__``; newer ones can, so on those this test passes either way
    and ``tests/test_kernels_gpu.py``'s compiled generate is the check on the device.)"""
    import torch

    from scope_kv.step import AttentionStep, DecodeAttention

    t = torch.zeros(1, 2, 1, 4)
    step = AttentionStep(torch.nn.Module(), t, t, t, None, "sdpa", 0.5, decode=DecodeAttention("auto", None))

    def attach(lse: torch.Tensor) -> torch.Tensor:
        made = step.with_lse(lse * 2)
        assert made.scaling == step.scaling and made.module is step.module
        return made.lse + 1

    lse = torch.ones(1, 2, 1)
    compiled = torch.compile(attach, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(lse), attach(lse))
