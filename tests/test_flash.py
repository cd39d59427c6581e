"""flash_attention_2/3/4 executed on the CPU: transformers' real flash dispatch, unpadding and
scope_kv's ``scope_flash_attention_*`` functions, over a pure-torch stand-in for the kernels
(``tests/flash_standin.py``), in float32.

What is shown: the stand-in computes what the kernels compute (against an independent
reference) and refuses malformed ``cu_seqlens``; with budgets above every length ScopeCache
generates exactly DynamicCache's tokens on the same flash backend; with small budgets every
strategy and a prefill compressor produce the sdpa path's tokens and logits, and the memory
bound holds at every step; left-padded rows equal their prompts alone; the mask reaching the
kernel is in physical slots (transformers' padding mask before any prompt entry is evicted,
the layer's own afterwards, ``None`` when every slot is valid); and a mask sliced the way
transformers slices it for stock caches would give different answers.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DynamicCache, modeling_flash_attention_utils
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import flash_standin
from conftest import ARCHS, make_model
from scope_kv import (
    Adaptive,
    Discontinuous,
    ScopeCache,
    ScopeLayer,
    Slide,
    SnapKV,
    UnifiedH2O,
    UnifiedStreamingLLM,
)
from scope_kv.attention import SUPPORTED_BACKENDS, attention_modules, disable_scope_attention
from scope_kv.compat import cache_kwargs
from scope_kv.masks import mask_format

FLASH = ("flash_attention_2", "flash_attention_3", "flash_attention_4")
PACKAGES = {
    "flash_attention_2": "flash_attn",
    "flash_attention_3": "flash_attn_interface",
    "flash_attention_4": "flash_attn.cute",
}
PROMPT, STEPS, HUGE = 24, 12, 4096

STRATEGIES = {
    "slide": lambda: (None, Slide(6, 2)),
    "adaptive": lambda: (None, Adaptive(8, 2, delta=2)),
    "discontinuous": lambda: (None, Discontinuous(8, 2, delta=2)),
    "unified_h2o": lambda: (None, UnifiedH2O(14, 2)),
    "unified_streamingllm": lambda: (None, UnifiedStreamingLLM(14, 2)),
    "snapkv+slide": lambda: (SnapKV(budget=10, window=4, kernel=5), Slide(6, 2)),
}


@pytest.fixture
def standin(monkeypatch: pytest.MonkeyPatch) -> flash_standin.FlashStandIn:
    return flash_standin.install(monkeypatch)


def _batch(seed: int, pads: tuple[int, ...] = (0, 7)) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ``(len(pads), PROMPT)`` ids and mask; row ``b`` starts with ``pads[b]`` pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(pads), PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for row, n in enumerate(pads):
        ids[row, :n], mask[row, :n] = 0, 0
    return ids, mask


def _greedy(model, cache, ids, mask, on_step=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill, then STEPS greedy decoding forwards (positions from the mask, as generate computes
    them). Returns the tokens ``(batch, STEPS)`` and every forward's last logits ``(STEPS + 1, batch, vocab)``."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits, tokens = [], []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
        logits.append(out.logits[:, -1])
        for step in range(STEPS):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            position = positions[:, -1:] + 1 + step
            out = model(input_ids=token, attention_mask=mask, position_ids=position, **cache_kwargs(cache))
            logits.append(out.logits[:, -1])
            if on_step is not None:
                on_step(step)
    return torch.cat(tokens, dim=1), torch.stack(logits)


def _generate(model, cache, ids, mask=None, new: int = STEPS) -> torch.Tensor:
    mask = torch.ones_like(ids) if mask is None else mask
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, **cache_kwargs(cache)
    )
    return out[:, ids.shape[1] :]


def _managed(cache: ScopeCache) -> list[ScopeLayer]:
    return [layer for layer in cache.layers if isinstance(layer, ScopeLayer)]


# -- the stand-in itself ----------------------------------------------------------------------


def _reference(q, k, v, lq, lk, *, scale, causal, window, softcap):
    """One sequence by the documented rule, written independently of the stand-in: q (lq, h, d),
    k/v (lk, hk, d); explicit per-query loops over allowed keys, float64."""
    h, hk = q.shape[1], k.shape[1]
    out = torch.zeros(lq, h, v.shape[-1], dtype=torch.float64)
    for head in range(h):
        kv = head * hk // h
        for i in range(lq):
            diagonal = i + lk - lq
            keys = [
                j
                for j in range(lk)
                if (not causal or j <= diagonal)
                and (window[0] is None or j >= diagonal - window[0])
                and (window[1] is None or j <= diagonal + window[1])
            ]
            if not keys:
                continue
            s = torch.stack([q[i, head].double() @ k[j, kv].double() for j in keys]) * scale
            if softcap:
                s = softcap * torch.tanh(s / softcap)
            p = torch.softmax(s, dim=0)
            out[i, head] = sum(p[n] * v[j, kv].double() for n, j in enumerate(keys))
    return out


CONTRACT_CASES = [
    # (lengths_q, lengths_k, causal, window, softcap)
    ((5, 1, 3), (5, 9, 3), True, (None, None), 0.0),  # prefill, decode (lq < lk, bottom-right), chunk
    ((4, 2), (2, 6), True, (None, None), 0.0),  # lq > lk: the first rows see nothing -> zeros
    ((6, 3), (6, 8), True, (2, 2), 0.0),  # sliding window around the diagonal
    ((5, 1), (5, 7), True, (None, None), 5.0),  # soft-capping
    ((3, 4), (5, 4), False, (None, None), 0.0),  # not causal
]


@pytest.mark.parametrize("package", ["flash_attn", "flash_attn_interface", "flash_attn.cute"])
@pytest.mark.parametrize("case", CONTRACT_CASES, ids=["mixed", "empty_rows", "window", "softcap", "full"])
def test_standin_computes_the_documented_flash_rule(package, case):
    """varlen (packed, cu_seqlens) against an independent float64 loop; GQA 6 query heads on 2
    KV heads; the dense function on an equal-length batch gives the same rows."""
    lengths_q, lengths_k, causal, window, softcap = case
    standin = flash_standin.FlashStandIn()
    fns = flash_standin.kernels(standin, package)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lengths_q), 6, 8, generator=g)
    k = torch.randn(sum(lengths_k), 2, 8, generator=g)
    v = torch.randn(sum(lengths_k), 2, 8, generator=g)
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    flash_window = tuple(-1 if w is None else w for w in window) if package != "flash_attn.cute" else window
    out = fns["flash_attn_varlen_func"](
        q,
        k,
        v,
        cu_seqlens_q=cu_q,
        cu_seqlens_k=cu_k,
        max_seqlen_q=max(lengths_q),
        max_seqlen_k=max(lengths_k),
        softmax_scale=0.3,
        causal=causal,
        window_size=flash_window,
        softcap=softcap,
    )
    out = out[0] if isinstance(out, tuple) else out  # FA4 returns (out, lse)
    assert out.shape == q.shape
    for b in range(len(lengths_q)):
        rows = slice(int(cu_q[b]), int(cu_q[b + 1]))
        keys = slice(int(cu_k[b]), int(cu_k[b + 1]))
        want = _reference(
            q[rows],
            k[keys],
            v[keys],
            lengths_q[b],
            lengths_k[b],
            scale=0.3,
            causal=causal,
            window=window,
            softcap=softcap,
        )
        torch.testing.assert_close(out[rows].double(), want, rtol=1e-5, atol=1e-5)
    if len(set(lengths_q)) == 1 and len(set(lengths_k)) == 1:  # dense layout of the same batch
        batch, lq, lk = len(lengths_q), lengths_q[0], lengths_k[0]
        dense = fns["flash_attn_func"](
            q.view(batch, lq, 6, 8),
            k.view(batch, lk, 2, 8),
            v.view(batch, lk, 2, 8),
            softmax_scale=0.3,
            causal=causal,
            window_size=flash_window,
            softcap=softcap,
        )
        dense = dense[0] if isinstance(dense, tuple) else dense
        torch.testing.assert_close(dense.reshape_as(out), out)
    assert standin.calls[0].varlen


def test_standin_refuses_malformed_cu_seqlens():
    fns = flash_standin.kernels(flash_standin.FlashStandIn(), "flash_attn")
    q, k = torch.randn(4, 2, 8), torch.randn(7, 1, 8)

    def call(cu_q, cu_k, max_q=3, max_k=5):
        return fns["flash_attn_varlen_func"](q, k, k, cu_q, cu_k, max_q, max_k, causal=True)

    good_q, good_k = torch.tensor([0, 1, 4], dtype=torch.int32), torch.tensor([0, 2, 7], dtype=torch.int32)
    assert call(good_q, good_k).shape == q.shape
    bad = {
        "does not start at 0": (torch.tensor([1, 1, 4], dtype=torch.int32), good_k),
        "decreases": (good_q, torch.tensor([0, 5, 2], dtype=torch.int32)),
        "ends before the total": (good_q, torch.tensor([0, 2, 6], dtype=torch.int32)),
        "int64": (good_q, good_k.long()),
        "another batch": (good_q, torch.tensor([0, 7], dtype=torch.int32)),
    }
    for what, (cu_q, cu_k) in bad.items():
        with pytest.raises(ValueError):
            call(cu_q, cu_k)
            pytest.fail(f"accepted cu_seqlens that {what}")
    with pytest.raises(ValueError, match="max_seqlen_k"):
        call(good_q, good_k, max_k=4)


def test_a_shifted_sequence_boundary_changes_the_output():
    """Well-formed but wrong cu_seqlens (one key moved to the other sequence) give other rows:
    the stand-in reads exactly the rows cu_seqlens name."""
    fns = flash_standin.kernels(flash_standin.FlashStandIn(), "flash_attn")
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 2, 8, generator=g), torch.randn(9, 1, 8, generator=g), torch.randn(9, 1, 8, generator=g)
    cu_q = torch.tensor([0, 1, 2], dtype=torch.int32)
    right = fns["flash_attn_varlen_func"](q, k, v, cu_q, torch.tensor([0, 4, 9], dtype=torch.int32), 1, 5, causal=True)
    shifted = fns["flash_attn_varlen_func"](
        q, k, v, cu_q, torch.tensor([0, 5, 9], dtype=torch.int32), 1, 5, causal=True
    )
    assert not torch.allclose(right[0], shifted[0]) and not torch.allclose(right[1], shifted[1])


# -- wiring -----------------------------------------------------------------------------------


def test_every_flash_backend_is_wired():
    for backend in FLASH:
        assert backend in SUPPORTED_BACKENDS
        assert mask_format(backend) is mask_format("flash_attention_2")
        # transformers 5.17-5.24 dispatch each to its flash wrapper
        assert ALL_ATTENTION_FUNCTIONS[backend] is ALL_ATTENTION_FUNCTIONS["flash_attention_2"]


def test_transformers_alone_cannot_run_a_registered_flash_wrapper(standin, monkeypatch):
    """Why scope_kv switches flash models itself (compat.set_attention_implementation) and hands
    transformers' flash wrapper a module view naming the base backend (attention._BackendView):
    both of transformers' own paths look a kernel up by the implementation's name, and
    ``scope_flash_attention_2`` names none. Fails (and the workarounds can go) once a release
    accepts registered flash wrappers."""
    model = make_model("llama", "flash_attention_2")
    ScopeCache(model, decoding=Slide(6, 2))  # registers scope_flash_attention_2
    assert model.config._attn_implementation == "scope_flash_attention_2"
    other = make_model("llama", "flash_attention_2")
    with pytest.raises(ValueError, match="scope_flash_attention_2"):
        other.set_attn_implementation("scope_flash_attention_2")
    # (5.17 records a failed import as loaded: start the second check from an empty import table)
    monkeypatch.setattr(modeling_flash_attention_utils, "_loaded_implementation", None)
    module = next(m for m in model.modules() if getattr(m, "layer_idx", None) == 0 and hasattr(m, "q_proj"))
    q = torch.randn(1, 4, 3, 16)
    kv = torch.randn(1, 2, 3, 16)
    with pytest.raises(ValueError, match="scope_flash_attention_2"):
        ALL_ATTENTION_FUNCTIONS["flash_attention_2"](module, q, kv, kv, None)


@pytest.mark.parametrize("backend", FLASH)
def test_disabling_puts_a_flash_model_back_on_its_kernel(standin, backend):
    """``disable_scope_attention`` on a flash model: the configs name the base kernel again, the
    routing hooks are gone, transformers' own flash path runs it (DynamicCache's tokens, the kernel
    called), and the next ScopeCache switches it back."""
    model = make_model("llama", backend)
    ids, mask = _batch(seed=2)
    expected = _generate(model, DynamicCache(config=model.config), ids, mask)
    ScopeCache(model, decoding=Slide(HUGE, 8))
    assert disable_scope_attention(model) == backend == model.config._attn_implementation
    assert all(len(m._forward_pre_hooks) == 0 for m in attention_modules(model))
    n = len(standin.calls)
    assert torch.equal(_generate(model, DynamicCache(config=model.config), ids, mask), expected)
    assert len(standin.calls) > n
    assert torch.equal(_generate(model, ScopeCache(model, decoding=Slide(HUGE, 8)), ids, mask), expected)
    assert model.config._attn_implementation == f"scope_{backend}"


# -- against DynamicCache and against the sdpa path --------------------------------------------

HUGE_CASES = [(arch, "flash_attention_2") for arch in ARCHS] + [
    ("llama", "flash_attention_3"),
    ("llama", "flash_attention_4"),
]


@pytest.mark.parametrize("arch,backend", HUGE_CASES, ids=[f"{a}-{b}" for a, b in HUGE_CASES])
def test_huge_budget_generates_dynamic_cache_tokens_on_the_same_backend(standin, arch, backend):
    model = make_model(arch, backend)
    ids, mask = _batch(seed=1)
    expected = _generate(model, DynamicCache(config=model.config), ids, mask)
    n = len(standin.calls)
    assert n > 0 and {c.package for c in standin.calls} == {PACKAGES[backend]}
    got = _generate(model, ScopeCache(model, decoding=Slide(HUGE, 8)), ids, mask)
    assert model.config._attn_implementation == f"scope_{backend}"
    assert len(standin.calls) > n  # the ScopeCache run reached the kernels too
    assert torch.equal(got, expected)


def _bounds(cache: ScopeCache, prefill, decoding):
    """A per-step check: entries held per layer <= prompt (as kept) + budget + slack; a unified
    baseline's valid entries per row <= its one budget."""
    layers = _managed(cache)

    def check(step: int) -> None:
        for layer in layers:
            where = f"layer {layer.layer_idx}, step {step}"
            if decoding.evicts_prompt:
                start = layer.start if layer.start is not None else torch.zeros(1, dtype=torch.long)
                assert int((layer.length - start).max()) <= decoding.budget, where
                continue
            prompt = PROMPT if prefill is None else prefill.budget
            assert layer.length <= prompt + decoding.budget + decoding.slack, where
            assert layer.length - layer.prefill_length <= decoding.budget + decoding.slack, where

    return check


