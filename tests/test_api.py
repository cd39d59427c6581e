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
