"""A trained long-output testbed: answer accuracy under KV compression, checkable offline.

A tiny GQA Llama model, trained to execute a synthetic program exactly (:mod:`.task`), makes
each KV-cache method's *accuracy* measurable against its memory on a CPU in seconds: every
output item needs facts from the prompt (prefill pool) and values the model wrote earlier
(decoding pool), with the referenced items drifting along the output, the setting of SCOPE
(Wu et al., *SCOPE: Optimizing Key-Value Cache Compression in Long-context Generation*,
ACL 2025)::

    from scope_kv.testbed import load_testbed, evaluate_caches
    model, tokenizer = load_testbed()
    result = evaluate_caches(model, tokenizer, seeds=range(4), make_cache=None)
    result.accuracy
"""

from .evaluate import CacheFactory, SeedResult, TestbedResult, evaluate_caches
from .model import DEFAULT_MODEL_DIR, TestbedModelMissingError, load_testbed, save_testbed, testbed_config
from .task import (
    DEFAULT_MIX,
    KINDS,
    TRAINED,
    Example,
    Item,
    Mix,
    execute,
    make_example,
    output_length,
    prompt_length,
    score,
)
from .tokenizer import VOCAB_SIZE, build_tokenizer

__all__ = [
    "CacheFactory",
    "DEFAULT_MIX",
    "DEFAULT_MODEL_DIR",
    "Example",
    "Item",
    "KINDS",
    "Mix",
    "SeedResult",
    "TRAINED",
    "TestbedModelMissingError",
    "TestbedResult",
    "VOCAB_SIZE",
    "build_tokenizer",
    "evaluate_caches",
    "execute",
    "load_testbed",
    "make_example",
    "output_length",
    "prompt_length",
    "save_testbed",
    "score",
    "testbed_config",
]
