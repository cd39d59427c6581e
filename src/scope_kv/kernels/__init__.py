"""The decode step's fast path: grouped attention that returns its log-sum-exp, candidate
scoring from that log-sum-exp, and a fused evict-one kernel (docs/method.md §5).

Every function here has a plain-torch reference beside it (``*_reference``), which is what
runs on the CPU and what the tests compare the fast versions with. Modules:
:mod:`.decode_attention` (grouped and split-KV decode attention, candidate scores),
:mod:`.evict` (the evict-one kernel, :class:`EvictRing`, :class:`EvictionBatch`), and the Triton
sources in ``scope_kv._triton_kernels``.

Why these three:

* **Grouped decode attention.** With one query token, the ``G = q_heads / kv_heads`` queries
  of a KV head can be laid out as ``G`` query *rows* of that KV head, so one attention call
  over ``(batch, kv_heads, G, dim)`` reads each cached K/V once, needs no ``repeat_kv`` copy
  (transformers' sdpa path materialises 4x K/V for Llama-3 whenever a mask is passed), and
  returns the per-head log-sum-exp the flash / memory-efficient kernels compute anyway.
* **Candidate scores from the log-sum-exp.** SCOPE scores a decoding-pool entry by the
  current query's softmax probability over the *whole* context (docs/method.md §5). With the
  step's log-sum-exp ``m`` that is ``exp(s * q.k - m)``: O(budget) work per head instead of a
  second pass over the prompt.
* **Evict one.** Slide and Adaptive, once at budget, evict exactly one entry per step
  (the pool grows by one and the budget never shrinks). One kernel per layer scores the
  candidates, takes the arg-min and closes the gap in place, keeping the pool's order
  (so the newest ``recent`` entries stay last, exactly as the reference compaction leaves
  them). The scoring and the shift are fused so the step costs one launch, not ~15; in eager
  decoding the layers' evictions are queued and done by one launch per step
  (:class:`EvictionBatch`), since there the host's launches, not the GPU, set the pace.
"""

from __future__ import annotations

from ._device import host_to_device, triton_available
from .decode_attention import (
    candidate_scores,
    default_splits,
    grouped_decode_attention,
    grouped_decode_attention_reference,
    split_kv_decode_attention,
)
from .evict import EvictionBatch, EvictRing, evict_one_, evict_one_reference_, unrotate_

__all__ = [
    "grouped_decode_attention",
    "grouped_decode_attention_reference",
    "split_kv_decode_attention",
    "default_splits",
    "candidate_scores",
    "evict_one_",
    "evict_one_reference_",
    "EvictionBatch",
    "EvictRing",
    "host_to_device",
    "triton_available",
    "unrotate_",
]
