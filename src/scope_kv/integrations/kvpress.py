"""Use a kvpress scorer press as a SCOPE prefill compressor.

NVIDIA's kvpress (``pip install kvpress``) scores prompt entries with "presses". Its own
pipeline cannot run beside scope_kv: released kvpress pins ``transformers<5.3`` and its
forward hooks read ``cache_position``, which transformers 5.x no longer passes. This adapter
keeps the part that carries the method -- a press's ``score`` -- and lets scope_kv do the
rest (capturing inputs, choosing per row, evicting, masking), so a press picked for a
SnapKV/PyramidKV-style pipeline runs under SCOPE decoding::

    from kvpress import SnapKVPress          # or import the press module alone, see README
    from scope_kv import ScopeCache, Slide
    from scope_kv.integrations.kvpress import KVPressPrefill
    cache = ScopeCache(model, prefill=KVPressPrefill(SnapKVPress(compression_ratio=0.5)),
                       decoding=Slide(512, 256))

Nothing here imports kvpress: any object with kvpress's scorer contract works,
``press.score(module, hidden_states, keys, values, attentions, kwargs) -> (batch, kv_heads, seq)``,
higher kept. The adapter calls it once per layer when prefill ends with:

* ``module``: the layer's attention module;
* ``hidden_states``: ``(batch, prompt, hidden)`` the attention module's input over the whole
  prompt (chunks concatenated), captured by a forward pre-hook;
* ``keys``, ``values``: ``(batch, kv_heads, prompt, dim)`` the prefill pool (post-RoPE keys);
* ``attentions``: ``None`` (as kvpress passes it with sdpa / flash attention);
* ``kwargs``: ``hidden_states``, ``position_embeddings`` (``(cos, sin)``, each
  ``(batch, prompt, rotary_dim)``) and ``attention_mask`` (``None``).

So presses that need only these work (SnapKV, Knorm, StreamingLLM, TOVA, KeyDiff, LagKV,
ExpectedAttention, Random...); presses that need the eager attention matrix
(ObservedAttention) or override ``compress`` itself (AdaKV, ChunkKV, KVzip, composed or
decoding presses) do not. A padded batch is scored as kvpress scores it (pads included),
after which pads are never kept.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from ..prefill.base import PrefillCompressor, PrefillMemo, check_int

logger = logging.getLogger(__name__)

__all__ = ["KVPressPrefill"]


@dataclass
class KVPressMemo(PrefillMemo):
    """What a press needs at compression: the attention module's input over the whole prompt (one
    piece per prefill forward) and the module itself."""

    hidden_states: list[torch.Tensor] = field(default_factory=list)
    position_embeddings: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    module: torch.nn.Module | None = None


@dataclass(frozen=True, init=False)
class KVPressPrefill(PrefillCompressor):
    """A kvpress scorer press as a prefill compressor.

    Parameters
    ----------
    press : object
        A kvpress ``ScorerPress`` (anything with ``score(module, hidden_states, keys, values,
        attentions, kwargs)``).
    budget : int or None
        Prompt entries kept per layer and KV head. ``None`` (default) takes kvpress's own rule
        from the press: ``max(1, int(n * (1 - press.compression_ratio)))`` of a row's ``n`` real
        prompt tokens, or ``press.get_layer_budget(module, n)`` when the press has one
        (PyramidKVPress).
    """

    budget: int | None  # type: ignore[assignment]  # None: the press's own rule (above)
    press: Any

    def __init__(self, press: Any, budget: int | None = None) -> None:
        # The press comes first (the base class's field order would put budget first).
        object.__setattr__(self, "press", press)
        object.__setattr__(self, "budget", budget)
        self.__post_init__()

    def __post_init__(self) -> None:
        if not callable(getattr(self.press, "score", None)):
            raise TypeError(
                f"KVPressPrefill needs a kvpress scorer press (an object with a score() method), got "
                f"{self.press!r}; e.g. KVPressPrefill(SnapKVPress(compression_ratio=0.5))."
            )
        if self.budget is not None:
            check_int("KVPressPrefill.budget", self.budget, 1)
        else:
            ratio = getattr(self.press, "compression_ratio", None)
            if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
                raise ValueError(
                    f"KVPressPrefill: {type(self.press).__name__} has no compression_ratio in [0, 1) "
                    f"(got {ratio!r}); pass budget=<entries kept per layer> instead."
                )

    memo_type = KVPressMemo

    def observe_input(self, memo: KVPressMemo, hidden_states: torch.Tensor, position_embeddings: Any) -> None:
        # Presses score from the module's input (they recompute queries themselves); chunked
        # prefill appends one piece per chunk.
        memo.hidden_states.append(hidden_states.detach())
        if position_embeddings is not None:
            memo.position_embeddings.append(tuple(p.detach() for p in position_embeddings))

    def observe(
        self,
        memo: KVPressMemo,
        module: torch.nn.Module,
        query: torch.Tensor,
        keys: torch.Tensor,
        start: torch.Tensor,
        scaling: float,
        softcap: float | None,
    ) -> None:
        memo.module = module  # the press scores with the attention module's own projections

    def keep_counts(
        self, real: torch.Tensor, layer_idx: int, num_layers: int, module: torch.nn.Module | None = None
    ) -> torch.Tensor:
        if self.budget is not None:
            return real.clamp(max=self.budget)
        layer_budget = getattr(self.press, "get_layer_budget", None)
        out = []
        for n in real.tolist():
            if callable(layer_budget) and module is not None:
                out.append(int(layer_budget(module, n)))
            else:  # kvpress's rule for a compression ratio, restated
                out.append(max(1, int(n * (1 - self.press.compression_ratio))))
        return torch.tensor(out, dtype=torch.long, device=real.device)

    def scores(self, memo: KVPressMemo, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        module = memo.module
        hidden = memo.hidden_states
        if not hidden or module is None:
            raise RuntimeError(
                "KVPressPrefill saw no attention input during prefill: the model's attention modules must "
                "receive the cache as a keyword (`cache=` from transformers 5.24, `past_key_values=` before; "
                "transformers' decoder layers do)."
            )
        hidden_states = torch.cat(hidden, dim=1)
        embeddings = memo.position_embeddings
        position_embeddings = None
        if embeddings:
            position_embeddings = tuple(torch.cat(parts, dim=1) for parts in zip(*embeddings, strict=True))
        kwargs = {
            "hidden_states": hidden_states,
            "position_embeddings": position_embeddings,
            "attention_mask": None,
        }
        try:
            scores = self.press.score(module, hidden_states, keys, values, None, kwargs)
        except Exception as error:  # a press outside the supported contract: say which and why
            raise RuntimeError(
                f"{type(self.press).__name__}.score failed under KVPressPrefill ({error}). Only presses "
                "that score from hidden states, keys and values work; see scope_kv.integrations.kvpress."
            ) from error
        expected = keys.shape[:3]
        if tuple(scores.shape) != tuple(expected):
            raise RuntimeError(
                f"{type(self.press).__name__}.score returned shape {tuple(scores.shape)}, expected "
                f"(batch, kv_heads, prompt) = {tuple(expected)}."
            )
        return scores.float()

    def describe(self) -> str:
        """Spec-shaped, ``kvpress:press=<class>,budget=<n>`` (or ``compression_ratio=``); a press is a
        Python object, so parsing it raises a ``SpecError`` that says how to build the cache."""
        kept = (
            f"budget={self.budget}" if self.budget is not None else f"compression_ratio={self.press.compression_ratio}"
        )
        return f"kvpress:press={type(self.press).__name__},{kept}"
