"""Prefill compressors: which prompt entries each layer keeps, decided once when prefill ends.

Each is usable alone (``ScopeCache(model, prefill=..., decoding=None)``) or under any SCOPE
decoding strategy. See :mod:`scope_kv.prefill.base` for the contract and the GQA rule.
"""

from .base import PrefillCompressor, PrefillMemo
from .h2o import H2O
from .snapkv import PyramidKV, SnapKV
from .streaming import StreamingLLM

__all__ = ["H2O", "PrefillCompressor", "PrefillMemo", "PyramidKV", "SnapKV", "StreamingLLM"]
