"""kvpress ``DecodingPress`` decode steps at the KV memory of ScopeCache's ``Slide``.

kvpress 0.5.5 pins ``transformers<5.3`` while scope_kv needs ``>=5.17``, so this script runs in
kvpress's own environment (it imports neither scope_kv nor anything of the newer API) and
``decode.py`` runs Slide in the package's environment, both within one device call; ``--compare``
then reads decode.py's JSON and puts the two side by side::

    python benchmarks/decode.py --out R/decode_eq --batches 8 32 96 --workloads 4096 \\
        --lengths 512 2048 4096 --methods dynamic slide slide+graph
    PYTHONPATH=<kvpress env> python benchmarks/decode_kvpress.py --out R/kvpress_eq \\
        --batches 8 32 96 --compare R/decode_eq.json
    python benchmarks/decode_kvpress.py --smoke --import-mode modules --out /tmp/kv   # CPU, tiny

What is equal, and what is timed (benchmarks/NOTES.md has the reasoning):

* ``DecodingPress`` keeps a DynamicCache and, every ``compression_interval`` (I) decode steps,
  cuts the whole cache back to ``target_size`` (T) with a scorer press; between cuts it grows
  by one entry per step. Its peak is ``T + I`` entries per row and KV head. ``Slide(B, r)``
  over a prompt of P holds ``P + B`` (plus the step's own entry before it evicts one). So
  ``T = P + B - I``: both peak at the same KV bytes.
* Its steady state repeats every I steps, so each point starts from a cache of T entries (as
  right after a cut, random bf16 K/V) and times whole intervals: one cut per layer per
  interval, the mean step time is the amortised cost. Steps are driven exactly like
  decode.py (one forward per token, argmax fed back on the device, CUDA events per step,
  no ``generate``), under ``with press(model):``.
* ``dynamic`` rows (a DynamicCache of ``P + B`` entries) are the bridge between the two
  transformers versions: the same cache at the same size in both processes, so the ratio
  can also be read with each side normalised by its own version's stock step.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import DynamicCache

from bench_common import LLAMA_8B, TINY, Stepper, build_model, fmt, kv_bytes_per_token, measure_bandwidth, median, \
    random_kv, time_steps, weight_bytes_read, write_outputs


# -- kvpress ------------------------------------------------------------------------------
def load_kvpress(mode: str) -> dict[str, Any]:
    """``DecodingPress`` and the scorer presses.

    ``package``: ``import kvpress`` as a user would (its ``__init__`` imports every press and
    patches transformers' attention functions; needs its whole environment). ``modules``: the
    press modules alone from the installed files, with a bare package object (for the CPU smoke
    test, where kvpress is installed without its dependencies).
    """
    if mode == "package":
        import kvpress

        return dict(DecodingPress=kvpress.DecodingPress, knorm=kvpress.KnormPress, snapkv=kvpress.SnapKVPress)
    if "kvpress" not in sys.modules:
        spec = importlib.util.find_spec("kvpress")
        if spec is None:
            raise SystemExit("kvpress is not installed: pip install kvpress (or --no-deps kvpress for --import-mode modules)")
        package = types.ModuleType("kvpress")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["kvpress"] = package

    def mod(name: str) -> types.ModuleType:
        return importlib.import_module(f"kvpress.presses.{name}")

    return dict(DecodingPress=mod("decoding_press").DecodingPress, knorm=mod("knorm_press").KnormPress,
                snapkv=mod("snapkv_press").SnapKVPress)


@dataclasses.dataclass(frozen=True)
class Config:
    scorer: str | None  # None: the DynamicCache bridge row
    interval: int = 0
    target: int = 0

    @property
    def name(self) -> str:
        if self.scorer is None:
            return "dynamic"
        return f"kvpress-{self.scorer}-i{self.interval}"


def make_press(kv: dict[str, Any], cfg: Config, smoke: bool):
    if cfg.scorer == "snapkv":
        # SnapKV scores from the last window of queries, rebuilt from the buffered hidden states.
        scorer = kv["snapkv"](window_size=2 if smoke else 64)
    else:
        scorer = kv[cfg.scorer]()
    return kv["DecodingPress"](base_press=scorer, compression_interval=cfg.interval, target_size=cfg.target)


def filled_cache(model, batch: int, entries: int) -> DynamicCache:
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ref = next(model.parameters())
    cache = DynamicCache(config=c)
    for i in range(c.num_hidden_layers):
        shape = (batch, c.num_key_value_heads, entries, head_dim)
        cache.update(random_kv(shape, ref), random_kv(shape, ref), i)
    return cache


def entries_recorder(cache: DynamicCache, into: list[int]):
    """Records layer 0's held entries after each step (a shape: no device sync)."""
    layer = cache.layers[0]
    return lambda: into.append(layer.keys.shape[-2])


# -- one point ----------------------------------------------------------------------------
def measure(model, kv, cfg: Config, batch: int, prompt: int, budget: int, warmup: int, steps: int,
            windows: int, bandwidth: float, smoke: bool) -> dict[str, Any]:
    device = next(model.parameters()).device
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    start = prompt + budget if cfg.scorer is None else cfg.target
    cache = filled_cache(model, batch, start)
    # Positions continue from a prompt plus some generated tokens: the value only feeds RoPE.
    stepper = Stepper(model, cache, batch, prompt + 2 * budget, "eager", None)
    press = make_press(kv, cfg, smoke) if cfg.scorer else None
    n_steps = steps if press is None else windows * cfg.interval
    lengths: list[int] = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    record = entries_recorder(cache, lengths)
    if press is None:
        times = time_steps(stepper, warmup, n_steps, device, record)
    else:
        with press(model):
            times = time_steps(stepper, warmup, n_steps, device, record)
    per = times["per"]
    cuts = sum(1 for a, b in zip(lengths, lengths[1:]) if b < a)
    per_token = kv_bytes_per_token(model)
    mean_held = sum(lengths) / len(lengths)
    row: dict[str, Any] = dict(
        method=cfg.name, scorer=cfg.scorer, interval=cfg.interval, target=cfg.target, batch=batch,
        steps=n_steps, warmup=warmup, ms_mean=sum(per) / len(per), ms_median=median(per), ms_min=min(per),
        ms_max=max(per), host_ms_mean=times["host"] / n_steps, ms_steps=[round(x, 3) for x in per],
        held_min=min(lengths), held_max=max(lengths), held_mean=mean_held, cuts=cuts,
        # A step attends over what the cache held before it plus its own entry (a cut happens after
        # the step's attention): the largest such set is held_max + 1, as for Slide (P + B + 1).
        peak_entries=max(lengths) + 1,
        kv_bytes_peak=batch * (max(lengths) + 1) * per_token,
        peak_allocated=torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
    )
    if math.isfinite(bandwidth):
        roof_ms = (weight_bytes_read(model) + batch * mean_held * per_token) / bandwidth * 1e3
        row["roofline_ratio"] = row["ms_mean"] / roof_ms
    del stepper, cache
    return row


def best_points(points: list[dict]) -> dict[tuple[str, int], dict]:
    """Each (method, batch)'s fastest repeat (noise on the host only ever adds time)."""
    out: dict[tuple[str, int], dict] = {}
    for p in points:
        key = (p["method"], p["batch"])
        if key not in out or p["ms_mean"] < out[key]["ms_mean"]:
            out[key] = p
    return out


# -- comparison with decode.py's rows -----------------------------------------------------
def compare(result: dict, decode: dict) -> list[dict]:
    """Slide (eager and captured) against each kvpress config at the same batch.

    Slide's step is taken in its steady state (samples with more generated tokens than the
    budget: its decoding pool is full and every step selects); the stock DynamicCache rows of
    both processes at ``P + B`` entries give the version-normalised ratio.
    """
    budget = decode["settings"]["budget"]
    pts = decode["points"]

    def best(method: str, batch: int, generated: int) -> float:
        return min(p["ms_mean"] for p in pts if (p["method"], p["batch"], p["generated"]) == (method, batch, generated))

    def steady(method: str, batch: int) -> float | None:
        gens = sorted({p["generated"] for p in pts if p["method"] == method and p["batch"] == batch
                       and p["generated"] > budget})
        return sum(best(method, batch, g) for g in gens) / len(gens) if gens else None

    def dyn_decode(batch: int) -> float | None:
        if not any((p["method"], p["batch"], p["generated"]) == ("dynamic", batch, budget) for p in pts):
            return None
        return best("dynamic", batch, budget)

    rows = []
    ours = best_points(result["points"])
    for r in ours.values():
        if r["scorer"] is None:
            continue
        b = r["batch"]
        slide, graph, d17 = steady("slide", b), steady("slide+graph", b), dyn_decode(b)
        d52 = ours.get(("dynamic", b), {}).get("ms_mean")
        row = dict(method=r["method"], batch=b, kvpress_ms=r["ms_mean"], slide_ms=slide, slide_graph_ms=graph,
                   dynamic_ms_kvpress_env=d52, dynamic_ms_scope_env=d17,
                   kvpress_peak_entries=r["peak_entries"], slide_peak_entries=decode["settings"]["prompt"] + budget + 1)
        row["speedup_eager"] = r["ms_mean"] / slide if slide else None
        row["speedup_graph"] = r["ms_mean"] / graph if graph else None
        if slide and d52 and d17:
            row["speedup_eager_version_normalised"] = (r["ms_mean"] / d52) / (slide / d17)
        rows.append(row)
    return rows


# -- driver -------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    smoke = args.smoke
    device = torch.device("cpu" if smoke else "cuda")
    if smoke:
        prompt, budget, intervals, batches = 64, 16, (4, 8), (1, 2)
        warmup, steps, windows, dtype, geometry = 1, 3, 2, torch.float32, TINY
    else:
        prompt, budget, intervals, batches = args.prompt, args.budget, tuple(args.intervals), tuple(args.batches)
        warmup, steps, windows, dtype, geometry = args.warmup, args.steps, args.windows, torch.bfloat16, LLAMA_8B
    for i in intervals:
        if not 0 < i < prompt + budget:
            raise SystemExit(f"--intervals: {i} must lie in (0, prompt + budget = {prompt + budget})")
    kv = load_kvpress(args.import_mode)
    configs = [Config(None)] + [Config(sc, i, prompt + budget - i) for i in intervals for sc in args.scorers]
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(geometry, device, dtype)
    bandwidth = measure_bandwidth(device)
    version = importlib.metadata.version("kvpress")
    result: dict[str, Any] = dict(
        settings=dict(prompt=prompt, budget=budget, intervals=intervals, scorers=list(args.scorers), batches=batches,
                      warmup=warmup, steps=steps, windows=windows, repeats=args.repeats),
        env=dict(torch=torch.__version__, transformers=transformers.__version__, kvpress=version,
                 python=platform.python_version(), device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 smoke=smoke, import_mode=args.import_mode, command=" ".join(sys.argv)),
        bandwidth_bytes_per_s=bandwidth, kv_bytes_per_token=kv_bytes_per_token(model), points=[], errors=[],
    )
    print(f"model ready in {time.perf_counter() - t0:.1f}s; bandwidth {bandwidth / 1e12:.2f} TB/s; "
          f"transformers {transformers.__version__}, kvpress {version}", flush=True)
    deadline = t0 + args.time_budget_s
    # Repeats run the configs again in a rotated order, so a slow phase of the host does not land
    # on one config only; the comparison takes each config's fastest repeat.
    plan = [(batch, configs[(k + r) % len(configs)], r) for r in range(args.repeats) for batch in batches
            for k in range(len(configs))]
    with torch.inference_mode():
        for batch, cfg, repeat in plan:
            if time.perf_counter() > deadline:
                result["errors"].append(dict(method=cfg.name, batch=batch, error="time budget"))
                continue
            try:
                row = measure(model, kv, cfg, batch, prompt, budget, warmup, steps, windows, bandwidth, smoke)
            except torch.OutOfMemoryError:
                result["errors"].append(dict(method=cfg.name, batch=batch, error="out of memory"))
                continue
            row["repeat"] = repeat
            result["points"].append(row)
            print(f"{cfg.name:>22} b={batch:4d}: {row['ms_mean']:8.2f} ms/step mean (median {row['ms_median']:.2f}, "
                  f"max {row['ms_max']:.2f}, host {row['host_ms_mean']:.2f}); held {row['held_min']}..{row['held_max']}, {row['cuts']} cuts",
                  flush=True)
    if args.compare:
        result["compare_with"] = str(args.compare)
        result["comparison"] = compare(result, json.loads(Path(args.compare).read_text()))
    result["elapsed_s"] = time.perf_counter() - t0
    return result


def markdown(result: dict) -> str:
    env, s = result["env"], result["settings"]
    lines = [
        f"# kvpress DecodingPress decode steps ({env['device']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, kvpress {env['kvpress']})",
        "",
        f"Prompt {s['prompt']}; equal peak KV with Slide(budget={s['budget']}): target_size = prompt + budget - "
        f"interval; {s['windows']} whole intervals timed after {s['warmup']} warm-up steps; command `{env['command']}`.",
        "",
        "| method | batch | repeat | ms/step mean | median | max (cut) | host ms/step | entries held | cuts | x roofline | peak alloc GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["points"]:
        peak = r["peak_allocated"] / 2**30 if r["peak_allocated"] else None
        lines.append(f"| {r['method']} | {r['batch']} | {r.get('repeat', 0)} | {r['ms_mean']:.2f} | {r['ms_median']:.2f} | "
                     f"{r['ms_max']:.2f} | {fmt(r.get('host_ms_mean'), '.2f')} | "
                     f"{r['held_min']}..{r['held_max']} | {r['cuts']} | {fmt(r.get('roofline_ratio'), '.2f')} | "
                     f"{fmt(peak, '.1f')} |")
    if result.get("comparison"):
        lines += ["", f"## Against ScopeCache Slide at equal KV memory ({result['compare_with']})", "",
                  "| kvpress config | batch | kvpress ms | Slide eager ms | Slide graph ms | kvpress / Slide eager | "
                  "kvpress / Slide graph | version-normalised (eager) | peak entries kvpress / Slide |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in result["comparison"]:
            lines.append(f"| {c['method']} | {c['batch']} | {c['kvpress_ms']:.2f} | {fmt(c['slide_ms'], '.2f')} | "
                         f"{fmt(c['slide_graph_ms'], '.2f')} | {fmt(c['speedup_eager'], '.2f')} | "
                         f"{fmt(c['speedup_graph'], '.2f')} | "
                         f"{fmt(c.get('speedup_eager_version_normalised'), '.2f')} | {c['kvpress_peak_entries']} / "
                         f"{c['slide_peak_entries']} |")
    for e in result["errors"]:
        lines.append(f"\nNot measured: {e['method']} batch {e['batch']}: {e['error']}")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> bool:
    """ms per step by batch: each kvpress config against Slide eager and captured (the comparison)."""
    rows = result.get("comparison") or []
    if not rows:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in sorted({r["method"] for r in rows}):
        pts = sorted((r["batch"], r["kvpress_ms"]) for r in rows if r["method"] == method)
        ax.plot([b for b, _ in pts], [m for _, m in pts], marker="o", label=f"kvpress {method[8:]}")
    for key, label in (("slide_ms", "ScopeCache Slide, eager"), ("slide_graph_ms", "ScopeCache Slide, CUDA graph")):
        pts = sorted({(r["batch"], r[key]) for r in rows if r.get(key)})
        if pts:
            ax.plot([b for b, _ in pts], [m for _, m in pts], marker="s", linestyle="--", label=label)
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per decode step (lower is better)")
    s = result["settings"]
    ax.set_title(f"equal KV memory: {s['prompt'] + s['budget']} entries per head")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_kvpress"), help="output path stem")
    ap.add_argument("--import-mode", choices=("package", "modules"), default="package")
    ap.add_argument("--batches", nargs="*", type=int, default=[8, 32])
    ap.add_argument("--prompt", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=512, help="Slide's decoding budget B (equal-memory partner)")
    ap.add_argument("--intervals", nargs="*", type=int, default=[128, 512], help="DecodingPress compression_interval")
    ap.add_argument("--scorers", nargs="*", choices=("knorm", "snapkv"), default=["knorm", "snapkv"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=16, help="timed steps of the DynamicCache bridge rows")
    ap.add_argument("--windows", type=int, default=1, help="whole compression intervals timed per kvpress point")
    ap.add_argument("--repeats", type=int, default=1, help="run every config this many times (rotated order)")
    ap.add_argument("--compare", type=Path, help="decode.py JSON from the same device call")
    ap.add_argument("--time-budget-s", type=float, default=400.0)
    ap.add_argument("--report", nargs="*", type=Path, help="re-render .md/.png from these JSON files (no run)")
    args = ap.parse_args(argv)
    if args.report:
        for path in args.report:
            write_outputs(json.loads(path.read_text()), path.with_suffix(""), markdown, plot)
        return 0
    result = run(args)
    write_outputs(result, args.out, markdown, plot)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
