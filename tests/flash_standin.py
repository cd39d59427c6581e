"""A pure-torch stand-in for the flash-attention kernels transformers dispatches to.

transformers runs ``attn_implementation="flash_attention_N"`` through its own code -- the
wrapper ``integrations.flash_attention.flash_attention_forward`` and
``modeling_flash_attention_utils._flash_attention_forward``, which picks the plain or the
varlen kernel and unpads a padded batch into ``cu_seqlens`` -- and imports the kernels lazily,
by name, from the package each version ships in:

=================== ============================ ==============================================
implementation      module transformers imports   functions
=================== ============================ ==============================================
flash_attention_2   ``flash_attn``                ``flash_attn_func``, ``flash_attn_varlen_func``,
                    ``flash_attn.bert_padding``   ``flash_attn_with_kvcache``; ``pad_input``,
                                                  ``unpad_input``
flash_attention_3   ``flash_attn_interface``      ``flash_attn_func``, ``flash_attn_varlen_func``,
                                                  ``flash_attn_with_kvcache``
flash_attention_4   ``flash_attn.cute``           ``flash_attn_func``, ``flash_attn_varlen_func``
=================== ============================ ==============================================

:func:`install` puts modules with those names into ``sys.modules`` for one test (through
pytest's ``monkeypatch``, so everything is undone afterwards) and makes transformers' checks
("is the package there, is there a GPU") pass, so everything above the kernels -- transformers'
dispatch, the mask it builds, its unpadding, and scope_kv's ``scope_flash_attention_N`` -- is
the real code. Each function keeps its package's signature (transformers inspects the varlen
function's parameters to decide which keyword arguments it passes) and semantics:

* layouts: ``(batch, seq, heads, dim)``, or packed ``(total, heads, dim)`` with
  ``cu_seqlens`` (int32, ``(batch + 1,)``, from 0 to ``total``) for varlen;
* causal masks aligned to the bottom right: query ``i`` of a sequence with ``lq`` queries and
  ``lk`` keys sees key ``j <= i + lk - lq``; a query that sees nothing gets zeros;
* ``window_size=(left, right)`` around that diagonal (``-1``, or ``None`` for FA4, = unbounded);
* ``softcap`` applied to the scaled logits, ``softcap * tanh(s / softcap)`` (0 = off);
* GQA: query head ``h`` uses KV head ``h // (q_heads // kv_heads)``;
* FA2 / FA3 return the output, FA4 returns ``(output, lse)``.

It is stricter than the kernels where a kernel would silently read or write the wrong rows:
``cu_seqlens`` that do not start at 0, decrease, or end elsewhere than at the packed total,
``max_seqlen`` below a sequence's length, or wrong dtypes raise ``ValueError``. One relaxation:
float32 inputs are accepted (the kernels take fp16 / bf16 only), so CPU tests run in fp32.
Features transformers never asks for here (dropout, ALiBi, attention sinks, paged KV, returned
probabilities) raise ``NotImplementedError``.

Every kernel call is recorded in :attr:`FlashStandIn.calls`, on the instance :func:`install`
returns (one per test), so a test can see which path ran and with which ``cu_seqlens``.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import math
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["FlashCall", "FlashStandIn", "attend_packed", "install", "kernels"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class FlashCall:
    """One kernel call as the stand-in saw it.

    Attributes
    ----------
    package : str
        ``flash_attn`` (FA2), ``flash_attn_interface`` (FA3) or ``flash_attn.cute`` (FA4).
    varlen : bool
        Whether ``flash_attn_varlen_func`` ran (transformers unpadded a 2-D mask).
    q_shape, k_shape : tuple of int
        Shapes of the query and key tensors passed.
    cu_seqlens_q, cu_seqlens_k : tuple of int or None
        The cumulative lengths of a varlen call.
    causal : bool
    window : tuple
        ``(left, right)``; ``-1`` / ``None`` = unbounded.
    softcap : float
    softmax_scale : float
    """

    package: str
    varlen: bool
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    cu_seqlens_q: tuple[int, ...] | None
    cu_seqlens_k: tuple[int, ...] | None
    causal: bool
    window: tuple[Any, Any]
    softcap: float
    softmax_scale: float

    @property
    def kv_lengths(self) -> tuple[int, ...]:
        """Keys per sequence: from ``cu_seqlens_k`` (varlen) or the padded key length."""
        if self.cu_seqlens_k is None:
            return (self.k_shape[1],) * self.k_shape[0]
        cu = self.cu_seqlens_k
        return tuple(b - a for a, b in itertools.pairwise(cu))


def _bound(value: int | None) -> int | None:
    """A window side: ``None`` for unbounded (FA2/FA3 say -1, FA4 says None)."""
    return None if value is None or value < 0 else int(value)


def attend_packed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: list[int],
    cu_seqlens_k: list[int],
    *,
    scale: float,
    causal: bool,
    window: tuple[int | None, int | None] = (None, None),
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The flash-attention rule on packed sequences, in float32 (the kernels' accumulator).

    Parameters
    ----------
    q : Tensor
        ``(total_q, heads, dim)``.
    k, v : Tensor
        ``(total_k, kv_heads, dim)`` and ``(total_k, kv_heads, dim_v)``.
    cu_seqlens_q, cu_seqlens_k : list of int
        ``batch + 1`` cumulative lengths; sequence ``b`` is rows ``[cu[b], cu[b + 1])``.
    scale : float
        Multiplies ``q · k``.
    causal : bool
        Bottom-right aligned causal mask per sequence.
    window : (int or None, int or None)
        Keys allowed left / right of the diagonal; ``None`` = unbounded.
    softcap : float
        ``> 0``: logits become ``softcap * tanh(logits / softcap)``.

    Returns
    -------
    out : Tensor
        ``(total_q, heads, dim_v)`` in ``q``'s dtype; zero for a query that sees no key.
    lse : Tensor
        ``(heads, total_q)`` float32 log-sum-exp of the logits (``-inf`` where nothing is seen).
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    out = q.new_zeros((q.shape[0], heads, v.shape[-1]))
    lse = torch.full((heads, q.shape[0]), -math.inf, dtype=torch.float32, device=q.device)
    left, right = _bound(window[0]), _bound(window[1])
    for b in range(len(cu_seqlens_q) - 1):
        q0, q1 = cu_seqlens_q[b], cu_seqlens_q[b + 1]
        k0, k1 = cu_seqlens_k[b], cu_seqlens_k[b + 1]
        lq, lk = q1 - q0, k1 - k0
        if lq == 0:
            continue
        qs = q[q0:q1].float()  # (lq, h, d)
        ks = k[k0:k1].float().repeat_interleave(group, dim=1)  # (lk, h, d): head h reads KV head h // group
        vs = v[k0:k1].float().repeat_interleave(group, dim=1)
        logits = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        if softcap > 0:
            logits = softcap * torch.tanh(logits / softcap)
        diagonal = torch.arange(lq, device=q.device)[:, None] + (lk - lq)  # bottom-right alignment
        key = torch.arange(lk, device=q.device)[None, :]
        allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        if causal:
            allowed &= key <= diagonal
        if left is not None:
            allowed &= key >= diagonal - left
        if right is not None:
            allowed &= key <= diagonal + right
        logits = logits.masked_fill(~allowed, -math.inf)
        row_lse = torch.logsumexp(logits, dim=-1)  # (h, lq)
        probs = torch.exp(logits - row_lse[..., None]).nan_to_num(0.0)  # rows seeing nothing -> 0
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, vs).to(q.dtype)
        lse[:, q0:q1] = row_lse
    return out, lse


def _check_tensors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int) -> None:
    if not (q.dim() == k.dim() == v.dim() == dims):
        raise ValueError(f"q, k, v must be {dims}-D, got {q.dim()}, {k.dim()}, {v.dim()}.")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(f"q, k, v must share one of {_DTYPES}, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if k.shape[:-1] != v.shape[:-1] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}.")
    if dims == 4 and q.shape[0] != k.shape[0]:
        raise ValueError(f"batch of q ({q.shape[0]}) and k ({k.shape[0]}) differ.")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"query heads ({q.shape[-2]}) must be a multiple of KV heads ({k.shape[-2]}).")


def _check_cu(cu: torch.Tensor, total: int, max_seqlen: Any, name: str) -> list[int]:
    """Validate one ``cu_seqlens`` tensor as a kernel would need it; return it as a list."""
    if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"cu_seqlens_{name} must be a 1-D int32 tensor of batch + 1 entries.")
    if cu.stride(0) != 1:
        raise ValueError(f"cu_seqlens_{name} must be contiguous.")
    values = [int(x) for x in cu.tolist()]
    lengths = [b - a for a, b in itertools.pairwise(values)]
    if values[0] != 0 or min(lengths) < 0 or values[-1] != total:
        raise ValueError(
            f"cu_seqlens_{name} = {values} must start at 0, never decrease and end at the packed total {total}; "
            "a kernel would read (and write) other sequences' rows."
        )
    bound = int(max_seqlen.item()) if isinstance(max_seqlen, torch.Tensor) else max_seqlen
    if bound is None or bound < max(lengths):
        raise ValueError(f"max_seqlen_{name} = {bound} is below the longest sequence ({max(lengths)}).")
    return values


def _unsupported(**options: Any) -> None:
    used = [name for name, value in options.items() if value]
    if used:
        raise NotImplementedError(f"the flash stand-in does not implement {used}.")


class FlashStandIn:
    """The stand-in kernels, and the record of every call made to them.

    Attributes
    ----------
    calls : list of FlashCall
        Every kernel call, in order.
    modules : dict of str to module
        The stand-in modules, keyed by the import names transformers uses.
    """

    def __init__(self) -> None:
        self.calls: list[FlashCall] = []
        fa2, fa4 = self._fa2_module(), self._fa4_module()
        fa2.cute = fa4  # flash_attn.cute lives inside the flash_attn package
        self.modules: dict[str, types.ModuleType] = {
            "flash_attn": fa2,
            "flash_attn.bert_padding": fa2.bert_padding,
            "flash_attn.cute": fa4,
            "flash_attn_interface": self._fa3_module(),
        }

    # -- shared implementation ----------------------------------------------------------------
    def _dense(
        self,
        package: str,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: Any,
        causal: bool,
        window: Any,
        softcap: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_tensors(q, k, v, 4)
        batch, sq, heads, _ = q.shape
        sk = k.shape[1]
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        self.calls.append(
            FlashCall(
                package,
                False,
                tuple(q.shape),
                tuple(k.shape),
                None,
                None,
                bool(causal),
                tuple(window),
                float(softcap or 0.0),
                scale,
            )
        )
        cu_q = [b * sq for b in range(batch + 1)]
        cu_k = [b * sk for b in range(batch + 1)]
        out, lse = attend_packed(
            q.reshape(batch * sq, heads, -1),
            k.reshape(batch * sk, k.shape[2], -1),
            v.reshape(batch * sk, v.shape[2], -1),
            cu_q,
            cu_k,
            scale=scale,
            causal=causal,
            window=window,
            softcap=float(softcap or 0.0),
        )
        return out.view(batch, sq, heads, -1), lse.view(heads, batch, sq).transpose(0, 1)

    def _varlen(
        self,
        package: str,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cu_seqlens_q: torch.Tensor,
        cu_seqlens_k: torch.Tensor,
        max_seqlen_q: Any,
        max_seqlen_k: Any,
        scale: Any,
        causal: bool,
        window: Any,
        softcap: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        _check_tensors(q, k, v, 3)
        cu_q = _check_cu(cu_seqlens_q, q.shape[0], max_seqlen_q, "q")
        cu_k = _check_cu(cu_seqlens_k, k.shape[0], max_seqlen_k, "k")
        if len(cu_q) != len(cu_k):
            raise ValueError(f"cu_seqlens_q ({len(cu_q)}) and cu_seqlens_k ({len(cu_k)}) describe different batches.")
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        self.calls.append(
            FlashCall(
                package,
                True,
                tuple(q.shape),
                tuple(k.shape),
                tuple(cu_q),
                tuple(cu_k),
                bool(causal),
                tuple(window),
                float(softcap or 0.0),
                scale,
            )
        )
        return attend_packed(
            q, k, v, cu_q, cu_k, scale=scale, causal=causal, window=window, softcap=float(softcap or 0.0)
        )

    # -- flash_attn (FA2) -----------------------------------------------------------------------
    def _fa2_module(self) -> types.ModuleType:
        standin = self

        def flash_attn_func(
            q,
            k,
            v,
            dropout_p=0.0,
            softmax_scale=None,
            causal=False,
            window_size=(-1, -1),
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
            return_attn_probs=False,
        ):
            """q: (batch, seqlen_q, heads, dim); k, v: (batch, seqlen_k, kv_heads, dim) -> out like q."""
            _unsupported(
                dropout_p=dropout_p, alibi_slopes=alibi_slopes is not None, return_attn_probs=return_attn_probs
            )
            return standin._dense("flash_attn", q, k, v, softmax_scale, causal, window_size, softcap)[0]

        def flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            dropout_p=0.0,
            softmax_scale=None,
            causal=False,
            window_size=(-1, -1),
            softcap=0.0,
            alibi_slopes=None,
            deterministic=False,
            return_attn_probs=False,
            block_table=None,
        ):
            """q: (total_q, heads, dim); k, v: (total_k, kv_heads, dim); cu_seqlens int32 (batch + 1,)."""
            _unsupported(
                dropout_p=dropout_p,
                alibi_slopes=alibi_slopes is not None,
                return_attn_probs=return_attn_probs,
                block_table=block_table is not None,
            )
            return standin._varlen(
                "flash_attn",
                q,
                k,
                v,
                cu_seqlens_q,
                cu_seqlens_k,
                max_seqlen_q,
                max_seqlen_k,
                softmax_scale,
                causal,
                window_size,
                softcap,
            )[0]

        def flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            k=None,
            v=None,
            rotary_cos=None,
            rotary_sin=None,
            cache_seqlens=None,
            cache_batch_idx=None,
            cache_leftpad=None,
            block_table=None,
            softmax_scale=None,
            causal=False,
            window_size=(-1, -1),
            softcap=0.0,
            rotary_interleaved=True,
            alibi_slopes=None,
            num_splits=0,
            return_softmax_lse=False,
        ):
            raise NotImplementedError("the flash stand-in has no paged-KV kernel (continuous batching).")

        def unpad_input(hidden_states, attention_mask, unused_mask=None):
            """(batch, seqlen, ...) and a (batch, seqlen) mask -> (total, ...), indices, cu_seqlens,
            max_seqlen, used_seqlens -- flash_attn.bert_padding's contract."""
            all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
            seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
            used = attention_mask.sum(dim=-1, dtype=torch.int32)
            indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
            cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
            flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
            return flat[indices], indices, cu_seqlens, int(seqlens.max().item()), used

        def pad_input(hidden_states, indices, batch, seqlen):
            """(total, ...) rows back to (batch, seqlen, ...), zeros elsewhere."""
            output = hidden_states.new_zeros((batch * seqlen, *hidden_states.shape[1:]))
            output[indices] = hidden_states
            return output.view(batch, seqlen, *hidden_states.shape[1:])

        padding = _module("flash_attn.bert_padding", pad_input=pad_input, unpad_input=unpad_input)
        return _module(
            "flash_attn",
            __version__="2.8.3",
            flash_attn_func=flash_attn_func,
            flash_attn_varlen_func=flash_attn_varlen_func,
            flash_attn_with_kvcache=flash_attn_with_kvcache,
            bert_padding=padding,
        )

    # -- flash_attn_interface (FA3) -------------------------------------------------------------
    def _fa3_module(self) -> types.ModuleType:
        standin = self

        def flash_attn_func(
            q,
            k,
            v,
            softmax_scale=None,
            causal=False,
            qv=None,
            q_descale=None,
            k_descale=None,
            v_descale=None,
            window_size=(-1, -1),
            attention_chunk=0,
            softcap=0.0,
            num_splits=1,
            pack_gqa=None,
            deterministic=False,
            sm_margin=0,
            return_attn_probs=False,
        ):
            _unsupported(
                qv=qv is not None,
                descale=any(x is not None for x in (q_descale, k_descale, v_descale)),
                attention_chunk=attention_chunk,
                return_attn_probs=return_attn_probs,
            )
            return standin._dense("flash_attn_interface", q, k, v, softmax_scale, causal, window_size, softcap)[0]

        def flash_attn_varlen_func(
            q,
            k,
            v,
            cu_seqlens_q,
            cu_seqlens_k,
            max_seqlen_q,
            max_seqlen_k,
            seqused_q=None,
            seqused_k=None,
            softmax_scale=None,
            causal=False,
            qv=None,
            q_descale=None,
            k_descale=None,
            v_descale=None,
            window_size=(-1, -1),
            attention_chunk=0,
            softcap=0.0,
            num_splits=1,
            pack_gqa=None,
            deterministic=False,
            sm_margin=0,
            return_attn_probs=False,
        ):
            _unsupported(
                seqused=seqused_q is not None or seqused_k is not None,
                qv=qv is not None,
                descale=any(x is not None for x in (q_descale, k_descale, v_descale)),
                attention_chunk=attention_chunk,
                return_attn_probs=return_attn_probs,
            )
            return standin._varlen(
                "flash_attn_interface",
                q,
                k,
                v,
                cu_seqlens_q,
                cu_seqlens_k,
                max_seqlen_q,
                max_seqlen_k,
                softmax_scale,
                causal,
                window_size,
                softcap,
            )[0]

        def flash_attn_with_kvcache(
            q,
            k_cache,
            v_cache,
            k=None,
            v=None,
            qv=None,
            rotary_cos=None,
            rotary_sin=None,
            cache_seqlens=None,
            cache_batch_idx=None,
            cache_leftpad=None,
            page_table=None,
            cu_seqlens_q=None,
            cu_seqlens_k_new=None,
            max_seqlen_q=None,
            rotary_seqlens=None,
            q_descale=None,
            k_descale=None,
            v_descale=None,
            softmax_scale=None,
            causal=False,
            window_size=(-1, -1),
            attention_chunk=0,
            softcap=0.0,
            rotary_interleaved=True,
            scheduler_metadata=None,
            num_splits=0,
            pack_gqa=None,
            sm_margin=0,
            return_softmax_lse=False,
        ):
            raise NotImplementedError("the flash stand-in has no paged-KV kernel (continuous batching).")

        return _module(
            "flash_attn_interface",
            flash_attn_func=flash_attn_func,
            flash_attn_varlen_func=flash_attn_varlen_func,
            flash_attn_with_kvcache=flash_attn_with_kvcache,
        )

    # -- flash_attn.cute (FA4) ------------------------------------------------------------------
    def _fa4_module(self) -> types.ModuleType:
        standin = self

        def flash_attn_func(
            q,
            k,
            v,
            qv=None,
            gather_kv_indices=None,
            softmax_scale=None,
            causal=False,
            window_size=(None, None),
            learnable_sink=None,
            softcap=0.0,
            num_splits=1,
            pack_gqa=None,
            deterministic=False,
            score_mod=None,
            score_mod_bwd=None,
            mask_mod=None,
            aux_tensors=None,
            aux_scalars=None,
            block_sparse_tensors=None,
            block_sparse_tensors_bwd=None,
            return_lse=False,
            gather_bwd_recompute_p=False,
            gather_bwd_token_chunk=None,
        ):
            _unsupported(
                qv=qv is not None,
                gather=gather_kv_indices is not None,
                sink=learnable_sink is not None,
                mods=any(x is not None for x in (score_mod, mask_mod, block_sparse_tensors)),
            )
            out, lse = standin._dense("flash_attn.cute", q, k, v, softmax_scale, causal, window_size, softcap)
            return out, (lse if return_lse else None)

        def flash_attn_varlen_func(
            q,
            k,
            v,
            qv=None,
            cu_seqlens_q=None,
            cu_seqlens_k=None,
            max_seqlen_q=None,
            max_seqlen_k=None,
            min_seqlen_k=None,
            seqused_q=None,
            seqused_k=None,
            gather_kv_indices=None,
            page_table=None,
            softmax_scale=None,
            causal=False,
            window_size=(None, None),
            learnable_sink=None,
            softcap=0.0,
            num_splits=1,
            pack_gqa=None,
            deterministic=False,
            score_mod=None,
            score_mod_bwd=None,
            mask_mod=None,
            block_sparse_tensors=None,
            aux_tensors=None,
            aux_scalars=None,
            return_lse=False,
            scheduler_metadata=None,
            seqlen_k_per_split=None,
            disable_scheduler_metadata=False,
            gather_bwd_recompute_p=False,
            gather_bwd_token_chunk=None,
        ):
            _unsupported(
                qv=qv is not None,
                seqused=seqused_q is not None or seqused_k is not None,
                paged=page_table is not None,
                gather=gather_kv_indices is not None,
                sink=learnable_sink is not None,
                mods=any(x is not None for x in (score_mod, mask_mod, block_sparse_tensors)),
            )
            if cu_seqlens_q is None or cu_seqlens_k is None:
                raise NotImplementedError("the flash stand-in's FA4 varlen kernel needs cu_seqlens_q and cu_seqlens_k.")
            out, lse = standin._varlen(
                "flash_attn.cute",
                q,
                k,
                v,
                cu_seqlens_q,
                cu_seqlens_k,
                max_seqlen_q,
                max_seqlen_k,
                softmax_scale,
                causal,
                window_size,
                softcap,
            )
            return out, (lse if return_lse else None)

        return _module(
            "flash_attn.cute", flash_attn_func=flash_attn_func, flash_attn_varlen_func=flash_attn_varlen_func
        )


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    # A spec, so importlib.util.find_spec(name) answers instead of raising for a module without one.
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    for key, value in attributes.items():
        setattr(module, key, value)
    return module


