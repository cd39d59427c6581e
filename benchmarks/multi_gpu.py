"""Two GPUs: ScopeCache on a model split with ``device_map="auto"``, and data-parallel evaluation.

Run on a machine with two GPUs (random-weight Llama geometry, ~1.0B parameters, bf16, sdpa)::

    python benchmarks/multi_gpu.py --out benchmarks/results/multi_gpu
    python benchmarks/multi_gpu.py --cpu-smoke --out /tmp/multi_gpu_smoke   # tiny model, CPU, plumbing only

What it does (docs/multi_gpu.md explains how to read the results):

1. **build**: a random-weight ``LlamaForCausalLM`` (hidden 2048, 16 layers, 32 query / 8 KV
   heads, MLP 8192) and a byte-level tokenizer built offline are saved to a work directory.
   Query and key projections are scaled by 4 so that attention is not uniform and selection
   decisions are well separated (as in the test-suite's tiny models).
2. **split**: the saved model is loaded twice, on GPU 0 alone (``device_map={"": 0}``) and with
   ``device_map="auto"`` and a ``max_memory`` of 70% of the weights per GPU, which forces a split
   over both GPUs. Each method generates greedily (fixed length) from the same random prompt on
   both; the tokens must be identical. For the split model the device of every layer's pools is
   compared with the device accelerate runs that layer on. (With one GPU only, the split is over
   the GPU and the CPU, and the data-parallel stage is skipped.)
3. **eval**: ``scope-kv eval fidelity`` on the shipped LongGenBench GSM8K prompts, timed end to
   end (process start, model load, run, merge) with ``accelerate launch --num_processes 1`` and
   ``accelerate launch --multi_gpu --num_processes 2``; the merged result files are compared
   (timing fields excluded). Then a two-process run is killed once it has written a few records
   and started again: it must resume (records written before the kill are kept) and end with
   the one-GPU result.

Every stage runs in its own process (a CUDA error in one cannot hide the others' results);
results go to ``<out>/multi_gpu.json`` and ``<out>/multi_gpu.md`` as each stage ends.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMING = {"seconds", "prefill_seconds", "tokens_per_second"}

GPU_GEOMETRY = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, max_position_embeddings=8192)
SMOKE_GEOMETRY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048)


# -- settings ----------------------------------------------------------------------------------
def settings(smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(dtype="float32", prompt=64, new=32, budget=16, recent=4, prefill_budget=32,
                    eval_limit=4, eval_steps=16, eval_prompt_tokens=4096, eval_methods=["slide:8/2", "adaptive:8/2"])
    return dict(dtype="bfloat16", prompt=1024, new=192, budget=96, recent=32, prefill_budget=512,
                eval_limit=8, eval_steps=96, eval_prompt_tokens=4096, eval_methods=["slide:48/16", "adaptive:48/16"])


def methods(s: dict[str, Any]) -> list[tuple[str, int, Any]]:
    """(name, batch, cache factory) for the split stage; the factory takes the model."""
    from transformers import DynamicCache

    from scope_kv import Adaptive, Discontinuous, ScopeCache, Slide, SnapKV, UnifiedH2O

    b, r, n, c = s["budget"], s["recent"], s["new"], s["prefill_budget"]

    def reference_path(model):
        cache = ScopeCache(model, decoding=Slide(b, r))
        for layer in cache.layers:
            layer.fast_decode = False  # plain-torch scoring and compaction, no fused kernels
        return cache

    return [
        ("dynamic", 1, lambda m: DynamicCache(config=m.config)),
        ("scope-unbounded", 1, lambda m: ScopeCache(m)),
        (f"slide:{b}/{r} (reference path)", 1, reference_path),
        (f"slide:{b}/{r}", 1, lambda m: ScopeCache(m, decoding=Slide(b, r))),
        (f"adaptive:{b}/{r}", 1, lambda m: ScopeCache(m, decoding=Adaptive(b, r, max_new_tokens=n))),
        (f"discontinuous:{b}/{r}", 1, lambda m: ScopeCache(m, decoding=Discontinuous(b, r, max_new_tokens=n))),
        (f"snapkv:{c}+slide:{b}/{r}", 1, lambda m: ScopeCache(m, prefill=SnapKV(c), decoding=Slide(b, r))),
        (f"unified-h2o:{c + b}/{r}", 1, lambda m: ScopeCache(m, decoding=UnifiedH2O(c + b, r))),
        (f"slide:{b}/{r} padded batch", 2, lambda m: ScopeCache(m, decoding=Slide(b, r))),
    ]


# -- stage: build ------------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level tokenizer (256 byte symbols + end-of-text), built with no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<eos>": 0, **{symbol: i + 1 for i, symbol in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def stage_build(work: pathlib.Path, smoke: bool) -> dict[str, Any]:
    import torch
    import transformers

    s = settings(smoke)
    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), eos_token_id=0, pad_token_id=0, bos_token_id=0,
        **(SMOKE_GEOMETRY if smoke else GPU_GEOMETRY),
    )
    device = "cpu" if smoke else "cuda:0"
    torch.manual_seed(20250101)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
    model = model.to(getattr(torch, s["dtype"]))
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "dtype": s["dtype"], "geometry": config.to_diff_dict(),
            "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}


# -- stage: split ------------------------------------------------------------------------------
def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


def _layer_device(model, idx: int):
    """Where accelerate runs decoder layer ``idx``: its hook's execution device (a layer mapped to
    "cpu" next to a GPU is offloaded: its weights stay on the CPU but it runs on the main GPU),
    else ``hf_device_map``'s most specific entry."""
    import torch

    layer = model.model.layers[idx]
    for module in (layer.self_attn.k_proj, layer.self_attn, layer):
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)

    device_map = getattr(model, "hf_device_map", None) or {"": next(model.parameters()).device}
    name = f"model.layers.{idx}"
    key = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len)
    where = device_map[key]
    if isinstance(where, int):
        return torch.device("cuda", where)
    if where in ("disk", "meta"):
        return torch.device("cpu")  # offloaded weights are executed on the main device (smoke run)
    return torch.device(where)


