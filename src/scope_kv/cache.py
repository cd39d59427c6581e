"""`ScopeCache`: a transformers `Cache` that keeps the prompt's KV and holds the generated
tokens' KV to a budget (SCOPE, Wu et al., ACL 2025; docs/method.md).

The cache is a thin container: one :class:`~scope_kv.layer.ScopeLayer` per full-attention
decoder layer (sliding-window layers stay transformers' own), plus what the layers share --
the evict-one work queue that eager decoding flushes once per step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicLayer, DynamicSlidingWindowLayer

from .accounting import kv_footprint
from .attention import attention_modules, enable_scope_attention
from .attention_source import unmanageable_reason
from .compat import is_dummy_layer, layer_templates
from .decoding import DecodingStrategy
from .kernels import EvictionBatch
from .layer import ScopeLayer
from .masks import is_flash_backend
from .prefill.base import PrefillCompressor
from .static import StaticScopeLayer, check_static_strategy

logger = logging.getLogger(__name__)

__all__ = ["ScopeCache", "ScopeLayer"]


def _config_value(config: Any, name: str) -> Any:
    """``config.name``, or ``None`` where the config has none -- or only per layer, as configs of
    models whose layers differ raise for a global read (their layers are checked one by one)."""
    try:
        return getattr(config, name, None)
    except Exception:  # e.g. transformers' error for a per-layer attribute read globally
        return None


class ScopeCache(Cache):
    """KV cache implementing SCOPE's decoding-phase compression for any transformers decoder.

    Parameters
    ----------
    model : PreTrainedModel
        The model this cache will be used with. Its attention is switched (idempotently) to
        scope_kv's attention function, which passes through unchanged for any other cache.
    decoding : DecodingStrategy or None
        :class:`~scope_kv.Slide`, :class:`~scope_kv.Adaptive` or :class:`~scope_kv.Discontinuous`;
        a unified baseline (:class:`~scope_kv.UnifiedH2O`, :class:`~scope_kv.UnifiedStreamingLLM`),
        whose one budget covers prompt and generated entries; or ``None`` to keep every
        generated entry.
    prefill : PrefillCompressor or None
        Compresses each layer's prompt entries once, when prefill ends (:class:`~scope_kv.SnapKV`,
        :class:`~scope_kv.PyramidKV`, :class:`~scope_kv.H2O`, :class:`~scope_kv.StreamingLLM`, or an
        adapter such as ``scope_kv.integrations.kvpress.KVPressPrefill``); ``None`` keeps the
        prompt whole.
    static : bool
        Keep one physical shape for the whole generation (:mod:`scope_kv.static`): the cache is then
        compileable, and ``generate`` on a GPU compiles and captures its decode step (transformers'
        ``compile_config`` applies). The kept entries are the same as without it. Needs a bounded
        ``decoding`` and the sdpa or eager backend.
    per_query_head : bool
        Select per *query* head, as the SCOPE authors' research code does (it stores K/V after
        ``repeat_kv``): each KV head is stored once per query head of its group, and each query
        head keeps its own entries. Costs ``q_heads / kv_heads`` times the KV memory (4x for
        Llama-3-8B); for reproducing published numbers (docs/method.md §11). The default selects per
        KV head, summing the group's scores.

    Notes
    -----
    Full-attention layers are managed; sliding-window layers (Gemma 3 style) stay transformers'
    own layers, which already bound them. On a new ``generate`` call with the same cache
    (multi-turn), the new turn's prompt tokens and what the previous turn's decoding pool held
    both join the prefill pool; the decoding schedule (step, skip counter) starts afresh.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        decoding: DecodingStrategy | None = None,
        prefill: PrefillCompressor | None = None,
        static: bool = False,
        per_query_head: bool = False,
    ):
        _check_arguments(model, decoding, prefill, static, per_query_head)
        config = model.config.get_text_config(decoder=True)
        templates = _layer_templates(model, config)
        kv_repeat = 1
        if per_query_head:
            q_heads = config.num_attention_heads
            kv_repeat = q_heads // (_config_value(config, "num_key_value_heads") or q_heads)
        module_ids = frozenset(id(m) for m in model.modules())
        evictions = EvictionBatch()
        layers: list[Any] = []
        layer_type = StaticScopeLayer if static else ScopeLayer  # one storage policy per cache
        for idx, layer in enumerate(templates):
            if type(layer) is DynamicLayer:
                layers.append(
                    layer_type(idx, decoding, module_ids, prefill, len(templates), evictions, kv_repeat=kv_repeat)
                )
            else:
                layers.append(layer)  # bounded by its window already, or no KV of its own
        scope_layers = [layer for layer in layers if isinstance(layer, ScopeLayer)]
        _check_managed_layers(model, config, len(templates), scope_layers)
        scope_layers[-1].ring.flush_after = True  # a forward runs the layers in order: flush after the last
        scope_layers[0].checks_positions = True  # every layer sees the same positions: one checks them
        self._position_guard = scope_layers[0].positions
        super().__init__(layers=layers)
        self.decoding = decoding
        self.prefill = prefill
        self.static = static
        self.per_query_head = per_query_head
        self.attn_implementation = enable_scope_attention(model)
        self._layer_count = len(layers)

    def managed_layer(self, layer_idx: int) -> ScopeLayer | None:
        """The :class:`ScopeLayer` of decoder layer ``layer_idx``, or ``None`` for a layer
        transformers manages itself (sliding window). The attention routing asks this."""
        if len(self.layers) != self._layer_count:
            raise RuntimeError(
                f"the model added {len(self.layers) - self._layer_count} layers to this ScopeCache during its forward "
                f"({self._layer_count} at construction): it runs some attention modules several times per forward "
                "(looped or recurrent depth), each pass with a copy of the cache layer. scope_kv hands each attention "
                "module the layer of its own layer_idx, so it cannot manage this model; use transformers' "
                "DynamicCache for it."
            )
        layer = self.layers[layer_idx]
        return layer if isinstance(layer, ScopeLayer) else None

    def finish_prefill(self) -> None:
        """Compress every layer's prompt entries now, instead of at the first decoding step.

        For inspection (e.g. measuring what a prefill compressor keeps); generation does not
        need it. Without a prefill compressor or unified baseline this only switches layers to
        their own masks.
        """
        for layer in self.layers:
            if isinstance(layer, ScopeLayer):
                layer.finish_prefill()

    # -- lengths --------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        # transformers sizes a forward's mask before any layer runs (and, in compiled decoding,
        # outside the compiled step): the moment a static layer changes layout (scope_kv.static).
        if query_length == 0 and self.get_seq_length() == 0:
            # transformers sizes the mask before anything else touches the empty input: the one
            # place to say what is wrong before an IndexError inside generate
            raise ValueError("the prompt is empty: give generate at least one input token.")
        for layer in self.layers:
            if isinstance(layer, StaticScopeLayer):
                layer.prepare(query_length)
        return super().get_mask_sizes(query_length, layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> Any:
        layer = self.layers[layer_idx]
        if isinstance(layer, ScopeLayer):
            return layer.query_offset()
        return super().get_query_offset(layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> Any:
        """Tokens seen (transformers' meaning), and a cue: ``generate`` asks once per call, before
        its first forward, so that forward's positions are checked even if it feeds one token
        (:meth:`scope_kv.positions.PositionGuard.expect_new_call`)."""
        if not torch.compiler.is_compiling():  # a compiled step reads it in-graph: no cue there
            self._position_guard.expect_new_call()
        return super().get_seq_length(layer_idx)

    def kv_length(self, layer_idx: int) -> int:
        """Entries physically held by layer ``layer_idx`` (per batch row and KV head; pad slots included)."""
        return kv_footprint(self).entries[layer_idx]

    def nbytes(self) -> int:
        """Bytes of K/V storage allocated now, over every layer (what the cache costs in memory)."""
        return kv_footprint(self).allocated_bytes

    def summary(self) -> list[dict[str, Any]]:
        """Per-layer state: tokens seen, entries held (prefill / decoding), capacity, bytes."""
        held = kv_footprint(self).entries
        rows: list[dict[str, Any]] = []
        for idx, layer in enumerate(self.layers):
            if isinstance(layer, ScopeLayer):
                rows.append(layer.summary())
            else:
                rows.append({"layer": idx, "kind": type(layer).__name__, "held": held[idx]})
        return rows

    def describe(self) -> str:
        """This cache's configuration as a spec string: ``make_cache(model, cache.describe())``
        builds the same configuration (``scope_kv.spec``), e.g. ``"snapkv:2048+slide:512/256,static"``."""
        decoding = self.decoding.describe() if self.decoding is not None else "full"
        text = f"{self.prefill.describe()}+{decoding}" if self.prefill is not None else decoding
        flags = [name for name in ("static", "per_query_head") if getattr(self, name)]
        return text + "".join(f",{name}" for name in flags)

    def __repr__(self) -> str:
        # the spec that builds this configuration again (make_cache), as everything the library prints
        managed = sum(isinstance(layer, ScopeLayer) for layer in self.layers)
        return f"ScopeCache({self.describe()!r}, layers={len(self.layers)}, managed={managed})"


def _check_arguments(model: Any, decoding: Any, prefill: Any, static: Any, per_query_head: Any) -> None:
    """Refuse arguments ScopeCache cannot take, saying what to pass instead."""
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"ScopeCache(model, ...) takes the transformers model itself, got {type(model).__name__}.")
    given: tuple[object, ...] = (prefill, decoding)  # users pass spec strings here by mistake
    strings = [s for s in given if isinstance(s, str)]
    if strings:
        spec = "+".join(strings)  # prefill first, as the spec grammar writes it
        raise TypeError(
            f"ScopeCache takes strategy objects (decoding=Slide(512, 256), prefill=SnapKV(2048)), not spec "
            f"strings; to build a cache from {spec!r}, use scope_kv.make_cache(model, {spec!r})."
        )
    if decoding is not None and not isinstance(decoding, DecodingStrategy):
        raise TypeError(
            f"decoding must be Slide(...), Adaptive(...), Discontinuous(...), UnifiedH2O(...), "
            f"UnifiedStreamingLLM(...) or None, got {decoding!r}; scope_kv.make_cache(model, 'slide:512/256') "
            "builds a cache from a spec string."
        )
    if prefill is not None and not isinstance(prefill, PrefillCompressor):
        raise TypeError(
            f"prefill must be SnapKV(...), PyramidKV(...), H2O(...), StreamingLLM(...), a "
            f"KVPressPrefill(press) adapter or None, got {prefill!r}."
        )
    if not isinstance(static, bool) or not isinstance(per_query_head, bool):
        raise TypeError(f"static and per_query_head must be True or False, got {static!r}, {per_query_head!r}.")
    if static and decoding is not None and not decoding.bounded:
        raise ValueError(
            f"static=True needs a bounded pool, and {decoding.describe()} grows without bound (an uncapped "
            "schedule reproduces the research code); use cap_budget=True, or static=False."
        )
    if static and decoding is not None:
        check_static_strategy(decoding)
    if static and decoding is None:
        raise ValueError(
            "static=True needs a bounded decoding pool (decoding=Slide(...), Adaptive(...), Discontinuous(...) "
            "or a unified baseline); for an uncompressed cache with static shapes use transformers' StaticCache."
        )
    if static and is_flash_backend(model.config._attn_implementation):
        raise ValueError(
            "static=True masks slots per KV head, which flash-attention kernels cannot take: load the model "
            "with attn_implementation='sdpa' (or 'eager') to use the static layout."
        )


def _layer_templates(model: PreTrainedModel, config: Any) -> list[Any]:
    """The model's cache layers as transformers would build them; refuses caches scope_kv cannot manage."""
    if _config_value(config, "kv_lora_rank"):
        raise ValueError(
            f"{type(model).__name__} uses multi-head latent attention (kv_lora_rank={config.kv_lora_rank}): it "
            "caches a compressed latent per token and expands each head's keys and values from it inside the "
            "attention module, so the keys the attention sees are not the cached entries scope_kv selects "
            "among. ScopeCache cannot manage this cache; use transformers' DynamicCache for this model."
        )
    templates = layer_templates(config)
    for idx, layer in enumerate(templates):
        if not (isinstance(layer, DynamicSlidingWindowLayer) or is_dummy_layer(layer) or type(layer) is DynamicLayer):
            kind = type(layer).__name__ if isinstance(layer, CacheLayerMixin) else repr(layer)
            raise ValueError(
                f"layer {idx} of {type(model).__name__} needs a {kind}; scope_kv manages "
                "plain attention KV caches only (full or sliding-window attention)."
            )
    return templates


def _check_managed_layers(model: PreTrainedModel, config: Any, n_layers: int, scope_layers: list[Any]) -> None:
    """Refuse a model with nothing to manage, or whose attention modules do not cover its cache layers."""
    if not scope_layers:
        window = getattr(config, "sliding_window", None)
        # the override that turns every layer into full attention, given when the model is loaded
        # (the attention modules and rotary embeddings read the layer types when they are built)
        if getattr(config, "layer_types", None) is not None:
            fix = f'layer_types=["full_attention"] * {len(config.layer_types)}'
        else:
            fix = "sliding_window=None"
        raise ValueError(
            f"every attention layer of {type(model).__name__} is a sliding-window layer (sliding_window={window}), "
            "so there is nothing for ScopeCache to compress. If your prompts plus outputs stay within the "
            "window, or the checkpoint was trained without one (e.g. Mistral-7B v0.2+), load it with full "
            f"attention: AutoModelForCausalLM.from_pretrained(..., {fix})."
        )
    routed = {module.layer_idx for module in attention_modules(model)}
    unrouted = [layer.layer_idx for layer in scope_layers if layer.layer_idx not in routed]
    if unrouted:
        raise ValueError(
            f"{type(model).__name__}'s cache has {n_layers} layers, but no attention module carries the "
            f"layer_idx of layers {unrouted[:8]}{' ...' if len(unrouted) > 8 else ''}: the model runs its attention "
            "modules several times per forward (looped or recurrent depth), each pass writing its own cache "
            "layer. scope_kv hands each attention module the layer of its own layer_idx, so it cannot manage "
            "this model; use transformers' DynamicCache for it."
        )
    for module_type in dict.fromkeys(type(m) for m in attention_modules(model)):
        reason = unmanageable_reason(module_type)
        if reason is not None:
            raise ValueError(
                f"{type(model).__name__} cannot be managed by ScopeCache: {reason} ({module_type.__name__}.forward). "
                "scope_kv selects among the cached keys it hands to one attention call per layer; use "
                "transformers' DynamicCache for this model."
            )