# transformers' table of lazily imported kernels (names as of 5.17-5.24); reset so that the
# first flash forward of the test imports the stand-in, and restored afterwards.
_LAZY_TABLE = (
    "_loaded_implementation",
    "_flash_fn",
    "_flash_varlen_fn",
    "_flash_with_kvcache_fn",
    "_pad_fn",
    "_unpad_fn",
    "_process_flash_kwargs_fn",
    "_process_with_kvcache_kwargs_fn",
)


def install(monkeypatch: Any) -> FlashStandIn:
    """Make transformers' ``flash_attention_2/3/4`` run on a fresh stand-in, for one test.

    Patches, all through ``monkeypatch`` (undone when the test ends):

    * ``sys.modules``: ``flash_attn``, ``flash_attn.bert_padding``, ``flash_attn.cute``,
      ``flash_attn_interface`` -- what transformers' lazy import reads;
    * ``modeling_flash_attention_utils.is_flash_attn_2_available`` (the lazy import takes FA2
      only when it says yes) and, in ``FLASH_ATTENTION_COMPATIBILITY_MATRIX``, each version's
      availability check and supported devices (``set_attn_implementation`` refuses a flash
      backend without the package or on a CPU-only machine);
    * transformers' table of lazily imported kernels, emptied so that the stand-in is imported.

    Parameters
    ----------
    monkeypatch : pytest.MonkeyPatch

    Returns
    -------
    FlashStandIn
        Its ``calls`` records every kernel call made during the test.
    """
    from transformers import modeling_flash_attention_utils as mfa

    standin = FlashStandIn()
    for name, module in standin.modules.items():
        monkeypatch.setitem(sys.modules, name, module)

    def yes(*args: Any, **kwargs: Any) -> bool:
        return True

    def cpu_device() -> bool:
        return True

    monkeypatch.setattr(mfa, "is_flash_attn_2_available", yes)
    for entry in mfa.FLASH_ATTENTION_COMPATIBILITY_MATRIX.values():
        monkeypatch.setitem(entry, "general_availability_check", yes)
        monkeypatch.setitem(entry, "supported_devices", ((cpu_device, "cpu"),))
    for name in _LAZY_TABLE:
        if hasattr(mfa, name):
            monkeypatch.setattr(mfa, name, None)
    return standin


def kernels(standin: FlashStandIn, package: str) -> dict[str, Callable[..., Any]]:
    """The stand-in functions of one package (``flash_attn``, ``flash_attn_interface``,
    ``flash_attn.cute``), for calling them directly."""
    module = standin.modules[package]
    return {name: getattr(module, name) for name in ("flash_attn_func", "flash_attn_varlen_func")}
