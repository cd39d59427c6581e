"""Decode-step benchmark: transformers' stock caches against ScopeCache (and friends).

Run on a GPU (Llama-3.1-8B geometry, random bf16 weights made on the device, sdpa)::

    python benchmarks/decode.py --out benchmarks/results/decode_gpu
    python benchmarks/decode.py --smoke --out /tmp/decode_smoke      # tiny model, CPU, seconds
    python benchmarks/decode.py --report a.json [b.json ...]          # re-render md/png from JSON

What is measured, exactly (benchmarks/NOTES.md has the reasoning):

* The decode loop is driven directly -- one ``model(input_ids, position_ids, past_key_values)``
  forward per token, greedy ``argmax`` fed back on the device, no ``generate``, no attention
  mask (no padding), no host sync inside the timed window -- identically for every method.
* Generating 8192 tokens per configuration does not fit the device's 10-minute command limit,
  so each configuration is *sampled*: the cache is put directly into the state it has after
  ``L`` generated tokens (random bf16 K/V of the right shapes; prompt ``P`` = 4096) and
  ``warmup`` + ``steps`` decode steps are then run and timed with CUDA events. ``L`` runs
  over a few generated lengths, so growth with length shows.
* ``tokens/s`` for a workload ``P -> N`` is ``batch * N / T`` with ``T`` the trapezoid
  integral over ``L in [0, N]`` of the measured mean step time (prefill excluded).
* ``roofline`` = measured step time / ((weights read per step + KV held at that step) /
  bandwidth), the bandwidth being a device-to-device copy measured in the same run
  (bytes read + written). "KV held" is what the method keeps for the step (its logical
  entries); a StaticCache also reads its empty tail, which is why its ratio is high.
* Methods whose behaviour depends on the planned output length (StaticCache's buffer,
  Adaptive/Discontinuous schedules) are run once per workload; the others once, over
  ``L`` up to the longest workload, and both workloads are read off the same curve.
* ``snapkv2048+slide`` is decode-equivalent: a ScopeCache whose prefill pool holds 2048
  entries (what SnapKV(2048) leaves) under Slide. Which 2048 entries were kept does not
  change the cost of a decode step; the one-time compression is prefill work.
* ``slide-noselect`` holds exactly what Slide holds (prompt + B) but never selects: Slide's
  step time over it is the per-step cost of selection.
* ``*+graph`` methods capture one decode step in a CUDA graph and replay it (StaticCache and
  Slide in its steady state, whose shapes are static; ``slide-noselect+graph`` replays one
  step of a fixed length); ``static+compile`` is ``torch.compile(mode="reduce-overhead")``.
* ``*-ref`` methods run ScopeCache's reference (plain-torch, pre-fast-path) decode step
  (``layer.fast_decode = False``); the others take the fast path on CUDA (scope_kv.kernels).
* ``slide-perlayer`` is Slide with one evict-one launch per layer (``batch_evictions=False``);
  ``slide`` queues the layers' evictions and runs them in one launch per step (kernels.EvictionBatch).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import transformers
from transformers import DynamicCache, StaticCache

from bench_common import (LLAMA_8B, TINY, Stepper, build_model, fmt, kv_bytes_per_token, measure_bandwidth, median,
                          random_kv, time_steps, weight_bytes_read, write_outputs)
from scope_kv import Adaptive, Discontinuous, ScopeCache, Slide
from scope_kv.attention import disable_scope_attention
from scope_kv.testing import load_state


# A StaticCache sized for P + N must still take the warm-up and timed steps sampled at L = N.
STATIC_MARGIN = 64


@dataclasses.dataclass(frozen=True)
class Settings:
    """One benchmark run's sizes."""

    prompt: int
    workloads: tuple[int, ...]  # planned output lengths N
    lengths: tuple[int, ...]  # generated lengths L at which steps are timed (<= max workload)
    budget: int
    recent: int
    snap_budget: int
    warmup: int
    steps: int
    batches: tuple[int, ...]
    find_max_batch: bool
    reserve_gib: float  # memory kept free for activations/workspace when sizing the largest batch