def _set_current_device(device):
    import torch

    def hook(module, args):
        if device.type == "cuda":
            torch.cuda.set_device(device)

    return hook


def stage_split(work: pathlib.Path, smoke: bool, out: pathlib.Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from scope_kv import ScopeLayer
    from scope_kv.compat import cache_kwargs

    s = settings(smoke)
    dtype = getattr(torch, s["dtype"])
    path = work / "model"
    if smoke:
        single_kwargs = dict(device_map={"": "cpu"})
        n_layers = SMOKE_GEOMETRY["num_hidden_layers"]
        split_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                     **{f"model.layers.{i}": ("disk" if i >= n_layers // 2 else "cpu") for i in range(n_layers)}}
        split_kwargs = dict(device_map=split_map, offload_folder=str(work / "offload"))
    else:
        weight_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        single_kwargs = dict(device_map={"": 0})
        if torch.cuda.device_count() >= 2:
            split_kwargs = dict(device_map="auto", max_memory={0: int(0.7 * weight_bytes), 1: int(0.7 * weight_bytes)})
        else:  # one GPU only: split over the GPU and the CPU (the last layers run on the CPU)
            split_kwargs = dict(device_map="auto", max_memory={0: int(0.85 * weight_bytes), "cpu": 4 * weight_bytes})
    single = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **single_kwargs).eval()
    split = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa", **split_kwargs).eval()
    layers = split.config.num_hidden_layers
    placement = {i: str(_layer_device(split, i)) for i in range(layers)}
    result: dict[str, Any] = {
        "settings": s,
        "split_device_map": {k: str(v) for k, v in split.hf_device_map.items()},
        "layer_devices": placement,
        "devices_used": sorted(set(placement.values())),
        "runs": [],
    }
    g = torch.Generator().manual_seed(7)
    vocab = split.config.vocab_size
    prompts = {1: torch.randint(1, vocab, (1, s["prompt"]), generator=g)}
    ids2 = torch.randint(1, vocab, (2, s["prompt"]), generator=g)
    mask2 = torch.ones_like(ids2)
    ids2[1, :37], mask2[1, :37] = 0, 0  # left padding in the second row
    batches = {1: (prompts[1], torch.ones_like(prompts[1])), 2: (ids2, mask2)}

    def generate(model, cache, batch):
        ids, mask = batches[batch]
        device = model.get_input_embeddings().weight.device
        if device.type == "meta":
            device = torch.device("cpu")
        _sync()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids.to(device), attention_mask=mask.to(device), **cache_kwargs(cache),
                                 max_new_tokens=s["new"], min_new_tokens=s["new"], do_sample=False)
        _sync()
        return out[:, ids.shape[1]:].cpu(), time.perf_counter() - start

    # Warm-up (kernel selection, Triton compilation) so that the first timed method is not penalised.
    for model in (single, split):
        generate(model, methods(s)[3][2](model), 1)
    tokens_by_method = {}
    for name, batch, factory in methods(s):
        run: dict[str, Any] = {"method": name, "batch": batch}
        try:
            a, run["seconds_1gpu"] = generate(single, factory(single), batch)
            tokens_by_method[name] = a
            cache = factory(split)
            b, run["seconds_split"] = generate(split, cache, batch)
            run["identical"] = bool(torch.equal(a, b))
            run["tokens"] = int(a.numel())
            run["first_difference"] = None if run["identical"] else int((a != b).flatten().nonzero()[0])
            pools = {}
            for idx, layer in enumerate(getattr(cache, "layers", [])):
                if isinstance(layer, ScopeLayer):
                    pools[idx] = str(layer.keys.device)
                    on_device = layer.keys.device == layer.values.device == _layer_device(split, idx)
                    if layer.start is not None:
                        on_device = on_device and layer.start.device == layer.keys.device
                    run.setdefault("pools_on_layer_device", True)
                    run["pools_on_layer_device"] = run["pools_on_layer_device"] and bool(on_device)
            if pools:
                run["pool_devices"] = pools
                run["kv_length"] = [cache.kv_length(i) for i in range(len(cache.layers))][:: max(1, layers // 4)]
        except Exception as exc:  # noqa: BLE001 -- record and go on with the other methods
            run["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        result["runs"].append(run)
        (out / "split.partial.json").write_text(json.dumps(result, indent=1))
        print(f"split: {name}: {run}", flush=True)
    failed = [r for r in result["runs"] if r["batch"] == 1 and (r.get("error") or not r.get("identical", True))]
    if os.environ.get("MULTI_GPU_DIAGNOSE"):  # exercise the diagnosis in a smoke run
        failed = result["runs"][3:4]
    if failed:
        # Diagnose: the same methods again with the current CUDA device set to each layer's own
        # device (fused kernels launched by Triton run on the *current* device, not the tensors').
        result["runs_with_per_layer_current_device"] = []
        handles = [layer.register_forward_pre_hook(_set_current_device(_layer_device(split, i)))
                   for i, layer in enumerate(split.model.layers)]
        by_name = {name: (batch, factory) for name, batch, factory in methods(s)}
        for r in failed:
            batch, factory = by_name[r["method"]]
            run = {"method": r["method"]}
            try:
                b, run["seconds_split"] = generate(split, factory(split), batch)
                a = tokens_by_method.get(r["method"])
                run["identical"] = None if a is None else bool(torch.equal(a, b))
            except Exception as exc:  # noqa: BLE001
                run["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            result["runs_with_per_layer_current_device"].append(run)
            print(f"split (per-layer current device): {run}", flush=True)
        for h in handles:
            h.remove()
    if "dynamic" in tokens_by_method and "scope-unbounded" in tokens_by_method:
        # Not required to be identical: on CUDA the scope decode step uses a grouped attention call
        # (another kernel than transformers' sdpa call), so bf16 rounding may differ.
        a, b = tokens_by_method["dynamic"], tokens_by_method["scope-unbounded"]
        same = (a == b).all(dim=0)
        result["unbounded_vs_dynamic_matching_prefix"] = int(same.long().cumprod(0).sum())
    return result


# -- stage: data-parallel eval ---------------------------------------------------------------------
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["TOKENIZERS_PARALLELISM"] = "false"
    # Never let NCCL, PyTorch or NVSHMEM use NVLink multicast on the shared machines (KINDS.md).
    env.setdefault("NCCL_NVLS_ENABLE", "0")
    env.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    env.setdefault("NVSHMEM_DISABLE_NVLS", "1")
    return env


def _launch(nproc: int, port: int) -> list[str]:
    """The documented launch lines (docs/multi_gpu.md)."""
    common = ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if nproc == 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", *common]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc), *common]


def _eval_args(work: pathlib.Path, s: dict[str, Any], out: pathlib.Path, limit: int, smoke: bool) -> list[str]:
    args = ["-m", "scope_kv.cli", "eval", "fidelity", "--model", str(work / "model"), "--dtype", s["dtype"],
            "--task", "gsm8k", "--limit", str(limit), "--max-prompt-tokens", str(s["eval_prompt_tokens"]),
            "--steps", str(s["eval_steps"]), "--no-progress", "--out", str(out)]
    if smoke:
        args += ["--device", "cpu"]
    for m in s["eval_methods"]:
        args += ["-m", m]
    return args


def _records(path: pathlib.Path) -> list[dict[str, Any]]:
    rows = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _compare(one: pathlib.Path, two: pathlib.Path) -> dict[str, Any]:
    a = [{k: v for k, v in r.items() if k not in TIMING} for r in _records(one / "fidelity.jsonl")]
    b = [{k: v for k, v in r.items() if k not in TIMING} for r in _records(two / "fidelity.jsonl")]
    keys_a = [(r["example"], r["method"]) for r in a]
    keys_b = [(r["example"], r["method"]) for r in b]
    kl_diff = max((abs(x.get("mean_kl", 0) - y.get("mean_kl", 0)) for x, y in zip(a, b)), default=None)
    return {"records": [len(a), len(b)], "same_keys_in_order": keys_a == keys_b, "identical": a == b,
            "max_mean_kl_difference": kl_diff,
            "same_top1": [x.get("top1") for x in a] == [y.get("top1") for y in b],
            "leftover_files": sorted(p.name for p in two.iterdir() if ".part-" in p.name or ".done-" in p.name or p.name.endswith(".lock"))}


def _timed(cmd: list[str], log: pathlib.Path, timeout: float) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, time.perf_counter() - start


def _rank_seconds(out: pathlib.Path, world: int) -> list[float]:
    """Compute seconds (sum of the records' own timings) per rank, from the round-robin split."""
    totals = [0.0] * world
    for r in _records(out / "fidelity.jsonl"):
        totals[r["index"] % world] += r.get("seconds", 0.0)
    return [round(t, 2) for t in totals]


def stage_eval(work: pathlib.Path, smoke: bool, out: pathlib.Path, deadline: float) -> dict[str, Any]:
    s = settings(smoke)
    result: dict[str, Any] = {"settings": {k: s[k] for k in ("dtype", "eval_limit", "eval_steps", "eval_prompt_tokens", "eval_methods")}}
    port = 29617
    # Warm-up: one prompt, one process (file-system caches, kernel selection, Triton's compile cache).
    code, secs = _timed([*_launch(1, port), *_eval_args(work, s, work / "eval-warmup", 1, smoke)], out / "eval_warmup.log", 300)
    result["warmup"] = {"returncode": code, "wall_seconds": round(secs, 2)}
    runs = {}
    for nproc in (1, 2):
        if time.monotonic() > deadline - 60:
            result[f"{nproc}_processes"] = {"skipped": "time budget"}
            continue
        d = work / f"eval-{nproc}"
        cmd = [*_launch(nproc, port + nproc), *_eval_args(work, s, d, s["eval_limit"], smoke)]
        code, secs = _timed(cmd, out / f"eval_{nproc}proc.log", max(30.0, deadline - time.monotonic()))
        runs[nproc] = d
        result[f"{nproc}_processes"] = {
            "command": " ".join(cmd[1:]).replace(str(work), "$WORK"),
            "returncode": code, "wall_seconds": round(secs, 2),
            "records": len(_records(d / "fidelity.jsonl")), "compute_seconds_per_rank": _rank_seconds(d, nproc),
        }
        print(f"eval: {nproc} process(es): {result[f'{nproc}_processes']}", flush=True)
        (out / "eval.partial.json").write_text(json.dumps(result, indent=1))
    if 1 in runs and 2 in runs:
        result["equality_1_vs_2"] = _compare(runs[1], runs[2])
        w1, w2 = result["1_processes"]["wall_seconds"], result["2_processes"]["wall_seconds"]
        result["speedup_wall"] = round(w1 / w2, 2) if w2 else None
    if 1 in runs and time.monotonic() < deadline - 60:
        result["resume"] = _resume_check(work, s, smoke, out, runs[1], port + 5, deadline)
    return result


def _resume_check(work, s, smoke, out, reference: pathlib.Path, port: int, deadline: float) -> dict[str, Any]:
    d = work / "eval-resume"
    cmd = [*_launch(2, port), *_eval_args(work, s, d, s["eval_limit"], smoke)]
    with (out / "eval_resume.log").open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        written: list[dict[str, Any]] = []
        try:
            while proc.poll() is None and time.monotonic() < deadline - 30:
                written = [r for p in d.glob("fidelity.part-*.jsonl") for r in _records(p)]
                if len(written) >= 4:
                    break
                time.sleep(0.05)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the launcher's own process group: it and its ranks
            proc.wait(timeout=60)
    parts = sorted(p.name for p in d.glob("fidelity.part-*.jsonl"))
    before = {(r["example"], r["method"]): r["seconds"] for p in d.glob("fidelity.part-*.jsonl") for r in _records(p)}
    merged_before_restart = (d / "fidelity.jsonl").exists()
    code, secs = _timed(cmd, out / "eval_resume.log", max(30.0, deadline - time.monotonic()))
    after = {(r["example"], r["method"]): r["seconds"] for r in _records(d / "fidelity.jsonl")}
    return {
        "records_before_kill": len(before), "part_files_at_kill": parts, "merged_before_restart": merged_before_restart,
        "restart_returncode": code, "restart_wall_seconds": round(secs, 2),
        "kept_records": sum(after.get(k) == v for k, v in before.items()),
        "equal_to_1_process": _compare(reference, d),
    }


# -- driver ----------------------------------------------------------------------------------------
def _stage(name: str, work: pathlib.Path, smoke: bool, out: pathlib.Path, budget: float) -> dict[str, Any]:
    """Run one stage in a fresh process; returns its JSON (or its error and output tail)."""
    target = work / f"{name}.json"
    cmd = [sys.executable, __file__, "--stage", name, "--work", str(work), "--out", str(out), "--budget", str(budget)]
    if smoke:
        cmd.append("--cpu-smoke")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=max(budget, 10))
    print(proc.stdout[-3000:], end="", flush=True)
    if proc.returncode != 0 or not target.exists():
        partial = out / f"{name}.partial.json"
        data = json.loads(partial.read_text()) if partial.exists() else {}
        data["error"] = f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    else:
        data = json.loads(target.read_text())
    data["stage_seconds"] = round(time.perf_counter() - start, 1)
    return data


def _environment() -> dict[str, Any]:
    import accelerate
    import torch
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "gpus": []}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def render(report: dict[str, Any]) -> str:
    lines = ["# Two GPUs: split model and data-parallel evaluation", ""]
    env = report.get("environment", {})
    lines.append(f"torch {env.get('torch')}, transformers {env.get('transformers')}, accelerate {env.get('accelerate')}, "
                 f"GPUs: {', '.join(env.get('gpus') or ['none (CPU smoke run)'])}")
    build = report.get("build", {})
    lines.append(f"model: random-weight Llama, {build.get('parameters', 0) / 1e9:.2f}B parameters, {build.get('dtype')}")
    split = report.get("split", {})
    if split:
        s = split.get("settings", {})
        lines += ["", f"## Split model: `device_map=\"auto\"` over {', '.join(split.get('devices_used', []))} vs one device",
                  "", f"prompt {s.get('prompt')} tokens, {s.get('new')} new tokens (greedy, fixed length); "
                  f"layers per device: {_count(split.get('layer_devices', {}))}", "",
                  "| method | batch | tokens identical | pools on layer's device | s (one GPU) | s (split) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in split.get("runs", []):
            if "error" in r:
                lines.append(f"| {r['method']} | {r['batch']} | ERROR: {r['error'][:120]} | | | |")
                continue
            lines.append(f"| {r['method']} | {r['batch']} | {'yes' if r['identical'] else 'NO (first at ' + str(r['first_difference']) + ')'} "
                         f"| {_yn(r.get('pools_on_layer_device'))} | {r['seconds_1gpu']:.2f} | {r['seconds_split']:.2f} |")
        for r in split.get("runs_with_per_layer_current_device", []):
            lines.append(f"\nrerun with `torch.cuda.set_device(<layer's device>)` before each layer: {r['method']}: "
                         + (f"ERROR {r['error'][:200]}" if "error" in r else f"identical to one GPU: {_yn(r['identical'])}"))
        if "unbounded_vs_dynamic_matching_prefix" in split:
            lines.append(f"\nScopeCache without a budget vs DynamicCache (same placement): first "
                         f"{split['unbounded_vs_dynamic_matching_prefix']} of {s.get('new')} tokens identical.")
        if "error" in split:
            lines.append(f"\nstage error: {split['error'][-500:]}")
    ev = report.get("eval", {})
    if ev:
        s = ev.get("settings", {})
        lines += ["", "## Data-parallel `scope-kv eval fidelity` (accelerate launch)", "",
                  f"{s.get('eval_limit')} GSM8K prompts (<= {s.get('eval_prompt_tokens')} tokens), {s.get('eval_steps')} "
                  f"replayed tokens, methods {', '.join(s.get('eval_methods', []))}, {s.get('dtype')}; wall time = "
                  "whole command (process start, model load, run, merge)", "",
                  "| processes | wall s | compute s per rank | records | exit |", "| --- | --- | --- | --- | --- |"]
        for n in (1, 2):
            r = ev.get(f"{n}_processes", {})
            if "wall_seconds" in r:
                lines.append(f"| {n} | {r['wall_seconds']:.1f} | {r['compute_seconds_per_rank']} | {r['records']} | {r['returncode']} |")
        if "speedup_wall" in ev:
            eq = ev["equality_1_vs_2"]
            lines.append(f"\nspeed-up (wall): {ev['speedup_wall']}x; merged files equal to the one-process run's "
                         f"(timings excluded): {_yn(eq['identical'])} (same records in order: {_yn(eq['same_keys_in_order'])}, "
                         f"max |mean KL difference| {eq['max_mean_kl_difference']}, leftover part files: {eq['leftover_files'] or 'none'})")
        if "resume" in ev:
            r = ev["resume"]
            lines.append(f"\nresume: killed after {r['records_before_kill']} records ({', '.join(r['part_files_at_kill'])}); "
                         f"restart exit {r['restart_returncode']} in {r['restart_wall_seconds']} s; records kept from before the kill: "
                         f"{r['kept_records']}/{r['records_before_kill']}; final files equal to the one-process run's: "
                         f"{_yn(r['equal_to_1_process']['identical'])}")
        if "error" in ev:
            lines.append(f"\nstage error: {ev['error'][-500:]}")
    return "\n".join(lines) + "\n"


def _yn(flag: Any) -> str:
    return "n/a" if flag is None else ("yes" if flag else "NO")


def _count(placement: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for device in placement.values():
        counts[device] = counts.get(device, 0) + 1
    return ", ".join(f"{d}: {n}" for d, n in sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=pathlib.Path, required=True, help="where multi_gpu.json / .md and the logs go")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (disk offload stands in for GPU 1)")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run; late stages are skipped")
    p.add_argument("--skip-eval", action="store_true")
    p.add_argument("--stage", choices=["build", "split", "eval"], help=argparse.SUPPRESS)
    p.add_argument("--work", type=pathlib.Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.stage:
        deadline = time.monotonic() + a.budget
        if a.stage == "build":
            data = stage_build(a.work, a.cpu_smoke)
        elif a.stage == "split":
            data = stage_split(a.work, a.cpu_smoke, a.out)
        else:
            data = stage_eval(a.work, a.cpu_smoke, a.out, deadline)
        (a.work / f"{a.stage}.json").write_text(json.dumps(data, indent=1))
        return 0

    start = time.monotonic()
    report: dict[str, Any] = {"environment": _environment(), "smoke": a.cpu_smoke}
    with tempfile.TemporaryDirectory(prefix="multi_gpu_") as tmp:
        work = pathlib.Path(tmp)
        gpus = len(report["environment"]["gpus"])
        stages = ["build", "split"] + ([] if a.skip_eval or (gpus < 2 and not a.cpu_smoke) else ["eval"])
        for name in stages:
            left = a.budget - (time.monotonic() - start)
            if left < 30:
                report[name] = {"skipped": "time budget"}
                continue
            report[name] = _stage(name, work, a.cpu_smoke, a.out, left)
            (a.out / "multi_gpu.json").write_text(json.dumps(report, indent=1))
            if name == "build" and "error" in report[name]:
                break
    for partial in a.out.glob("*.partial.json"):
        partial.unlink()
    report["total_seconds"] = round(time.monotonic() - start, 1)
    (a.out / "multi_gpu.json").write_text(json.dumps(report, indent=1))
    text = render(report)
    (a.out / "multi_gpu.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