@pytest.mark.parametrize("backend", FLASH)
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_small_budgets_equal_the_sdpa_path_and_stay_bounded(standin, backend, name):
    """Padded batch, every strategy and a prefill compressor: tokens identical to the sdpa
    path's, logits within 1e-4 at every step, and the bound held after every step."""
    ids, mask = _batch(seed=2)
    sdpa_model, flash_model = make_model("llama", "sdpa"), make_model("llama", backend)
    prefill, decoding = STRATEGIES[name]()
    expected_tokens, expected_logits = _greedy(
        sdpa_model, ScopeCache(sdpa_model, prefill=prefill, decoding=decoding), ids, mask
    )
    cache = ScopeCache(flash_model, prefill=prefill, decoding=decoding)
    tokens, logits = _greedy(flash_model, cache, ids, mask, on_step=_bounds(cache, prefill, decoding))
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert all(c.package == PACKAGES[backend] for c in standin.calls) and any(c.varlen for c in standin.calls)
    assert sum(layer.selections for layer in _managed(cache)) > 0  # selection did run


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])
def test_small_budget_equals_the_sdpa_path_on_every_architecture(standin, arch):
    ids, mask = _batch(seed=4)
    sdpa_model, flash_model = make_model(arch, "sdpa"), make_model(arch, "flash_attention_2")
    expected_tokens, expected_logits = _greedy(sdpa_model, ScopeCache(sdpa_model, decoding=Slide(6, 2)), ids, mask)
    tokens, logits = _greedy(flash_model, ScopeCache(flash_model, decoding=Slide(6, 2)), ids, mask)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)


