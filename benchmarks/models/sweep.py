#!/usr/bin/env python
"""Sweep every causal-LM architecture of the installed transformers against ScopeCache.

For every model type in transformers' ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` this script builds a
tiny random model from the type's default config, shrunk generically (hidden size 64, two layers
unless a per-layer pattern needs more, 4 heads / 2 KV heads, vocabulary 128; see
``shrink_overrides``), and runs it on the CPU in fp32 with greedy decoding, 8 new tokens, a batch
of 2 x 12 prompt tokens:

* the reference: ``generate`` with ``DynamicCache(config=model.config)``;
* (a) ``ScopeCache(model, decoding=Slide(10_000, 3))`` -- a budget that never evicts -- must give
  the same tokens (``torch.equal``); the largest logit difference is recorded;
* (b) the same on a left-padded batch (row 1 starts with 4 pad tokens);
* (c) ``Slide(4, 2)`` must run and hold at most prompt + 4 = 16 entries in every layer that
  ScopeCache manages.

Each type ends in one group:

* A -- builds, (a), (b) and (c) pass;
* B -- builds, ScopeCache refuses the model at construction with a ``ValueError``;
* C -- builds, ScopeCache accepts it but fails or differs at run time;
* D -- no tiny model could be built or run with DynamicCache generically (not a scope_kv result).

It tests the scope_kv the interpreter imports, i.e. the editable install of this repository's
``src/`` as it is in the working tree. Each record names it (version, git HEAD, whether ``src/``
has uncommitted changes, a SHA-256 of the package's ``.py`` files), so a source edit during a run
shows as records with different fingerprints. Run from the repository root::

    python benchmarks/models/sweep.py                       # whole sweep, resumes from earlier records
    python benchmarks/models/sweep.py --force               # redo every type (~15 min on 2 CPU cores)
    python benchmarks/models/sweep.py --only llama gemma3_text   # just these types (always redone)
    python benchmarks/models/sweep.py --report              # rebuild results.json / summary.md only
    python benchmarks/models/sweep.py --force --check benchmarks/models/expected.json

Each type runs in its own subprocess (``torch.set_num_threads(1)``, a timeout per type). Output,
under ``--out`` (default ``benchmarks/results/models/``): one record per type in
``types/<model_type>.json``, all records in ``results.json`` and a grouped ``summary.md``.
One-line explanations of the C and D entries (and remarks on some B entries) are read from
``diagnoses.json`` next to this script.

``--check FILE`` compares the groups with FILE (``{model_type: "A" | "B" | "C" | "D"}``, see
``expected.json``) and exits with status 1 on a regression: a type in C that FILE does not
expect in C (including a type FILE does not list), or a type FILE expects in A that is no longer
in A. Other changes are printed as notes. ``--write-expected FILE`` writes the current groups.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DEFAULT_OUT = os.path.join(REPO, "benchmarks", "results", "models")
DIAGNOSES = os.path.join(HERE, "diagnoses.json")
TIMEOUT = 60
PY = sys.executable
GROUP_TITLES = {
    "A": "builds, ScopeCache equals DynamicCache (plain and padded), Slide(4,2) bounded",
    "B": "builds, ScopeCache refuses at construction (ValueError)",
    "C": "builds, ScopeCache fails or differs at run time",
    "D": "no tiny model could be built / run with DynamicCache generically",
}

# ------------------------------------------------------------------------------------------
# generic config shrinking
# ------------------------------------------------------------------------------------------
HIDDEN = ("hidden_size", "n_embd", "d_model", "embed_dim", "emb_dim")
INTER = ("intermediate_size", "ffn_dim", "n_inner", "d_ff", "decoder_ffn_dim", "encoder_ffn_dim",
         "ffn_hidden_size", "dim_feedforward", "dim_ff", "dff", "d_inner", "intermediate_size_mlp",
         "first_dense_intermediate_size", "shared_intermediate_size")
LAYERS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers", "encoder_layers")
HEADS = ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
         "encoder_attention_heads")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_head_kv")
EXPERTS = ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts", "n_experts")
TOPK = ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts")
MOE_INTER = ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
             "moe_ffn_dim", "moe_shared_expert_intermediate_size", "expert_ffn_hidden_size",
             "shared_experts_intermediate_size", "mlp_only_intermediate_size")
POSITIONS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len")
HEAD_DIM = ("head_dim", "index_head_dim")
MLA = {"kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
       "v_head_dim": 16, "qk_head_dim": 16}
GROUPS = {"n_group": 1, "topk_group": 1}
VOCAB = 128
def _representative(seq):
    """Each distinct entry once, in order of first appearance (a per-layer pattern shrunk)."""
    out = []
    for x in seq:
        if x not in out:
            out.append(x)
    return out


def _attr(cfg, k, d):
    """The config's own value of k (its attribute; for per-layer heterogeneous configs, the dict's)."""
    try:
        return getattr(cfg, k)
    except Exception:
        return d.get(k)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def shrink_overrides(cfg, notes, prefix="", repeat=1, mha=False, moe=False):
    """Overrides (attr -> value) for one config object, only for attributes it has.

    repeat: how many times each layer pattern's distinct entries are laid out (1: each layer
    type once; 2: twice, for configs whose layers share weights or KV with a later one)."""
    o = {}
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    fields = set(d) | set(getattr(type(cfg), "__dataclass_fields__", {}) or {})
    has = lambda k: k in fields  # noqa: E731  (an attribute of the config proper)
    get = lambda k: _attr(cfg, k, d)  # noqa: E731

    def size(keys, value, only_above=None, allow_none=False):
        for k in keys:
            if not has(k):
                continue
            v = get(k)
            if _is_int(v) and (only_above is None or v > only_above):
                o[k] = value
            elif isinstance(v, list) and v and all(_is_int(x) for x in v):
                o[k] = ("LIST", value)  # per-layer sizes: resized with the layer count below
            elif v is None and allow_none:
                o[k] = value

    size(HIDDEN, 64)
    size(INTER, 128)
    size(HEADS, 4)
    # multi-head latent attention expands the latent to every query head: KV heads = heads
    mla = has("kv_lora_rank") and _is_int(get("kv_lora_rank"))
    for k in KV_HEADS:  # present (also as None = "same as heads"): 2, or 1 for multi-query
        if has(k) and (_is_int(get(k)) or get(k) is None):
            o[k] = 4 if (mha or mla) else (1 if get(k) == 1 else 2)
    size(HEAD_DIM, 16, allow_none=True)
    size(EXPERTS, 4, only_above=4, allow_none=moe)
    size(TOPK, 2, only_above=2)
    for k in TOPK:  # None (no default): 2
        if has(k) and get(k) is None:
            o[k] = 2
    size(MOE_INTER, 32)
    for k, v in MLA.items():
        size((k,), v)
    for k, v in GROUPS.items():
        size((k,), v)
    size(POSITIONS, 1024)
    for k, v in d.items():
        # every other vocabulary (hash-byte, pronunciation, unpadded, ...)
        if "vocab" in k and k != "vocab_size" and _is_int(v) and v > VOCAB:
            o[k] = VOCAB
        # any other head count (indexer heads, ...): at most the query heads of one KV group
        if "heads" in k and k not in o and _is_int(v) and v > 4:
            o[k] = 2
    # multi-head latent attention: head_dim is the rotary part (DeepSeek-V3 style)
    if has("qk_rope_head_dim") and has("head_dim") and _is_int(get("qk_rope_head_dim")):
        o["head_dim"] = MLA["qk_rope_head_dim"]
    # partial rotary given in dimensions (GPT-J, CodeGen)
    if has("rotary_dim") and _is_int(get("rotary_dim")):
        o["rotary_dim"] = 8
    # Mamba-2 blocks inside hybrids: mamba heads * mamba head dim == expand * hidden
    if has("mamba_num_heads") and has("mamba_head_dim"):
        e = get("mamba_expand") if has("mamba_expand") else (get("expand") if has("expand") else 2)
        e = e if _is_int(e) else 2
        o["mamba_head_dim"], o["mamba_num_heads"] = 16, 64 * e // 16
    for k in ("n_groups", "mamba_n_groups"):
        if has(k) and _is_int(get(k)):
            o[k] = 1
    for k in ("ssm_state_size", "mamba_d_state", "state_size"):
        if has(k) and _is_int(get(k)) and get(k) > 16:
            o[k] = 16
    # Bamba style: attention layer indices given explicitly (None: no attention layer)
    if has("attn_layer_indices"):
        o["attn_layer_indices"] = "LAST"
    # X-MOD: a default adapter language
    if has("default_language") and get("default_language") is None and has("languages") and get("languages"):
        o["default_language"] = next(iter(get("languages")))
    # Reformer: axial position embedding dims sum to hidden_size
    if has("axial_pos_embds_dim") and isinstance(get("axial_pos_embds_dim"), (list, tuple)):
        o["axial_pos_embds_dim"] = [32, 32]
    # Mamba-2 style: hidden_size * expand == num_heads * head_dim
    if has("expand") and has("num_heads") and has("head_dim") and _is_int(get("expand")) \
            and not has("num_attention_heads"):
        o["num_heads"] = 64 * get("expand") // 16
    if has("vocab_size") and _is_int(get("vocab_size")):
        o["vocab_size"] = VOCAB
        for k, fix in (("bos_token_id", 1), ("eos_token_id", 2), ("pad_token_id", 0),
                       ("decoder_start_token_id", 1)):
            v = get(k) if has(k) else None
            if (_is_int(v) and v >= VOCAB) or (
                    isinstance(v, (list, tuple)) and any(_is_int(x) and x >= VOCAB for x in v)):
                o[k] = fix
    # layers, and every per-layer pattern (list or string as long as the layer count)
    lk, n = None, None
    for k in LAYERS:
        if has(k) and _is_int(get(k)):
            lk, n = k, get(k)
            break
    if has("num_kv_shared_layers") and _is_int(get("num_kv_shared_layers")) and get("num_kv_shared_layers") > 0:
        repeat = max(repeat, 2)  # keep KV sharing: each type once producing, once reusing
    if lk is not None:
        patterns = {}
        for k in sorted(fields):
            v = get(k)
            # a per-layer pattern: a list as long as the layer count (few distinct entries), or a
            # string named *pattern* as long as it (Nemotron-H's "M-M*-...")
            is_list = isinstance(v, list) and (len(v) == n or k == "layer_types") and n > 2 \
                and all(isinstance(x, (str, int, float, bool)) or x is None for x in v)
            is_str = isinstance(v, str) and "pattern" in k and len(v) == n and n > 2
            # a cycled block pattern shorter than the layer count (RecurrentGemma's block_types)
            is_list = is_list or (isinstance(v, list) and k.endswith("block_types") and 1 < len(v) < n
                                  and all(isinstance(x, str) for x in v))
            if not (is_list or is_str) or (k in o and isinstance(o[k], tuple)):
                continue
            rep = _representative(v)
            if len(rep) > 4:
                continue
            patterns[k] = rep
        width = max([2] + [len(r) for r in patterns.values()])
        target = width * repeat if patterns else 2 * repeat
        for k in LAYERS:
            if has(k) and _is_int(get(k)):
                o[k] = target
        for k, rep in patterns.items():
            seq = [rep[i % len(rep)] for i in range(target)]
            o[k] = "".join(seq) if isinstance(get(k), str) else seq
            if len(rep) > 1:
                notes.append(f"{prefix}{k}: pattern shrunk to {o[k]!r}")
        for k, v in list(o.items()):
            if isinstance(v, tuple) and v[0] == "LIST":
                o[k] = [v[1]] * target
        if o.get("attn_layer_indices") == "LAST":
            o["attn_layer_indices"] = [target - 1]
        if has("num_kv_shared_layers") and _is_int(get("num_kv_shared_layers")) and get("num_kv_shared_layers") > 0:
            o["num_kv_shared_layers"] = target // 2
            notes.append(f"{prefix}num_kv_shared_layers -> {target // 2} (of {target} layers)")
    for k, v in list(o.items()):
        if isinstance(v, tuple):
            o[k] = [v[1]] * len(get(k))
    if o.get("attn_layer_indices") == "LAST":
        del o["attn_layer_indices"]
    # hybrid periods (Jamba style): one attention layer in two
    if has("attn_layer_period") and has("attn_layer_offset"):
        o["attn_layer_period"], o["attn_layer_offset"] = 2, 1
    if has("expert_layer_period") and has("expert_layer_offset"):
        o["expert_layer_period"], o["expert_layer_offset"] = 2, 1
    if has("first_k_dense_replace") and _is_int(get("first_k_dense_replace")):
        o["first_k_dense_replace"] = min(get("first_k_dense_replace"), 1)
    return o


def _shrink_subconfigs(cfg, notes, repeat, prefix="", depth=0, mha=False, moe=False):
    import transformers

    if depth > 3:
        return
    for key in list(vars(cfg)):
        try:
            sub = getattr(cfg, key, None)
        except Exception:  # per-layer attributes of heterogeneous configs
            continue
        if sub is None or not isinstance(sub, transformers.PretrainedConfig):
            continue
        so = shrink_overrides(sub, notes, prefix=f"{prefix}{key}.", repeat=repeat, mha=mha, moe=moe)
        try:
            new = type(sub)(**{**sub.to_dict(), **so})
        except Exception as e:  # fall back to setting attributes
            notes.append(f"{prefix}{key}: rebuilt by setattr ({type(e).__name__})")
            new = copy.deepcopy(sub)
            for k, v in so.items():
                setattr(new, k, v)
        _shrink_subconfigs(new, notes, repeat, prefix=f"{prefix}{key}.", depth=depth + 1, mha=mha, moe=moe)
        setattr(cfg, key, new)


def build_config(model_type, repeat=1, mha=False, moe=False):
    from transformers import AutoConfig

    notes = []
    base = AutoConfig.for_model(model_type)
    over = shrink_overrides(base, notes, repeat=repeat, mha=mha, moe=moe)
    cfg = AutoConfig.for_model(model_type, **over)
    _shrink_subconfigs(cfg, notes, repeat, mha=mha, moe=moe)  # multimodal wrappers, nested decoders: the same way
    # a decoder for the BERT family (their *ForCausalLM warns otherwise and attends bidirectionally)
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True
    text = cfg.get_text_config(decoder=True)
    if hasattr(text, "is_decoder"):
        text.is_decoder = True
    return cfg, over, notes


def build_model(model_type, meta=False):
    """(model, notes, backend, sliding_fix), or BuildError carrying every attempt's error.

    Config attempts, in order: layer patterns laid out once; twice; KV heads = heads; expert
    counts that default to None set to 4. Each config is tried with sdpa, then eager."""
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M

    cls_name = M[model_type]
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise BuildError(f"transformers has no attribute {cls_name}")
    errors = []
    attempts = ((1, False, False), (2, False, False), (1, True, False), (1, False, True))
    for repeat, mha, moe in attempts:
        tag = f"repeat={repeat}" + (", mha" if mha else "") + (", experts None->4" if moe else "")
        try:
            cfg, _, notes = build_config(model_type, repeat, mha, moe)
            if mha:
                notes.append("num_key_value_heads = num_attention_heads (GQA attempts failed)")
            if moe:
                notes.append("expert counts that default to None set to 4 (earlier attempts failed)")
            cfg = match_config(cls, cfg, notes)
            cfg, sl = fix_all_sliding(model_type, cfg, notes)
        except Exception as e:
            errors.append(f"[config, {tag}] " + err(e) + where(e))
            continue
        if getattr(cfg, "is_encoder_decoder", False) and not any(
                s in cls_name for s in ("ForCausalLM", "LMHead", "Decoder")):
            raise BuildError(f"encoder-decoder config ({type(cfg).__name__}) with class {cls_name}: skipped")
        for backend in ("sdpa", "eager"):
            try:
                torch.manual_seed(0)
                if meta:
                    with torch.device("meta"):
                        model = cls._from_config(copy.deepcopy(cfg), attn_implementation=backend)
                else:
                    model = cls._from_config(copy.deepcopy(cfg), attn_implementation=backend)
            except Exception as e:
                errors.append(f"[model, {tag}, {backend}] " + err(e) + where(e))
                if backend == "sdpa" and "sdpa" not in str(e).lower() and "scaled_dot" not in str(e).lower():
                    break  # not a backend problem: eager would fail the same way
                continue
            if repeat > 1 or mha or moe:
                notes.append(f"retried (first attempt: {errors[0][:200]})")
            if backend != "sdpa":
                notes.append("sdpa refused: " + errors[-1][:200])
            return model, notes, backend, sl
    raise BuildError(" | ".join(errors))


class BuildError(Exception):
    pass


def where(e):
    tb = traceback.extract_tb(e.__traceback__)
    tb = [f for f in tb if f.filename != os.path.abspath(__file__) and "configuration_utils" not in f.filename
          and "huggingface_hub" not in f.filename] or tb
    f = tb[-1]
    return f" @ {os.path.basename(f.filename)}:{f.lineno}"


def match_config(cls, cfg, notes):
    """The config the model class takes: cfg itself, or the sub-config of the class's config_class
    (a *ForCausalLM listed under a composite model type, e.g. qwen3_5 -> Qwen3_5ForCausalLM)."""
    want = getattr(cls, "config_class", None)
    if want is None or isinstance(cfg, want):
        return cfg
    for key in list(vars(cfg)):
        try:
            sub = getattr(cfg, key, None)
        except Exception:
            continue
        if isinstance(sub, want):
            notes.append(f"{cls.__name__} takes {want.__name__}: used config.{key}")
            return sub
    notes.append(f"{cls.__name__}.config_class is {want.__name__}, config is {type(cfg).__name__}: used as is")
    return cfg


def all_sliding(cfg):
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicSlidingWindowLayer

    layers = list(DynamicCache(config=cfg).layers)
    kinds = [type(layer).__name__ for layer in layers]
    return bool(layers) and all(isinstance(layer, DynamicSlidingWindowLayer) for layer in layers), kinds


def fix_all_sliding(model_type, cfg, notes):
    """If every layer is sliding-window: full attention (layer_types if present, else sliding_window=None)."""
    try:
        sliding, _ = all_sliding(cfg)
    except Exception as e:
        notes.append(f"DynamicCache(config) failed: {type(e).__name__}: {str(e)[:150]}")
        return cfg, None
    if not sliding:
        return cfg, None
    text = cfg.get_text_config(decoder=True)
    window = getattr(text, "sliding_window", None)
    if getattr(text, "layer_types", None) is not None:
        fix = {"layer_types": ["full_attention" if "sliding" in str(t) else t for t in text.layer_types]}
    else:
        fix = {"sliding_window": None}
    try:
        if text is cfg:
            d = cfg.to_dict()
            d.update(fix)
            d.pop("model_type", None)
            new = type(cfg)(**{k: v for k, v in d.items() if k != "transformers_version"})
            if hasattr(cfg, "is_decoder"):
                new.is_decoder = cfg.is_decoder
        else:
            new = copy.deepcopy(cfg)
            text = new.get_text_config(decoder=True)
            for k, v in fix.items():
                setattr(text, k, v)
    except Exception as e:
        msg = f"every layer sliding (sliding_window={window}); the config refuses {fix}: {err(e)[:200]}; kept"
        notes.append(msg)
        return cfg, msg
    msg = f"every layer sliding (sliding_window={window}); set {fix}"
    still, _ = all_sliding(new)
    if still:
        msg += " -- still all sliding after the fix"
    notes.append(msg)
    return new, msg


# ------------------------------------------------------------------------------------------
# one architecture
# ------------------------------------------------------------------------------------------
def err(e):
    return f"{type(e).__name__}: {str(e)[:300]}"


def score_diff(a, b):
    """Largest |a - b| over the step scores, equal entries (also -inf from min_new_tokens) counting 0."""
    import torch

    if a.shape != b.shape:
        return None
    return float(torch.where(a == b, torch.zeros_like(a), (a - b).abs()).max())


def gen(model, ids, mask, cache):
    import torch

    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                             cache=cache, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
    return out.sequences, torch.stack(out.scores, 1)


def run_one(model_type):
    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(1)
    import transformers
    from transformers import DynamicCache
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M

    transformers.logging.set_verbosity_error()
    cls_name = M[model_type]
    r = dict(model_type=model_type, **{"class": cls_name}, built=False, build_error=None, backend=None,
             dynamic_ok=False, scope_equal=None, scope_equal_padded=None, small_budget_ok=None,
             refused_message=None, error=None, notes=[], timings={},
             date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             transformers_version=transformers.__version__, torch_version=torch.__version__)
    t0 = time.time()
    # ---- build
    try:
        model, notes, backend, sl = build_model(model_type)
    except Exception as e:
        r["build_error"] = str(e)[:1500] if isinstance(e, BuildError) else err(e)
        return r
    r["notes"] += notes
    r["sliding_fix"] = sl
    r["backend"] = backend
    r.pop("traceback", None)
    model.eval()
    r["built"] = True
    r["params"] = sum(p.numel() for p in model.parameters())
    r["timings"]["build"] = round(time.time() - t0, 1)
    try:
        text = model.config.get_text_config(decoder=True)
        r["layer_templates"] = [type(x).__name__ for x in DynamicCache(config=model.config).layers]
        r["layer_types"] = getattr(text, "layer_types", None)
        r["sliding_window"] = getattr(text, "sliding_window", None)
    except Exception as e:
        r["notes"].append("DynamicCache(config) templates: " + err(e))

    # ---- inputs
    torch.manual_seed(0)
    ids = torch.randint(3, 120, (2, 12))
    mask = torch.ones_like(ids)
    pids = ids.clone()
    pids[1, :4] = 0
    pmask = mask.clone()
    pmask[1, :4] = 0

    def dyn():
        try:
            return DynamicCache(config=model.config)
        except Exception as e:
            note = "DynamicCache(config=model.config) failed (" + err(e)[:150] + "); used DynamicCache()"
            if note not in r["notes"]:
                r["notes"].append(note)
            return DynamicCache()

    # ---- DynamicCache reference
    try:
        ref, ref_scores = gen(model, ids, mask, dyn())
        r["dynamic_ok"] = True
        r["dynamic_new_tokens"] = ref[:, 12:].tolist()
    except Exception as e:
        r["error"] = "DynamicCache generate: " + err(e)
        r["traceback"] = traceback.format_exc()[-2000:]
        return r
    r["timings"]["dynamic"] = round(time.time() - t0, 1)
    try:
        pref, pref_scores = gen(model, pids, pmask, dyn())
    except Exception as e:
        pref = None
        r["notes"].append("DynamicCache padded generate: " + err(e))

    import scope_kv
    from scope_kv import ScopeCache, Slide

    r["scope_kv_file"] = scope_kv.__file__

    # ---- a. huge budget: must equal DynamicCache
    try:
        cache = ScopeCache(model, decoding=Slide(10_000, 3))
    except ValueError as e:
        r["refused_message"] = str(e)
        r["traceback"] = traceback.format_exc()[-2000:]
        return r
    except Exception as e:
        r["error"] = "ScopeCache(...) construction: " + err(e)
        r["traceback"] = traceback.format_exc()[-2000:]
        return r
    r["managed_layers"] = [i for i in range(len(cache.layers)) if cache.managed_layer(i) is not None]
    errs = []
    try:
        out, scores = gen(model, ids, mask, cache)
        r["scope_equal"] = bool(torch.equal(out, ref))
        r["max_score_diff"] = score_diff(scores, ref_scores)
        if not r["scope_equal"]:
            r["diff_detail"] = {"ref": ref[:, 12:].tolist(), "scope": out[:, 12:].tolist()}
    except Exception as e:
        r["scope_equal"] = False
        errs.append("huge-budget generate: " + err(e))
        r["traceback"] = traceback.format_exc()[-2000:]
    # ---- b. padded, huge budget
    if pref is not None:
        try:
            cache = ScopeCache(model, decoding=Slide(10_000, 3))
            out, scores = gen(model, pids, pmask, cache)
            r["scope_equal_padded"] = bool(torch.equal(out, pref))
            r["max_score_diff_padded"] = score_diff(scores, pref_scores)
            if not r["scope_equal_padded"]:
                r["diff_detail_padded"] = {"ref": pref[:, 12:].tolist(), "scope": out[:, 12:].tolist()}
        except Exception as e:
            r["scope_equal_padded"] = False
            errs.append("padded huge-budget generate: " + err(e))
            r.setdefault("traceback", traceback.format_exc()[-2000:])
    # ---- c. small budget
    try:
        cache = ScopeCache(model, decoding=Slide(4, 2))
        out, _ = gen(model, ids, mask, cache)
        kv = {i: cache.kv_length(i) for i in r["managed_layers"]}
        r["small_budget_kv"] = kv
        # 12 prompt entries + at most 4 decoding entries (7 decoded tokens are fed back)
        r["small_budget_ok"] = all(v <= 12 + 4 for v in kv.values()) and out.shape == ref.shape
        if not r["small_budget_ok"]:
            errs.append(f"small budget: kv lengths {kv} exceed prompt+4=16 or shape {tuple(out.shape)}")
    except Exception as e:
        r["small_budget_ok"] = False
        errs.append("small-budget generate: " + err(e))
        r.setdefault("traceback", traceback.format_exc()[-2000:])
    if errs:
        r["error"] = " | ".join(errs)
    r["timings"]["total"] = round(time.time() - t0, 1)
    return r


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def source_fingerprint(package_dir):
    """SHA-256 (first 12 hex digits) of the package's .py files, paths and contents."""
    import hashlib

    h = hashlib.sha256()
    for root, dirs, files in os.walk(package_dir):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                h.update(os.path.relpath(path, package_dir).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(f.read() + b"\0")
    return h.hexdigest()[:12]


def scope_label():
    """Which scope_kv is under test: its version and location, the repository's HEAD, whether src/
    has uncommitted changes (read-only git queries, left out when git is unavailable) and the
    fingerprint of the package's sources. Recomputed for every type."""
    try:
        import scope_kv

        version = getattr(scope_kv, "__version__", "?")
        package_dir = os.path.dirname(os.path.abspath(scope_kv.__file__))
        where_ = os.path.relpath(package_dir, REPO)
    except Exception as e:  # reported per type as well
        return f"scope_kv not importable ({err(e)})"

    def git(*args):
        try:
            p = subprocess.run(["git", "--no-optional-locks", "-C", REPO, *args], capture_output=True, text=True,
                               timeout=30)
            return p.stdout.strip() if p.returncode == 0 else ""
        except Exception:
            return ""

    sha = git("rev-parse", "--short=10", "HEAD")
    dirty = git("status", "--porcelain", "--", "src")
    parts = [f"git {sha}" + (" + uncommitted changes in src/" if dirty else "")] if sha else []
    parts.append(f"sources sha256 {source_fingerprint(package_dir)}")
    return f"scope_kv {version} from {where_} ({', '.join(parts)})"


def _site_dirs():
    import site
    import sysconfig

    dirs = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    with contextlib.suppress(Exception):
        dirs |= set(site.getsitepackages())
    return sorted((d for d in dirs if d), key=len, reverse=True)


def relative_paths(text):
    """Machine-independent paths in a record: site-packages/... and repository-relative."""
    for d in _site_dirs():
        text = text.replace(d.rstrip(os.sep) + os.sep, "site-packages/")
    return text.replace(REPO.rstrip(os.sep) + os.sep, "")


def types_dir(out):
    return os.path.join(out, "types")


def drive(types, out, force, timeout):
    os.makedirs(types_dir(out), exist_ok=True)
    print(f"scope_kv under test: {scope_label()}", flush=True)
    labels = set()
    todo = [t for t in types if force or not os.path.exists(os.path.join(types_dir(out), f"{t}.json"))]
    if len(todo) < len(types):
        print(f"{len(types) - len(todo)} types already have a record (--force redoes them)", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for i, t in enumerate(todo):
        t0 = time.time()
        before = scope_label()
        try:
            p = subprocess.run([PY, os.path.abspath(__file__), "--one", t], capture_output=True, text=True,
                               timeout=timeout, env=env, cwd=REPO)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if line:
                r = json.loads(line[-1][7:])
            else:
                r = crash_record(t, f"subprocess exit {p.returncode}: {p.stderr[-300:]}")
        except subprocess.TimeoutExpired:
            r = crash_record(t, f"timeout after {timeout} s")
        r["wall_s"] = round(time.time() - t0, 1)
        after = scope_label()
        r["scope_kv_under_test"] = before if after == before else f"{before}, changed while it ran to {after}"
        labels.add(r["scope_kv_under_test"])
        r = json.loads(relative_paths(json.dumps(r, default=str)))
        with open(os.path.join(types_dir(out), f"{t}.json"), "w") as f:
            json.dump(r, f, indent=1, default=str)
            f.write("\n")
        print(f"[{i + 1}/{len(todo)}] {t}: {status_of(r)} ({r['wall_s']} s)", flush=True)
    if len({fp for label in labels for fp in fingerprints(label)}) > 1:
        print("WARNING: the scope_kv sources changed during the run; the records name, in "
              "scope_kv_under_test, the state each type saw:\n  " + "\n  ".join(sorted(labels)), flush=True)


def crash_record(t, msg):
    import torch
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M

    return dict(model_type=t, **{"class": M[t]}, built=None, build_error=None, backend=None, dynamic_ok=None,
                scope_equal=None, scope_equal_padded=None, small_budget_ok=None, refused_message=None,
                error=msg, notes=[], crashed=True,
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                transformers_version=transformers.__version__, torch_version=torch.__version__)


def group_of(r):
    if not r.get("built") or not r.get("dynamic_ok"):
        return "D"
    if r.get("refused_message"):
        return "B"
    if r.get("scope_equal") and r.get("scope_equal_padded") in (True, None) and r.get("small_budget_ok") \
            and not r.get("error"):
        return "A"
    return "C"


def status_of(r):
    g = group_of(r)
    extra = r.get("build_error") or r.get("refused_message") or r.get("error") or ""
    return f"{g} {extra[:160]}"


def probe(types):
    """Tiny configs on the meta device: parameter counts, to tune the shrinker."""
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    for t in types:
        try:
            m, notes, _, _ = build_model(t, meta=True)
            n = sum(p.numel() for p in m.parameters())
            big = {k: v for k, v in m.config.to_dict().items() if isinstance(v, int) and not isinstance(v, bool)
                   and v > 256}
            print(f"{t:28s} {n / 1e6:8.3f}M  big={big} notes={notes}", flush=True)
        except Exception as e:
            print(f"{t:28s} FAIL {str(e)[:700]}", flush=True)


# ------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------
def load_records(out, types):
    rs = []
    for t in types:
        p = os.path.join(types_dir(out), f"{t}.json")
        if os.path.exists(p):
            with open(p) as f:
                rs.append(json.load(f))
    diag = {}
    if os.path.exists(DIAGNOSES):
        with open(DIAGNOSES) as f:
            diag = json.load(f)
    for r in rs:
        r["group"] = group_of(r)
        d = diag.get(r["model_type"])
        # an entry is {"group": ..., "text": ...}: shown only while the type is still in that group
        if d and d.get("group") == r["group"]:
            r["diagnosis"] = d["text"]
    return rs


def first_sentence(s, limit=200):
    s = " ".join((s or "").split())
    cut = s.find(". ")
    if cut != -1:
        s = s[:cut + 1]
    return s if len(s) <= limit else s[:limit - 3] + "..."


def refusal_kind(r):
    m = r["refused_message"]
    if "multi-head latent attention" in m:
        return "multi-head latent attention (kv_lora_rank)"
    if "does not dispatch attention" in m:
        return "attention not dispatched through AttentionInterface"
    if "sliding-window layer" in m:
        return "every attention layer sliding-window"
    if "call the attention function" in m:
        return "attends more than once per layer"
    if "transform the cached" in m:
        return "transforms the cached keys before attending"
    if "write the cache layer at" in m:
        return "attention modules write cache layers other than their own"
    if "no attention module that takes a cache" in m:
        return "no attention module that takes a cache (keeps its own state)"
    if "needs a " in m:
        return "non-plain cache layer: " + m.split("needs a ")[1].split(";")[0].split(" ")[0]
    # otherwise the message's first sentence without the class name
    return first_sentence(m.replace(r["class"], "the model"), 120)


def rerun_command(out, timeout):
    cmd = "python benchmarks/models/sweep.py --force"
    if os.path.abspath(out) != os.path.abspath(DEFAULT_OUT):
        cmd += " --out " + shlex.quote(os.path.relpath(out, REPO))
    if timeout != TIMEOUT:
        cmd += f" --timeout {timeout}"
    return cmd


def _values(rs, key):
    return ", ".join(sorted({str(r.get(key)) for r in rs if r.get(key) is not None})) or "?"


LABEL = re.compile(r"scope_kv (\S+) from (\S+) \((?:git ([^,]+), )?sources sha256 ([0-9a-f]+)\)")


def fingerprints(label):
    return [m.group(4) for m in LABEL.finditer(label or "")]


def scope_states(rs):
    """The scope_kv sources the records were made with: one line when every record saw the same
    sources (the git states seen, e.g. a commit of those sources during the run, in order), the
    distinct labels with counts otherwise."""
    states = [m.groups() for r in sorted(rs, key=lambda r: r.get("date") or "")
              for m in LABEL.finditer(str(r.get("scope_kv_under_test")))]
    if states and len({s[:2] + s[3:] for s in states}) == 1:
        version, where_, _, fp = states[0]
        gits = list(dict.fromkeys(s[2] for s in states if s[2]))
        return f"scope_kv {version} from {where_}, sources sha256 {fp}" + (
            f" (git {', then '.join(gits)})" if gits else "")
    counts = {}
    for r in rs:
        k = str(r.get("scope_kv_under_test"))
        counts[k] = counts.get(k, 0) + 1
    return "SEVERAL source states (re-run with --force for one): " + "; ".join(
        f"{k} -- {n} types" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def report(out, timeout):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M

    rs = load_records(out, list(M))
    with open(os.path.join(out, "results.json"), "w") as f:
        # tracebacks stay in the per-type records
        json.dump([{k: v for k, v in r.items() if k != "traceback"} for r in rs], f, indent=1, default=str)
        f.write("\n")
    by = {g: [r for r in rs if r["group"] == g] for g in "ABCD"}
    dates = sorted(r["date"][:10] for r in rs if r.get("date"))
    date = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "?"
    missing = [t for t in M if t not in {r["model_type"] for r in rs}]

    def cell(s):
        return " ".join(str(s or "").split()).replace("|", "\\|")

    # facts for the caveats, from this run's records
    windows = sorted({r["sliding_window"] for r in by["A"] if isinstance(r.get("sliding_window"), int)
                      and any("Sliding" in t for t in r.get("layer_templates") or [])})
    inexact = [f"{r['model_type']} (max |diff| {r['max_score_diff']:.1e})" for r in by["A"] if r.get("max_score_diff")]
    if not missing:
        missing_text = ""
    elif len(missing) <= 20:
        missing_text = f" ({len(missing)} without a record: {', '.join(missing)})"
    else:
        missing_text = f" ({len(missing)} without a record)"
    caveats = []
    if windows and windows[0] > 20:
        caveats.append(f"Every sliding window in group A's configs is at least {windows[0]} entries, longer "
                       "than the 20 tokens of a generation here, so sliding layers never actually slide.")
    caveats.append("The weights are random, so a batch row often repeats a single token.")
    caveats.append("In group A the logits equal DynamicCache's bit for bit" +
                   (f", except {', '.join(inexact)}, with the same tokens." if inexact else "."))
    caveats.append("Configs are `AutoConfig.for_model` defaults shrunk generically (`shrink_overrides`); "
                   "the notes of each record tell which build attempt succeeded.")
    caveats.append("A type lands in D when the generic tiny config does not build or DynamicCache itself "
                   "fails; D says nothing about scope_kv.")

    lines = [
        "# ScopeCache across transformers' causal-LM architectures",
        "",
        f"transformers {_values(rs, 'transformers_version')}, torch {_values(rs, 'torch_version')}, "
        f"CPU, run on {date} (UTC). scope_kv under test: {scope_states(rs)}.",
        "",
        "Re-run from the repository root (about 15 minutes on 2 CPU cores):",
        "",
        f"    {rerun_command(out, timeout)}",
        "",
        "and compare with the expected groups (exit status 1 on a regression):",
        "",
        f"    {rerun_command(out, timeout).replace(' --force', '')} --report "
        "--check benchmarks/models/expected.json",
        "",
        f"{len(rs)} model types from `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`"
        + missing_text + ". "
        "Tiny random models (hidden 64, 2 layers unless a per-layer pattern needs more, 4 heads / 2 KV heads, "
        "vocab 128), fp32, greedy, 8 new tokens, batch 2 x 12 prompt tokens. Tests: (a) "
        "`ScopeCache(model, decoding=Slide(10_000, 3))` against `DynamicCache(config=model.config)` (token "
        "equality, `torch.equal`); (b) the same on a left-padded batch (row 1: 4 pads); (c) `Slide(4, 2)` runs and "
        "holds at most prompt + 4 = 16 entries per managed layer. Per-type records: `types/<model_type>.json`; "
        "all of them: `results.json`.",
        "",
        "Caveats:",
        "",
        *[f"* {c}" for c in caveats],
        "",
        f"Counts: A {len(by['A'])}, B {len(by['B'])}, C {len(by['C'])}, D {len(by['D'])}.",
        "",
    ]

    def short_notes(r):
        keep = [n for n in r.get("notes", []) if "pattern shrunk" not in n and "rebuilt by setattr" not in n]
        return cell("; ".join(keep))[:300]

    lines.append(f"## (A) {GROUP_TITLES['A']}\n")
    lines.append("Managed layers are the layers ScopeCache compresses (the others are sliding-window or KV-shared "
                 "layers left to transformers). Notes list the non-default build steps.\n")
    lines.append("| model_type | class | backend | managed / layers | Slide(4,2) kv | notes |\n"
                 "|---|---|---|---|---|---|")
    for r in by["A"]:
        kv = sorted(set((r.get("small_budget_kv") or {}).values()))
        lines.append(f"| {r['model_type']} | {r['class']} | {r['backend']} | "
                     f"{len(r.get('managed_layers') or [])}/{len(r.get('layer_templates') or [])} | {kv} | "
                     f"{short_notes(r)} |")

    lines.append(f"\n## (B) {GROUP_TITLES['B']}\n")
    lines.append("The refusal message is the first sentence of the first type's message.\n")
    kinds = {}
    for r in by["B"]:
        kinds.setdefault(refusal_kind(r), []).append(r)
    lines.append("| reason | model types | refusal message | remarks |\n|---|---|---|---|")
    for k, rs_ in kinds.items():
        remark = "; ".join(f"{r['model_type']}: {r['diagnosis']}" for r in rs_ if r.get("diagnosis"))
        lines.append(f"| {cell(k)} | {', '.join(r['model_type'] for r in rs_)} | "
                     f"{cell(first_sentence(rs_[0]['refused_message']))} | {cell(remark)} |")

    lines.append(f"\n## (C) {GROUP_TITLES['C']}\n")
    lines.append("| model_type | class | equal | equal padded | Slide(4,2) ok | first error / difference | diagnosis |\n"
                 "|---|---|---|---|---|---|---|")
    for r in by["C"]:
        e = r.get("error") or ""
        if r.get("scope_equal") is False and "huge-budget" not in e:
            e = f"tokens differ (max logit diff {r.get('max_score_diff')}); " + e
        if r.get("scope_equal_padded") is False and "padded" not in e:
            e = f"padded tokens differ (max logit diff {r.get('max_score_diff_padded')}); " + e
        e = e.split(" | ")[0]  # the first failure (the later ones usually repeat it)
        lines.append(f"| {r['model_type']} | {r['class']} | {r.get('scope_equal')} | {r.get('scope_equal_padded')}"
                     f" | {r.get('small_budget_ok')} | {cell(first_sentence(e, 240))} | "
                     f"{cell(r.get('diagnosis', 'not diagnosed yet'))} |")

    lines.append(f"\n## (D) {GROUP_TITLES['D']}\n")
    lines.append("| model_type | class | reason | error |\n|---|---|---|---|")
    for r in by["D"]:
        why = r.get("build_error") or r.get("error") or ""
        lines.append(f"| {r['model_type']} | {r['class']} | {cell(r.get('diagnosis', ''))} | {cell(why)[:200]} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("groups: " + ", ".join(f"{g} {len(v)}" for g, v in by.items()), flush=True)
    return rs


# ------------------------------------------------------------------------------------------
# expected groups
# ------------------------------------------------------------------------------------------
def write_expected(rs, path):
    with open(path, "w") as f:
        json.dump({r["model_type"]: r["group"] for r in sorted(rs, key=lambda r: r["model_type"])}, f, indent=1)
        f.write("\n")
    print(f"wrote {len(rs)} expected groups to {path}", flush=True)


def check(rs, path, types):
    """Print the differences from the expected groups; the regressions decide the exit status."""
    with open(path) as f:
        expected = json.load(f)
    got = {r["model_type"]: r for r in rs}
    regressions, notes = [], []
    for t in types:
        e = expected.get(t)
        r = got.get(t)
        if r is None:
            notes.append(f"{t}: no record (expected {e})")
            continue
        g = r["group"]
        why = first_sentence(r.get("error") or r.get("refused_message") or r.get("build_error") or "", 160)
        if g == "C" and e != "C":
            what = "new type (not in the expected file)" if e is None else f"expected {e}"
            regressions.append(f"{t}: {what}, now C (fails at run time): {why}")
        elif e == "A" and g != "A":
            regressions.append(f"{t}: expected A, now {g}: {why}")
        elif e is None:
            notes.append(f"{t}: new type (not in the expected file), group {g}")
        elif e != g:
            notes.append(f"{t}: expected {e}, now {g} (update the expected file if intended)")
    for t in sorted(set(expected) - set(types)):
        if t not in got:
            notes.append(f"{t}: in the expected file but not a causal-LM type of this transformers")
    print(f"\ncheck against {path}: {len(types)} types, {len(regressions)} regressions, "
          f"{len(notes)} notes")
    for n in notes:
        print(f"  note: {n}")
    for x in regressions:
        print(f"  REGRESSION: {x}")
    return 1 if regressions else 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help="output directory (default: benchmarks/results/models/ of this repository)")
    ap.add_argument("--only", nargs="+", metavar="TYPE", help="run just these model types (always redone)")
    ap.add_argument("--force", action="store_true", help="redo types that already have a record")
    ap.add_argument("--report", action="store_true", help="run nothing; rebuild results.json / summary.md")
    ap.add_argument("--timeout", type=int, default=TIMEOUT, help="seconds per type (default %(default)s)")
    ap.add_argument("--check", metavar="FILE", help="exit 1 on a regression against FILE's expected groups")
    ap.add_argument("--write-expected", metavar="FILE", help="write the groups of this run to FILE")
    ap.add_argument("--one", metavar="TYPE", help=argparse.SUPPRESS)  # one type in this process (the worker)
    ap.add_argument("--probe", nargs="*", metavar="TYPE",
                    help="build the tiny configs on the meta device and print parameter counts")
    a = ap.parse_args()
    if a.one:
        r = run_one(a.one)
        print("RESULT " + json.dumps(r, default=str), flush=True)
        return 0
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as M

    if a.probe is not None:
        probe(a.probe or list(M))
        return 0
    unknown = [t for t in a.only or [] if t not in M]
    if unknown:
        ap.error(f"not causal-LM model types of this transformers: {', '.join(unknown)}")
    types = a.only or list(M)
    out = os.path.abspath(a.out)
    if not a.report:
        drive(types, out, force=a.force or bool(a.only), timeout=a.timeout)
    rs = report(out, a.timeout)
    if a.write_expected:
        write_expected(rs, a.write_expected)
    if a.check:
        return check(rs, a.check, types)
    return 0


if __name__ == "__main__":
    sys.exit(main())
