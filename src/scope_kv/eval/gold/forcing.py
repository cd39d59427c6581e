"""Teacher forcing: the full cache's reference pass, and one method's pass over the same tokens."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from ...accounting import kv_footprint
from ...compat import cache_kwargs
from .data import GoldBatch

logger = logging.getLogger(__name__)


# -- the reference: the full cache, one forward ----------------------------------------------
def _head(model: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 next-token logits from final hidden states ``(..., hidden)`` (the output embedding,
    then the config's final logit soft-capping when it has one)."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass(frozen=True)
class GoldReference:
    """The full cache's view of every reference token, from one teacher-forced forward.

    Attributes
    ----------
    hidden : Tensor
        ``(n, G, hidden)`` final hidden states whose output embedding predicts reference token
        ``t`` (kept in the model's dtype; next-token distributions are rebuilt from them).
    nll : Tensor
        ``(n, G)`` float32 NLL of each reference token.
    top1 : Tensor
        ``(n, G)`` int64 the full cache's most likely token at each position.
    """

    hidden: torch.Tensor
    nll: torch.Tensor
    top1: torch.Tensor

    def select(self, rows: Sequence[int], gold_len: int) -> GoldReference:
        index = torch.tensor(list(rows), dtype=torch.long, device=self.hidden.device)
        return GoldReference(
            self.hidden.index_select(0, index)[:, :gold_len],
            self.nll.index_select(0, index.to(self.nll.device))[:, :gold_len],
            self.top1.index_select(0, index.to(self.top1.device))[:, :gold_len],
        )


@torch.no_grad()
def full_reference(
    model: Any, batch: GoldBatch, rows_per_chunk: int = 8, chunk_tokens: int = 1024, positions_per_chunk: int = 512
) -> GoldReference:
    """The full cache's NLL and distributions at every reference token, in one teacher-forced pass.

    Prompt + reference (but its last token) go through the model with transformers' own
    ``DynamicCache`` -- the full cache -- ``chunk_tokens`` positions per forward, ``rows_per_chunk``
    rows at a time; no decoding step is taken.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM whose logits are its output embedding of the decoder's final hidden state.
    batch : GoldBatch
        ``(n, P)`` prompts and ``(n, G)`` references (on the model's input device).
    rows_per_chunk : int
        Rows per pass (their full cache is the memory peak).
    chunk_tokens : int
        Positions per forward (bounds attention and activation memory).
    positions_per_chunk : int
        Positions per chunk of the output-embedding / log-softmax pass.

    Returns
    -------
    GoldReference
        On the batch's device.

    Raises
    ------
    RuntimeError
        If the model's own logits differ from the output embedding of the decoder's hidden
        states (a model that post-processes its logits in a way this harness does not rebuild).
    """
    captured: list[torch.Tensor] = []

    def keep(module: torch.nn.Module, args: Any, output: Any) -> None:
        captured.append(output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0])

    n, p = batch.prompt_ids.shape
    g = batch.gold_ids.shape[1]
    hidden_parts, nll_parts, top_parts = [], [], []
    handle = model.get_decoder().register_forward_hook(keep)
    try:
        for lo in range(0, n, rows_per_chunk):
            hi = min(n, lo + rows_per_chunk)
            ids = torch.cat([batch.prompt_ids[lo:hi], batch.gold_ids[lo:hi, :-1]], dim=1)
            mask = torch.cat([batch.prompt_mask[lo:hi], torch.ones_like(batch.gold_ids[lo:hi, :-1])], dim=1)
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
            cache = DynamicCache(config=model.config)
            pieces = []
            for a in range(0, ids.shape[1], chunk_tokens):
                b = min(ids.shape[1], a + chunk_tokens)
                captured.clear()
                out = model(
                    input_ids=ids[:, a:b],
                    attention_mask=mask[:, :b],
                    position_ids=positions[:, a:b],
                    **cache_kwargs(cache),
                    use_cache=True,
                    logits_to_keep=1,
                )
                if b > p - 1:  # positions p-1 .. p-2+g predict reference tokens 0 .. g-1
                    pieces.append(captured[-1][:, max(0, p - 1 - a) :])
            del cache
            hidden = torch.cat(pieces, dim=1)
            if lo == 0:
                _check_head(model, out.logits[:, -1], hidden[:, -1])
            nll = torch.empty((hi - lo, g), dtype=torch.float32, device=hidden.device)
            top = torch.empty((hi - lo, g), dtype=torch.long, device=hidden.device)
            for a in range(0, g, positions_per_chunk):
                b = min(g, a + positions_per_chunk)
                logp = torch.log_softmax(_head(model, hidden[:, a:b]), dim=-1)
                nll[:, a:b] = -logp.gather(-1, batch.gold_ids[lo:hi, a:b, None])[..., 0]
                top[:, a:b] = logp.argmax(-1)
            hidden_parts.append(hidden)
            nll_parts.append(nll)
            top_parts.append(top)
    finally:
        handle.remove()
    return GoldReference(torch.cat(hidden_parts), torch.cat(nll_parts), torch.cat(top_parts))


def _check_head(model: Any, logits: torch.Tensor, hidden: torch.Tensor) -> None:
    """The model's own last-position logits against the output embedding of the same hidden state."""
    want = logits.float()
    got = _head(model, hidden)
    tol = 1e-4 if hidden.dtype == torch.float32 else 1e-2
    gap = float((want - got).abs().max()) / max(1.0, float(want.abs().max()))
    if gap > tol:
        raise RuntimeError(
            f"{type(model).__name__}'s logits are not its output embedding of the decoder's last hidden state "
            f"(relative gap {gap:.2e}); the gold harness cannot rebuild the full cache's distributions for it."
        )


# -- one method -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenStats:
    """Per-token statistics of one teacher-forced pass (CPU tensors, ``(n, G)``).

    Attributes
    ----------
    nll : Tensor
        float32 NLL of each reference token under the cache.
    argmax_gold : Tensor
        bool, the cache's most likely token is the reference token.
    kl, top1 : Tensor or None
        ``KL(full || method)`` (nats) and agreement with the full cache's most likely token,
        when a :class:`GoldReference` was given.
    kv_slots_peak : float
        Most entries held per layer (mean over layers; physical slots, pads included).
    kv_allocated_peak : int
        Most bytes of K/V storage allocated.
    seconds : float
        Wall time of the pass.
    """

    nll: torch.Tensor
    argmax_gold: torch.Tensor
    kl: torch.Tensor | None
    top1: torch.Tensor | None
    kv_slots_peak: float
    kv_allocated_peak: int
    seconds: float


@torch.no_grad()
def teacher_force(
    model: Any,
    cache: Any,
    batch: GoldBatch,
    reference: GoldReference | None = None,
    on_step: Callable[[], Any] | None = None,
    chunk_tokens: int | None = None,
) -> TokenStats:
    """Feed ``batch``'s references through ``cache`` one token per forward, as decoding would.

    The prompt is one forward (its last position predicts reference token 0); then reference
    token ``t - 1`` is fed at position ``prompt + t - 1`` with the growing attention mask
    ``generate`` would build, and the logits predict token ``t``. Statistics accumulate on the
    device and are copied to the CPU once, at the end.

    Parameters
    ----------
    model : PreTrainedModel
        The model the cache was built for.
    cache : Cache
        A fresh cache (e.g. :meth:`scope_kv.eval.methods.Method.make_cache`), filled in place.
    batch : GoldBatch
        ``(n, P)`` prompts and ``(n, G)`` references on the model's input device.
    reference : GoldReference or None
        The full cache's view (:func:`full_reference`) for KL and top-1 agreement.
    on_step : callable or None
        Called after every forward (progress bars).
    chunk_tokens : int or None
        Feed the prompt in forwards of this many positions (chunked prefill; bounds memory);
        ``None``: one forward, as ``generate`` does.
    """
    start = time.perf_counter()
    p, g = batch.prompt_ids.shape[1], batch.gold_ids.shape[1]
    mask = torch.cat([batch.prompt_mask, torch.ones_like(batch.gold_ids)], dim=1)
    real = torch.tensor(batch.prompt_tokens, dtype=torch.long, device=batch.prompt_ids.device)[:, None]
    tally = _Tally(model, batch, reference)

    def record(t: int, logits: torch.Tensor) -> None:
        tally.record(t, logits)
        tally.measure(cache)
        if on_step is not None:
            on_step()

    positions = batch.positions()
    step = chunk_tokens or p
    for a in range(0, p, step):
        b = min(p, a + step)
        out = model(
            input_ids=batch.prompt_ids[:, a:b],
            attention_mask=batch.prompt_mask[:, :b],
            position_ids=positions[:, a:b],
            **cache_kwargs(cache),
            use_cache=True,
            logits_to_keep=1,
        )
    record(0, out.logits[:, -1])
    for t in range(1, g):
        out = model(
            input_ids=batch.gold_ids[:, t - 1 : t],
            attention_mask=mask[:, : p + t],
            position_ids=real + (t - 1),
            **cache_kwargs(cache),
            use_cache=True,
        )
        record(t, out.logits[:, -1])
    return tally.stats(max(1, len(kv_footprint(cache).entries)), time.perf_counter() - start)


class _Tally:
    """Per-token statistics of one teacher-forced run, accumulated on the device."""

    def __init__(self, model: Any, batch: GoldBatch, reference: GoldReference | None):
        n, g = batch.gold_ids.shape
        device = batch.gold_ids.device
        self.model, self.gold, self.reference = model, batch.gold_ids, reference
        self.nll = torch.empty((n, g), dtype=torch.float32, device=device)
        self.hit = torch.empty((n, g), dtype=torch.bool, device=device)
        self.kl = torch.zeros((n, g), dtype=torch.float32, device=device)
        self.top1 = torch.ones((n, g), dtype=torch.bool, device=device)
        self.slots = self.allocated = 0

    def record(self, t: int, logits: torch.Tensor) -> None:
        """The logits that predict reference token ``t``."""
        logq = torch.log_softmax(logits.float(), dim=-1)
        self.nll[:, t] = -logq.gather(-1, self.gold[:, t, None])[:, 0]
        best = logq.argmax(-1)
        self.hit[:, t] = best == self.gold[:, t]
        if self.reference is not None:
            logp = torch.log_softmax(_head(self.model, self.reference.hidden[:, t]), dim=-1)
            self.kl[:, t] = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0.0)
            self.top1[:, t] = best == self.reference.top1[:, t]

    def measure(self, cache: Any) -> None:
        """The cache's peak entries and bytes so far."""
        footprint = kv_footprint(cache)
        self.slots = max(self.slots, footprint.total_entries)
        self.allocated = max(self.allocated, footprint.allocated_bytes)

    def stats(self, layers: int, seconds: float) -> TokenStats:
        """Copied to the CPU once, at the end."""
        compared = self.reference is not None
        return TokenStats(
            self.nll.cpu(),
            self.hit.cpu(),
            self.kl.cpu() if compared else None,
            self.top1.cpu() if compared else None,
            self.slots / layers,
            self.allocated,
            seconds,
        )