def _gemma2(backend: str) -> torch.nn.Module:
    """A tiny Gemma2: logit soft-capping on every layer, sliding-window layers between full ones."""
    torch.manual_seed(7)
    config = transformers.Gemma2Config(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_hidden_layers=3,
        sliding_window=6,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=None,
        layer_types=["sliding_attention", "full_attention", "full_attention"],
    )
    model = transformers.Gemma2ForCausalLM(config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if param_name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
    model.set_attn_implementation(backend)
    model.generation_config.pad_token_id = 0
    return model.eval()


def test_softcap_and_sliding_windows_equal_the_eager_path(standin):
    """Gemma2 soft-caps its logits (the stand-in applies softcap like the kernels) and has
    sliding-window layers (window_size); transformers' sdpa ignores softcap, so eager is the
    reference. The selection scores use the soft-capped logits on both."""
    ids, mask = _batch(seed=5)
    eager, flash = _gemma2("eager"), _gemma2("flash_attention_2")
    expected_tokens, expected_logits = _greedy(eager, ScopeCache(eager, decoding=Slide(6, 2)), ids, mask)
    tokens, logits = _greedy(flash, ScopeCache(flash, decoding=Slide(6, 2)), ids, mask)
    assert torch.equal(tokens, expected_tokens)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    assert all(c.softcap == 2.0 for c in standin.calls)
    assert any(c.window == (5, 5) for c in standin.calls)  # transformers passes (window - 1, window - 1)


# -- padding and masks ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["flash_attention_2", "flash_attention_4"])
@pytest.mark.parametrize("name", ["slide", "snapkv+slide", "unified_h2o"])
def test_left_padded_rows_equal_their_prompts_alone(standin, backend, name):
    """A padded batch runs the varlen kernel, a prompt alone the plain one; they agree."""
    model = make_model("llama", backend)
    ids, mask = _batch(seed=6, pads=(0, 9, 4))
    prefill, decoding = STRATEGIES[name]()
    batched = _generate(model, ScopeCache(model, prefill=prefill, decoding=decoding), ids, mask)
    assert any(c.varlen for c in standin.calls)
    for row in range(ids.shape[0]):
        start = int((mask[row] == 0).sum())
        n = len(standin.calls)
        alone = _generate(model, ScopeCache(model, prefill=prefill, decoding=decoding), ids[row : row + 1, start:])
        assert not any(c.varlen for c in standin.calls[n:])  # no padding: plain flash_attn_func
        assert torch.equal(batched[row], alone[0]), f"row {row}"


def _recording(monkeypatch, backend: str) -> list[tuple[torch.Tensor | None, object]]:
    """Wrap transformers' attention function for ``backend`` (what ``scope_<backend>`` runs over
    the held slots): record the mask it is handed and the attention weights it returns, per call."""
    inner = ALL_ATTENTION_FUNCTIONS[backend]
    seen: list[tuple[torch.Tensor | None, object]] = []

    def recorded(module, query, key, value, attention_mask, **kwargs):
        output = inner(module, query, key, value, attention_mask, **kwargs)
        seen.append((attention_mask, output[1]))
        return output

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, backend, recorded)
    return seen