@dataclasses.dataclass(frozen=True)
class Method:
    """A cache configuration under test.

    ``kind``: "dynamic", "static" or "scope"; ``mode``: "eager", "graph" or "compile";
    ``decoding(N)`` builds the ScopeCache strategy for a planned output length ``N``;
    ``prefill_kept`` is the prefill pool size (None: the whole prompt); ``hold_budget``
    makes a ScopeCache without selection hold as much as Slide would (slide-noselect).
    """

    name: str
    kind: str
    mode: str = "eager"
    decoding: Callable[[int, "Settings"], Any] | None = None
    prefill_kept: int | None = None
    per_workload: bool = False
    hold_budget: bool = False
    fast: bool | None = None  # ScopeLayer.fast_decode: None = auto (on for CUDA), False = reference path
    batched: bool | None = None  # ScopeLayer.batch_evictions: None = auto (one launch per step on CUDA)


def _slide(n: int, s: Settings) -> Slide:
    return Slide(s.budget, s.recent)


def _adaptive(n: int, s: Settings) -> Adaptive:
    return Adaptive(s.budget, s.recent, max_new_tokens=n)


def _discontinuous(n: int, s: Settings) -> Discontinuous:
    return Discontinuous(s.budget, s.recent, max_new_tokens=n)


def all_methods(s: Settings) -> dict[str, Method]:
    methods = [
        Method("dynamic", "dynamic"),
        Method("static", "static", per_workload=True),
        Method("static+graph", "static", mode="graph", per_workload=True),
        Method("static+compile", "static", mode="compile", per_workload=True),
        Method("scope-full", "scope"),
        Method("scope-full-ref", "scope", fast=False),
        Method("slide-noselect", "scope", hold_budget=True),
        Method("slide-noselect+graph", "scope", mode="graph", hold_budget=True),
        Method("slide", "scope", decoding=_slide),
        Method("slide-ref", "scope", decoding=_slide, fast=False),
        Method("slide-perlayer", "scope", decoding=_slide, batched=False),
        Method("slide+graph", "scope", mode="graph", decoding=_slide),
        Method("adaptive", "scope", decoding=_adaptive, per_workload=True),
        Method("discontinuous", "scope", decoding=_discontinuous, per_workload=True),
        Method(f"snapkv{s.snap_budget}+slide", "scope", decoding=_slide, prefill_kept=s.snap_budget),
    ]
    return {m.name: m for m in methods}


# -- cache states -------------------------------------------------------------------------
def scope_schedule(decoding: Any, generated: int) -> tuple[int, int]:
    """Decoding-pool size and discontinuous skip counter after ``generated`` decode steps
    (replays the strategy's own ``plan``; docs/method.md §3)."""
    held, skipped = 0, 0
    if decoding is None:
        return generated, 0
    for t in range(generated):
        held += 1
        select, skipped = decoding.plan(held, t, skipped)
        if select:
            held = min(held, decoding.budget_at(t))
    return held, skipped


