"""scope_kv: SCOPE KV-cache compression (Wu et al., ACL 2025) for Hugging Face Transformers.

The prompt's KV (prefill pool) is kept whole, or compressed once by a prefill compressor
(SnapKV, PyramidKV, H2O, StreamingLLM); the generated tokens' KV (decoding pool) is held
to a budget by a heavy-hitter selector (slide, adaptive or discontinuous)::

    from scope_kv import ScopeCache, Slide
    out = model.generate(**inputs, cache=ScopeCache(model, decoding=Slide(512, 256)),  # past_key_values= before 5.24
                         max_new_tokens=4096)

or, from the method strings ``scope-kv eval`` reads (grammar: :mod:`scope_kv.spec`)::

    from scope_kv import make_cache
    cache = make_cache(model, "snapkv:2048+slide:512/256")
"""

from .cache import ScopeCache
from .decoding import Adaptive, DecodingStrategy, Discontinuous, Slide, UnifiedH2O, UnifiedStreamingLLM
from .layer import ScopeLayer
from .morphkv import MorphKV, UnifiedMorphKV
from .prefill import H2O, PrefillCompressor, PyramidKV, SnapKV, StreamingLLM
from .rkv import RKV, UnifiedRKV
from .spec import make_cache
from .step import AttentionStep

__version__ = "0.1.0"

__all__ = [
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
]