def test_mask_before_eviction_is_transformers_padding_mask_in_physical_slots(standin, monkeypatch):
    """Slide never evicts prompt entries: every forward gets transformers' 2-D mask sliced to the
    layer's physical slots, pads at the front, also once the decoding pool was compacted and the
    physical length fell behind the logical one; the kernel sees, per row, the held slots minus
    the pads. The flash path returns no attention weights."""
    model = make_model("llama", "flash_attention_2")
    ids, mask = _batch(seed=7, pads=(0, 5))
    cache = ScopeCache(model, decoding=Slide(6, 2))
    seen = _recording(monkeypatch, "flash_attention_2")
    layer, n_layers = _managed(cache)[0], len(_managed(cache))
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    behind = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(cache))
        assert standin.calls[0].varlen and standin.calls[0].kv_lengths == (PROMPT, PROMPT - 5)
        for step in range(STEPS):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            n, held_before = len(standin.calls), layer.length
            out = model(
                input_ids=token, attention_mask=mask, position_ids=positions[:, -1:] + 1 + step, **cache_kwargs(cache)
            )
            call = standin.calls[n]  # layer 0's kernel call of this step
            attention_mask, weights = seen[-n_layers]  # what layer 0's flash attention was handed
            assert weights is None
            assert not layer.own_mask and attention_mask.shape == (2, held_before + 1)  # physical slots
            assert attention_mask[0].all() and not attention_mask[1, :5].any() and attention_mask[1, 5:].all()
            assert call.varlen and call.kv_lengths == (held_before + 1, held_before + 1 - 5)
            behind.append(layer.seen - layer.length)
    assert max(behind) > 0  # physical fell behind logical: slicing from the right would have dropped the pads