def fill_cache(model, method: Method, s: Settings, batch: int, workload: int, generated: int):
    """A cache in the state it has after the prompt and ``generated`` decode steps, filled with
    random K/V (never zeros, which can time faster than real data). Returns ``(cache, held_entries_per_row)``."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    heads = c.num_key_value_heads
    ref = next(model.parameters())
    prompt = s.prompt
    if method.kind in ("dynamic", "static"):
        disable_scope_attention(model)  # transformers' caches on the stock attention
    if method.kind == "dynamic":
        cache = DynamicCache(config=c)
        for i in range(c.num_hidden_layers):
            shape = (batch, heads, prompt + generated, head_dim)
            cache.update(random_kv(shape, ref), random_kv(shape, ref), i)
        return cache, prompt + generated
    if method.kind == "static":
        cache = StaticCache(config=c, max_cache_len=prompt + workload + STATIC_MARGIN)
        for i in range(c.num_hidden_layers):
            shape = (batch, heads, prompt + generated, head_dim)
            cache.update(random_kv(shape, ref), random_kv(shape, ref), i)
        return cache, prompt + generated
    decoding = method.decoding(workload, s) if method.decoding else None
    cache = ScopeCache(model, decoding=decoding)
    kept = method.prefill_kept or prompt
    if method.hold_budget:
        held, skipped = min(generated, s.budget), 0
    else:
        held, skipped = scope_schedule(decoding, generated)
    for layer in cache.layers:
        layer.fast_decode = method.fast
        layer.batch_evictions = method.batched
        # The state `generated` decode steps leave (running them per sample would not fit the
        # device's time limit), through the layer's public load_state.
        shape = (batch, heads, kept + held, head_dim)
        load_state(layer, random_kv(shape, ref), random_kv(shape, ref), prefill_length=kept,
                         seen=prompt + generated, step=generated, skipped=skipped)
    return cache, kept + held


def cache_kv_bytes(cache) -> int:
    """K/V bytes allocated by the cache (what it costs in memory)."""
    if isinstance(cache, ScopeCache):
        return cache.nbytes()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# -- timing -------------------------------------------------------------------------------
def steps_for(method: Method, s: Settings, workload: int) -> int:
    """Discontinuous selects once every delta+1 eligible steps: time at least one whole cycle."""
    if method.decoding is _discontinuous:
        return max(s.steps, _discontinuous(workload, s).delta + 1)
    if method.mode == "graph":
        return max(s.steps, 30)  # replays are cheap and steady: more of them
    return s.steps


def measure_point(model, method: Method, s: Settings, batch: int, workload: int, generated: int,
                  bandwidth: float, compiled: dict) -> dict[str, Any]:
    device = next(model.parameters()).device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    row: dict[str, Any] = dict(method=method.name, mode=method.mode, batch=batch, workload=workload,
                               generated=generated, per_workload=method.per_workload)
    cache, held = fill_cache(model, method, s, batch, workload, generated)
    fn = None
    if method.mode == "compile":
        key = (batch, workload)
        if key not in compiled:
            compiled.clear()
            torch._dynamo.reset()
            compiled[key] = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        fn = compiled[key]
    stepper = Stepper(model, cache, batch, s.prompt + generated, method.mode, fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n_steps = steps_for(method, s, workload)
    warmup = s.warmup + (3 if method.mode == "compile" else 0)
    if method.mode == "graph":
        stepper.capture()
    times = time_steps(stepper, warmup, n_steps, device)
    per, total = times["per"], times["total"]
    per_token = kv_bytes_per_token(model)
    row.update(
        steps=n_steps,
        ms_median=median(per),
        ms_mean=total / n_steps,
        ms_min=min(per),
        ms_max=max(per),
        host_ms_mean=times["host"] / n_steps,  # close to ms_mean: the step waits on the host
        held_entries=held,  # per row and KV head, before the timed steps (for Scope: prefill + decoding pool)
        kv_bytes_held=batch * (held + 1) * per_token,  # what the step attends over, new token included
        kv_bytes_allocated=cache_kv_bytes(cache),
        peak_allocated=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        selections=sum(getattr(l, "selections", 0) for l in getattr(cache, "layers", [])),
    )
    if math.isfinite(bandwidth):
        roof_ms = (weight_bytes_read(model) + row["kv_bytes_held"]) / bandwidth * 1e3
        row["roofline_ms"] = roof_ms
        row["roofline_ratio"] = row["ms_mean"] / roof_ms
    del stepper, cache
    return row


# -- batches ------------------------------------------------------------------------------
def peak_entries(method: Method, s: Settings, workload: int) -> float:
    """Most K/V entries per row (and KV head) the method holds during a ``P -> workload`` run."""
    p, n = s.prompt, workload
    if method.kind == "dynamic":
        return p + n + (p + n) / 32  # torch.cat: one layer's old and new copies coexist
    if method.kind == "static":
        return p + n + STATIC_MARGIN
    if method.decoding is None and not method.hold_budget:
        return 1.5 * (p + n) + (p + n) / 32  # growth factor 1.5, one layer's copy in flight
    kept = method.prefill_kept or p
    if method.hold_budget:
        return kept + s.budget + 1
    return kept + method.decoding(n, s).max_held


def max_batch_estimate(model, method: Method, s: Settings, workload: int) -> int:
    gc.collect()
    torch.cuda.empty_cache()
    free = torch.cuda.mem_get_info()[0]
    budget = free - s.reserve_gib * 2**30
    per_row = peak_entries(method, s, workload) * kv_bytes_per_token(model)
    per_row += model.config.vocab_size * 4 * 3  # logits (bf16), argmax temporaries
    return max(1, int(budget // per_row))


# -- driver -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        s = Settings(prompt=64, workloads=(32, 64), lengths=(0, 32, 64), budget=16, recent=8, snap_budget=32,
                     warmup=1, steps=3, batches=(1, 2), find_max_batch=False, reserve_gib=0)
        dtype = torch.float32
        geometry = TINY
    else:
        s = Settings(prompt=args.prompt, workloads=tuple(args.workloads), lengths=tuple(args.lengths),
                     budget=args.budget, recent=args.recent, snap_budget=args.snap_budget, warmup=args.warmup,
                     steps=args.steps, batches=tuple(args.batches), find_max_batch=args.max_batch,
                     reserve_gib=args.reserve_gib)
        dtype = torch.bfloat16
        geometry = LLAMA_8B
    methods = all_methods(s)
    chosen = [methods[m] for m in (args.methods or methods)]
    if smoke:
        chosen = [m for m in chosen if m.mode == "eager"]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(geometry, device, dtype)
    bandwidth = measure_bandwidth(device)
    result: dict[str, Any] = dict(
        settings=dataclasses.asdict(s),
        env=dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                 device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 smoke=smoke, command=" ".join(sys.argv)),
        bandwidth_bytes_per_s=bandwidth,
        weight_bytes_read=weight_bytes_read(model),
        kv_bytes_per_token=kv_bytes_per_token(model),
        points=[],
        skipped=[],
        errors=[],
    )
    partial = args.out.with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    _log(f"model ready in {time.perf_counter() - t0:.1f}s; bandwidth {bandwidth / 1e12:.2f} TB/s")
    compiled: dict = {}
    deadline = t0 + args.time_budget_s
    # Repeats run every method again, in turn (not back to back), so a slow phase of the host
    # lands on all methods alike; summaries take each sample's fastest repeat.
    for method, repeat in [(m, r) for r in range(args.repeats) for m in chosen]:
        workloads = s.workloads if method.per_workload else (max(s.workloads),)
        for workload in workloads:
            batches = list(s.batches)
            if s.find_max_batch and device.type == "cuda":
                batches.append(-1)  # the largest batch, found below
            for batch in batches:
                lengths = [L for L in s.lengths if L <= workload]
                if method.mode == "graph" and method.kind == "scope":
                    # Slide's steady state (static shapes). slide-noselect+graph replays one step of a
                    # fixed length (its pool would grow): the cost of a step of that shape.
                    lengths = [L for L in lengths if L > s.budget]
                if method.mode == "compile":
                    # One compile per (batch, workload): a new cache object would recompile, and a
                    # StaticCache step reads its whole buffer, so its cost does not depend on L.
                    lengths = lengths[len(lengths) // 2 : len(lengths) // 2 + 1]
                tag = "max" if batch == -1 else batch
                if batch == -1:
                    batch = max_batch_estimate(model, method, s, workload)
                    # The guarded trial: the longest length first, shrinking the batch on OOM.
                    lengths = sorted(lengths, reverse=True)
                for i, generated in enumerate(lengths):
                    if time.perf_counter() > deadline:
                        result["skipped"].append(dict(method=method.name, batch=tag, workload=workload,
                                                      generated=generated, why="time budget"))
                        continue
                    row = None
                    for attempt in range(4):
                        try:
                            row = measure_point(model, method, s, batch, workload, generated, bandwidth, compiled)
                            break
                        except torch.OutOfMemoryError:
                            if tag != "max" or i > 0:
                                result["errors"].append(dict(method=method.name, batch=batch, generated=generated,
                                                             error="out of memory"))
                                break
                            _log(f"{method.name} batch {batch}: out of memory, retrying smaller")
                            batch = int(batch * 0.9)
                        except Exception as exc:  # recorded, and the other methods still run
                            if "CUDA error" in str(exc):
                                raise
                            _log(f"{method.name} b={batch} L={generated}: {type(exc).__name__}: {exc}")
                            result["errors"].append(dict(method=method.name, batch=batch, generated=generated,
                                                         error=f"{type(exc).__name__}: {exc}"[:500]))
                            break
                    if row is None:
                        continue
                    row["batch_tag"] = tag
                    row["repeat"] = repeat
                    result["points"].append(row)
                    partial.write_text(json.dumps(result, default=str))  # survives a crash or a kill
                    _log(f"{method.name:>22} N={workload:5d} b={batch:4d} ({tag}) L={generated:5d}: "
                         f"{row['ms_mean']:8.2f} ms/step (median {row['ms_median']:.2f})"
                         + (f" x{row['roofline_ratio']:.2f} roofline" if "roofline_ratio" in row else ""))
    result["summary"] = summarise(result)
    result["targets"] = targets(result)
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def _log(msg: str) -> None:
    print(msg, flush=True)


# -- summaries ----------------------------------------------------------------------------
def _curve(points: list[dict], method: str, tag: Any, workload: int) -> list[dict]:
    """Samples of one (method, batch) for one workload: its own run for per-workload methods,
    else the shared curve cut at ``workload``."""
    rows = [p for p in points if p["method"] == method and p["batch_tag"] == tag and p["generated"] <= workload
            and (p["workload"] == workload or not p["per_workload"])]
    best: dict[int, dict] = {}  # repeats of one sample: the fastest (noise only ever adds time)
    for p in rows:
        if p["generated"] not in best or p["ms_mean"] < best[p["generated"]]["ms_mean"]:
            best[p["generated"]] = p
    return sorted(best.values(), key=lambda p: p["generated"])


def throughput(rows: list[dict], workload: int) -> float | None:
    """tokens/s over a P -> workload decode, integrating the sampled mean step times (trapezoid;
    held flat before the first sample, which for captured Slide is its steady state)."""
    pts = [(p["generated"], p["ms_mean"]) for p in rows if p["generated"] <= workload]
    if not pts:
        return None
    if pts[0][0] > 0:
        pts.insert(0, (0, pts[0][1]))
    if pts[-1][0] < workload:
        return None  # never extrapolate forward: the cache grows (or ran out of memory) there
    total_ms = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(pts, pts[1:]))
    batch = rows[0]["batch"]
    return batch * workload / (total_ms / 1e3) if total_ms > 0 else None


def summarise(result: dict) -> list[dict]:
    points = result["points"]
    out = []
    keys = sorted({(p["method"], p["batch_tag"]) for p in points}, key=lambda k: (k[0], str(k[1])))
    for method, tag in keys:
        for workload in result["settings"]["workloads"]:
            rows = _curve(points, method, tag, workload)
            if not rows:
                continue
            last = rows[-1]
            out.append(dict(
                method=method, batch_tag=tag, batch=rows[0]["batch"], workload=workload,
                tokens_per_s=throughput(rows, workload),
                ms_by_generated={r["generated"]: round(r["ms_mean"], 3) for r in rows},
                ms_median_by_generated={r["generated"]: round(r["ms_median"], 3) for r in rows},
                roofline_by_generated={r["generated"]: round(r.get("roofline_ratio", float("nan")), 3) for r in rows},
                peak_allocated=max((r["peak_allocated"] or 0) for r in rows) or None,
                kv_bytes_allocated_max=max(r["kv_bytes_allocated"] for r in rows),
                kv_bytes_held_last=last["kv_bytes_held"],
            ))
    return out


def _find(summary: list[dict], method: str, tag: Any, workload: int) -> dict | None:
    for row in summary:
        if row["method"] == method and row["batch_tag"] == tag and row["workload"] == workload:
            return row
    return None


def targets(result: dict) -> list[dict]:
    """The performance targets, computed from this run's own numbers (ratios within one run)."""
    s = result["settings"]
    summary = result["summary"]
    n_max = max(s["workloads"])
    out: list[dict] = []

    def add(name, value, goal, ok, detail):
        out.append(dict(target=name, value=value, goal=goal, met=ok, detail=detail))

    dyn = _find(summary, "dynamic", "max", n_max)
    for name in ("slide", "slide+graph"):
        sl = _find(summary, name, "max", n_max)
        if dyn and sl and dyn["tokens_per_s"] and sl["tokens_per_s"]:
            r = sl["tokens_per_s"] / dyn["tokens_per_s"]
            add(f"{name} vs dynamic (eager) tokens/s, own largest batch, P->{n_max}", r, ">= 3", r >= 3,
                f"{name} b={sl['batch']} {sl['tokens_per_s']:.0f} tok/s; dynamic b={dyn['batch']} "
                f"{dyn['tokens_per_s']:.0f} tok/s")
    for tag in list(s["batches"]) + ["max"]:
        for suffix in ("", "+graph"):
            a = _find(summary, "slide" + suffix, tag, n_max)
            b = _find(summary, "slide-noselect" + suffix, tag, n_max)
            if not (a and b and a["batch"] == b["batch"]):
                continue
            common = sorted(set(a["ms_median_by_generated"]) & set(b["ms_median_by_generated"]), key=int)
            common = [k for k in common if int(k) > s["budget"]]
            if common:
                ta = sum(a["ms_median_by_generated"][k] for k in common)
                tb = sum(b["ms_median_by_generated"][k] for k in common)
                r = ta / tb - 1
                add(f"selection cost per step ({'graph' if suffix else 'eager'}), batch {tag}", r, "<= 0.05",
                    r <= 0.05, f"median step, summed over L={common}: slide{suffix} {ta:.2f} ms vs same KV "
                    f"without selection {tb:.2f} ms")
    for tag in s["batches"]:
        a, b = _find(summary, "scope-full", tag, n_max), _find(summary, "static", tag, n_max)
        c = _find(summary, "dynamic", tag, n_max)
        if a and b:
            common = sorted(set(a["ms_by_generated"]) & set(b["ms_by_generated"]), key=int)
            if common:
                ra = sum(a["ms_by_generated"][k] for k in common) / sum(b["ms_by_generated"][k] for k in common)
                detail = f"mean over L={common}"
                if c:
                    rc = sum(c["ms_by_generated"][k] for k in common if k in c["ms_by_generated"]) / sum(
                        a["ms_by_generated"][k] for k in common if k in c["ms_by_generated"])
                    detail += f"; dynamic / scope-full = {rc:.2f}"
                add(f"eager scope-full / static step time, batch {tag}", ra, "<= 1", ra <= 1, detail)
    g = _find(summary, "slide+graph", 32, n_max)
    if g:
        worst = max(g["roofline_by_generated"].values())
        add("slide+graph roofline ratio, batch 32", worst, "<= 1.5", worst <= 1.5,
            f"by generated length: {g['roofline_by_generated']}")
    for row in summary:
        if row["method"] == "slide+graph" and row["workload"] == n_max:
            ms = row["ms_median_by_generated"]
            ks = sorted(ms, key=int)
            if len(ks) >= 2:
                r = ms[ks[-1]] / ms[ks[0]]
                add(f"slide+graph step time flatness L={ks[-1]} / L={ks[0]}, batch {row['batch_tag']}", r,
                    "~1 (<= 1.05)", r <= 1.05, f"median ms by L: {ms}")
        if row["method"] == "slide" and row["workload"] == n_max:
            ideal = (s["prompt"] + s["budget"]) * result["kv_bytes_per_token"] * row["batch"]
            r = row["kv_bytes_allocated_max"] / ideal
            add(f"slide peak KV bytes / ((P+B) x bytes/token x batch), batch {row['batch_tag']}", r, "<= 1.05",
                r <= 1.05, f"{row['kv_bytes_allocated_max'] / 2**30:.2f} GiB")
            ms = row["ms_median_by_generated"]
            ks = sorted(ms, key=int)
            steady = [k for k in ks if int(k) > s["budget"]]
            if len(steady) >= 2:
                r = ms[steady[-1]] / ms[steady[0]]
                add(f"slide (eager) step time flatness L={steady[-1]} / L={steady[0]}, batch {row['batch_tag']}", r,
                    "~1 (<= 1.05)", r <= 1.05, f"median ms by L: {ms}")
    return out


