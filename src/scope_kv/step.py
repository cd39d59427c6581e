"""`AttentionStep`: one forward's attention in one managed layer, as a small immutable record.

The scope attention function (:mod:`scope_kv.attention`) builds it once the attention has run
and hands it to the layer (:meth:`scope_kv.cache.ScopeLayer.after_attention`), which plans,
scores, selects and compacts from it. A decoding strategy's scorer
(:meth:`scope_kv.DecodingStrategy.score`) receives it too, so a new scoring rule needs nothing
but the record.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from .kernels import candidate_scores
from .masks import valid_slots
from .selection import attention_scores

__all__ = ["AttentionStep"]


@dataclass(frozen=True)
class AttentionStep:
    """What one forward's attention saw in one managed layer.

    Attributes
    ----------
    module : nn.Module
        The attention module (``module.layer_idx`` is the layer).
    query : Tensor
        ``(batch, q_heads, q, dim)`` the forward's queries (post-RoPE, post-norm).
    keys, values : Tensor
        ``(batch, kv_heads, length, dim)`` every entry the layer held during the attention,
        this forward's included (views of the layer's storage; physical slots).
    mask : Tensor or None
        The mask the attention used, in ``backend``'s format, in physical slots
        (:mod:`scope_kv.masks`).
    backend : str
        ``sdpa``, ``eager`` or a flash backend.
    scaling : float
        The softmax scale the attention used (the model's, or ``dim ** -0.5``).
    softcap : float or None
        Logit soft-capping, if the model uses it.
    lse : Tensor or None
        ``(batch, q_heads)`` float32 log-sum-exp of a one-query forward's scaled logits over the
        whole attended context, when the grouped decode attention ran (it returns it).
    """

    module: torch.nn.Module
    query: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor | None
    backend: str
    scaling: float
    softcap: float | None = None
    lse: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.keys.shape[0]

    @property
    def length(self) -> int:
        """Physical slots attended to."""
        return self.keys.shape[-2]

    @property
    def q_len(self) -> int:
        return self.query.shape[2]

    @functools.cached_property
    def valid(self) -> torch.Tensor | None:
        """``(batch, length)`` boolean: the slots the forward's last query could attend to
        (``None`` when all of them)."""
        return valid_slots(self.mask, self.batch, self.length, self.keys.device)

    def with_lse(self, lse: torch.Tensor) -> AttentionStep:
        return replace(self, lse=lse)

    def probabilities(self, first: int = 0, last: int | None = None) -> torch.Tensor:
        """SCOPE's score of the held slots ``[first, last)`` (docs/method.md §5).

        The newest query's softmax probability on each slot, the softmax taken over the whole
        held context per query head, summed over each KV head's query group.

        Returns
        -------
        Tensor
            ``(batch, kv_heads, last - first)`` float32. With :attr:`lse` this costs
            O(``last - first``) per head; otherwise one pass over every held key.
        """
        last = self.length if last is None else last
        if self.lse is not None:
            return candidate_scores(self.query[:, :, -1:], self.keys[:, :, first:last], self.lse, self.scaling)
        return attention_scores(self.query, self.keys, self.valid, self.scaling, self.softcap)[..., first:last]