def test_mask_after_eviction_is_the_layers_own(standin, monkeypatch):
    """A prefill compressor evicts prompt entries: from the first decoding step the layer passes
    its own int32 mask (rows differ by their filler), or None when every slot is valid (the plain
    kernel then runs)."""
    model = make_model("llama", "flash_attention_2")
    seen = _recording(monkeypatch, "flash_attention_2")
    # row 1 of (0, 16) has 8 real tokens, below the budget of 10: it keeps 8 and 2 filler slots
    for pads, filler in (((0, 16), 2), ((0, 5), 0), ((0, 0), 0)):
        ids, mask = _batch(seed=8, pads=pads)
        cache = ScopeCache(model, prefill=SnapKV(budget=10, window=4, kernel=5), decoding=Slide(6, 2))
        layers = _managed(cache)
        before = len(seen), len(standin.calls)
        _generate(model, cache, ids, mask, new=4)
        decode_masks = [m for m, _ in seen[before[0] + len(layers) :]]  # after the prefill forward
        decode_calls = standin.calls[before[1] + len(layers) :]
        assert all(layer.own_mask for layer in layers)
        if filler:
            assert all(m is not None and m.dtype == torch.int32 and m.dim() == 2 for m in decode_masks)
            assert all(w is None for _, w in seen)  # the flash path returns no attention weights
            assert all(not m[1, :filler].any() and m[1, filler:].all() and m[0].all() for m in decode_masks)
            assert all(c.varlen and c.kv_lengths[0] - c.kv_lengths[1] == filler for c in decode_calls)
        else:  # every row kept the same number: no filler, no mask
            assert all(m is None for m in decode_masks)
            assert not any(c.varlen for c in decode_calls)