# -- output -------------------------------------------------------------------------------
def markdown(result: dict) -> str:
    env = result["env"]
    s = result["settings"]
    lines = [
        f"# Decode benchmark ({env['device']}, torch {env['torch']}, transformers {env['transformers']})",
        "",
        f"Prompt {s['prompt']}; workloads {s['workloads']}; budget {s['budget']}, recent {s['recent']}; "
        f"{s['warmup']} warm-up + {s['steps']} timed steps per sample; bandwidth "
        f"{fmt(result['bandwidth_bytes_per_s'] / 1e12, '.2f')} TB/s (copy, read+write); weights read per step "
        f"{result['weight_bytes_read'] / 1e9:.2f} GB; command `{env['command']}`.",
        "",
        "| method | batch | P->N | tokens/s | ms/step by generated length (mean) | x roofline (by L) | peak alloc GiB | KV alloc GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["summary"]:
        ms = ", ".join(f"{k}: {v:.1f}" for k, v in sorted(row["ms_by_generated"].items(), key=lambda kv: int(kv[0])))
        roof = ", ".join(f"{v:.1f}" for k, v in sorted(row["roofline_by_generated"].items(), key=lambda kv: int(kv[0])))
        peak = row["peak_allocated"] / 2**30 if row["peak_allocated"] else None
        lines.append(
            f"| {row['method']} | {row['batch']}{' (max)' if row['batch_tag'] == 'max' else ''} | "
            f"{s['prompt']}->{row['workload']} | {fmt(row['tokens_per_s'])} | {ms} | {roof} | {fmt(peak, '.1f')} | "
            f"{row['kv_bytes_allocated_max'] / 2**30:.2f} |"
        )
    lines += ["", "## Targets (from this run)", "", "| target | value | goal | met | detail |", "| --- | --- | --- | --- | --- |"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.3f} | {t['goal']} | {'yes' if t['met'] else 'NO'} | {t['detail']} |")
    for e in result.get("errors", []):
        lines.append(f"\nError: {e['method']} batch {e['batch']} L={e['generated']}: {e['error']}")
    if result["skipped"]:
        lines += ["", f"Skipped for time: {len(result['skipped'])} samples."]
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    n_max = max(result["settings"]["workloads"])
    tags = [t for t in result["settings"]["batches"] if t != 1][-1:] + ["max"]
    fig, axes = plt.subplots(1, len(tags) + 1, figsize=(6 * (len(tags) + 1), 4.5))
    for ax, tag in zip(axes, tags):
        for row in result["summary"]:
            if row["batch_tag"] == tag and row["workload"] == n_max:
                ks = sorted(row["ms_by_generated"], key=int)
                ax.plot([int(k) for k in ks], [row["ms_by_generated"][k] for k in ks], marker="o",
                        label=f"{row['method']} (b={row['batch']})")
        ax.set_xlabel("generated tokens L")
        ax.set_ylabel("ms per decode step")
        ax.set_title(f"batch {tag}, P={result['settings']['prompt']}")
        ax.legend(fontsize=7)
    ax = axes[-1]
    rows = [r for r in result["summary"] if r["batch_tag"] == "max" and r["workload"] == n_max and r["tokens_per_s"]]
    ax.barh([f"{r['method']} (b={r['batch']})" for r in rows], [r["tokens_per_s"] for r in rows])
    ax.set_xlabel(f"tokens/s, P->{n_max}, own largest batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU (tests, no GPU needed)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decode"), help="output path stem")
    ap.add_argument("--report", nargs="*", type=Path, help="re-render .md/.png from these JSON files")
    ap.add_argument("--methods", nargs="*")
    ap.add_argument("--batches", nargs="*", type=int, default=[1, 8, 32])
    ap.add_argument("--max-batch", action="store_true", help="also find and run each method's largest batch")
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--workloads", nargs="*", type=int, default=[4096, 8192])
    ap.add_argument("--lengths", nargs="*", type=int, default=[0, 2048, 4096, 8192])
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--recent", type=int, default=256)
    ap.add_argument("--snap-budget", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--reserve-gib", type=float, default=4.0)
    ap.add_argument("--repeats", type=int, default=1, help="run every method this many times, in turn")
    ap.add_argument("--time-budget-s", type=float, default=520.0, help="stop sampling after this long")
    args = ap.parse_args(argv)
    if args.report:
        for path in args.report:
            result = json.loads(path.read_text())
            result["summary"] = summarise(result)
            result["targets"] = targets(result)
            write_outputs(result, path.with_suffix(""), markdown, plot)
        return 0
    with torch.inference_mode():
        result = run(args)
    write_outputs(result, args.out, markdown, plot)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