def test_right_sliced_mask_would_attend_to_pads(standin, monkeypatch):
    """Negative control: transformers' own flash mask slices the 2-D mask from the right, which is
    right for stock caches (logical = physical) but, once ScopeCache's physical length falls
    behind the logical one, drops the pad columns at the front: the kernel then attends to pads
    and the padded row no longer equals its prompt alone. The stand-in notices."""
    model = make_model("llama", "flash_attention_2")
    ids, mask = _batch(seed=9, pads=(0, 6))
    alone_tokens, alone_logits = _greedy(model, ScopeCache(model, decoding=Slide(6, 2)), ids[1:, 6:], mask[1:, 6:])
    n = len(standin.calls)
    tokens, logits = _greedy(model, ScopeCache(model, decoding=Slide(6, 2)), ids, mask)
    # the kernel saw each row's held slots minus row 1's 6 pads, at every forward
    assert {c.kv_lengths[0] - c.kv_lengths[1] for c in standin.calls[n:]} == {6}
    assert torch.equal(tokens[1], alone_tokens[0])
    torch.testing.assert_close(logits[:, 1], alone_logits[:, 0], rtol=1e-4, atol=1e-4)
    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, "scope_flash_attention_2", flash_attention_mask)
    n = len(standin.calls)
    _, wrong = _greedy(model, ScopeCache(model, decoding=Slide(6, 2)), ids, mask)
    torch.testing.assert_close(wrong[:7, 1], alone_logits[:7, 0], rtol=1e-4, atol=1e-4)  # until the pool is cut
    assert (wrong[:, 1] - alone_logits[:, 0]).abs().max() > 1e-2  # then the pads are attended
    assert min(c.kv_lengths[0] - c.kv_lengths[1] for c in standin.calls[n:]) < 6  # row 1 read pad slots
