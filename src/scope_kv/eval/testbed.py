"""``scope-kv eval testbed``: item accuracy of every cache method on the long-output testbed.

The testbed (:mod:`scope_kv.testbed`) is a task whose answers are checked by exact match and a
small model trained to solve it; this harness runs greedy ``generate`` on fresh seeds under each
method and records, per seed, which items came out right and how much KV the cache held. The
default grid is the gold harness's equal-memory grid (:func:`~.methods.gold_grid`): SCOPE's
strategies at ``P + B`` entries per layer and KV head, the unified baselines at the same
``P + B``, SnapKV(``P/4``) + slide against unified H2O at ``P/4 + B``; plus ``full`` (a
``ScopeCache`` that compresses nothing) beside transformers' ``DynamicCache`` (the reference).

Lengths: ``--scale s`` multiplies the trained number of items (the output, and the program lines
in the prompt, grow ``s`` times; the facts stay), so ``--scale 1 2`` measures the trained setting
and twice its output length.

Results are resumable JSON lines (``testbed.jsonl``, one record per method x scale x seed), a
summary CSV and markdown table, and two plots per scale (drawn by :mod:`.plots`): accuracy against
KV entries per method family, and accuracy by output position.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._checks import check_int
from ..testbed import DEFAULT_MIX, KINDS, TRAINED, evaluate_caches, output_length, prompt_length
from .common import Shard
from .gold import method_family
from .methods import Method, gold_grid, parse_method
from .runs import HarnessRun, Pass, Progress, read_results, write_csv

__all__ = [
    "REFERENCE",
    "RESULTS",
    "TestbedSettings",
    "load_records",
    "run_testbed",
    "summarize",
    "testbed_grid",
    "write_report",
]

RESULTS = "testbed"
REFERENCE = "DynamicCache"
"""The method name of transformers' own cache (what every other method is compared with)."""


@dataclasses.dataclass(frozen=True)
class TestbedSettings:
    """What a testbed run measures (stored with the results; a resumed run must repeat it).

    Attributes
    ----------
    seeds : int
        Examples per scale and method.
    seed_start : int
        First seed (examples ``seed_start .. seed_start + seeds - 1``). The training script
        draws its programs from its own random stream, so every seed is an unseen example.
    scales : tuple[float, ...]
        Output lengths as multiples of the trained number of items.
    n_bindings : int
        Facts in the prompt.
    n_items : int
        Items at scale 1.
    batch_size : int
        Rows per ``generate`` call.
    position_bins : int
        Bins of the accuracy-by-position curve.
    """

    __test__ = False  # not a pytest class

    seeds: int = 16
    seed_start: int = 1_000_000
    scales: tuple[float, ...] = (1.0,)
    n_bindings: int = TRAINED.n_bindings
    n_items: int = TRAINED.n_items
    batch_size: int = 8
    position_bins: int = 16

    def __post_init__(self) -> None:
        check_int("--seeds", self.seeds, 1)
        check_int("--seed-start", self.seed_start, 0)
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ValueError(f"--scale takes positive multiples of the trained length, got {list(self.scales)}.")
        check_int("--bindings", self.n_bindings, 1)
        check_int("--items", self.n_items, 1)
        check_int("--batch-size", self.batch_size, 1)
        check_int("position_bins", self.position_bins, 1)

    def items_at(self, scale: float) -> int:
        """Items of an example at ``scale`` (at least one)."""
        return max(1, round(self.n_items * scale))


def testbed_grid(budgets: Sequence[int] = (128, 256, 512)) -> list[str]:
    """The default methods: ``full`` and the equal-memory grid of :func:`~.methods.gold_grid`."""
    return ["full", *gold_grid(budgets)]


def _record(
    method: str, scale: float, n_items: int, prompt: int, seed: Any, layers: int, device: str
) -> dict[str, Any]:
    entries = list(seed.entries)
    return {
        "method": method,
        "family": REFERENCE if method == REFERENCE else method_family(method),
        "scale": scale,
        "seed": seed.seed,
        "n_items": n_items,
        "prompt_tokens": prompt,
        "gold_tokens": output_length(n_items),
        "new_tokens": seed.new_tokens,
        "accuracy": seed.accuracy,
        "correct": [int(c) for c in seed.correct],
        # per item, the initial of its source's kind (testbed.KINDS: prompt / hot / back)
        "kinds": "".join(kind[0] for kind in seed.kinds),
        "output": seed.generated,
        # per layer, per row and KV head, after the last step; the bound is the largest layer's
        "kv_entries": max(entries),
        "kv_entries_mean": sum(entries) / layers,
        "kv_held_bytes": seed.held_bytes,
        "kv_allocated_peak_bytes": seed.peak_allocated_bytes,
        "seconds": seed.seconds,
        "device": device,
    }


def run_testbed(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    out_dir: str | pathlib.Path,
    settings: TestbedSettings,
    progress: bool = True,
    info: dict[str, Any] | None = None,
    shard: Shard | None = None,
) -> list[dict[str, Any]] | None:
    """Run every method (and the ``DynamicCache`` reference) at every scale; resumable.

    Parameters
    ----------
    model, tokenizer
        From :func:`scope_kv.testbed.load_testbed`.
    methods : sequence of Method
        Parsed specs (:func:`~.methods.parse_methods`). Adaptive and discontinuous are planned
        again for each scale's output length unless their spec gives ``T=`` or ``delta=``.
    out_dir : path
        Results directory (``testbed.jsonl``, ``testbed.config.json``, summary, plots).
    settings : TestbedSettings
    progress : bool
        tqdm bars: runs done, and tokens of the current ``generate`` call.
    info : dict, optional
        More settings stored with the results (e.g. the model directory).
    shard : Shard, optional
        This process's share when several run on one directory (run ``i`` of the whole list,
        finished ones included, belongs to rank ``i % world_size``); all of it by default.

    Returns
    -------
    list[dict] or None
        Every record of the directory (this run's and earlier ones), once every rank is done and
        this process merged the parts and wrote the report; ``None`` in the other ranks.
    """
    run = HarnessRun(out_dir, RESULTS, shard, settings, info, _key)
    layers = model.config.num_hidden_layers
    device = next(model.parameters()).device.type  # kept with each record (runs may span devices)
    by_name: dict[str, Method | None] = {REFERENCE: None, **{m.spec: m for m in methods}}
    todo = [
        (scale, name, batch)
        for i, (scale, name, batch) in enumerate(_runs(settings, list(by_name)))
        if run.shard.owns(i) and any(not run.is_done(name, scale, s) for s in batch)
    ]

    def one(scale: float, name: str, batch: list[int], bars: Progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        n_items = settings.items_at(scale)
        method = by_name[name]
        if method is not None:
            # plan adaptive / discontinuous for this scale's output (a spec's own T= still wins)
            method = parse_method(method.spec, output_length(n_items))
        result = evaluate_caches(
            model,
            tokenizer,
            [s for s in batch if not run.is_done(name, scale, s)],
            None if method is None else _factory(method),
            n_bindings=settings.n_bindings,
            n_items=n_items,
            mix=DEFAULT_MIX,
            batch_size=settings.batch_size,
            generate_kwargs={"streamer": _Ticks(bars)},
        )
        prompt = prompt_length(settings.n_bindings, n_items)
        records = [_record(name, scale, n_items, prompt, seed, layers, device) for seed in result.seeds]
        return records, {"accuracy": f"{result.accuracy:.3f}"}

    passes = [
        Pass(f"{name} x{scale:g}", output_length(settings.items_at(scale)), functools.partial(one, scale, name, batch))
        for scale, name, batch in todo
    ]
    run.run_passes(passes, progress, output_length(settings.items_at(max(settings.scales))), "testbed")
    if run.finish(_order) is None:
        return None
    rows = load_records(out_dir)
    write_report(rows, out_dir, settings.position_bins)
    return rows


def _runs(settings: TestbedSettings, names: list[str]) -> list[tuple[float, str, list[int]]]:
    """Every run of the grid, in a fixed order (shards split it by index): scale, method, seed batch."""
    seeds = list(range(settings.seed_start, settings.seed_start + settings.seeds))
    batches = [seeds[i : i + settings.batch_size] for i in range(0, len(seeds), settings.batch_size)]
    return [(scale, name, batch) for scale in settings.scales for name in names for batch in batches]


def _key(record: dict[str, Any]) -> tuple[str, float, int]:
    return record["method"], record["scale"], record["seed"]


def load_records(directory: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every testbed record in ``directory`` (merged file and part files, first of each key kept)."""
    return read_results(directory, RESULTS, _key, _order)


def _order(record: dict[str, Any]) -> tuple[float, str, int]:
    return record["scale"], record["method"], record["seed"]


def _factory(method: Method) -> Any:
    def make(model: Any, prompt_ids: torch.Tensor) -> Any:
        # testbed prompts of one scale have one length: no padding, one budget for the batch
        return method.make_cache(model, prompt_tokens=int(prompt_ids.shape[-1]))

    return make


class _Ticks:
    """A ``generate`` streamer that only advances the progress bar (one tick per step)."""

    def __init__(self, bars: Progress):
        self.bars = bars
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate hands the prompt to the streamer first
            self.prompt_seen = True
            return
        self.bars.step()

    def end(self) -> None:
        pass


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (scale, method): accuracy overall, per output quarter and per source kind
    (``accuracy_prompt``, ``accuracy_hot``, ``accuracy_back``: items whose source is a prompt fact,
    a value written a few items back, one written far back), KV held, time.

    ``kv_vs_full`` divides a method's held entries by the reference's at the same scale.
    """
    groups: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["scale"], r["method"]), []).append(r)
    full = {scale: np.mean([r["kv_entries"] for r in rs]) for (scale, m), rs in groups.items() if m == REFERENCE}
    out = []
    for (scale, method), rs in groups.items():
        correct = np.array([r["correct"] for r in rs], dtype=float)  # (seeds, items)
        quarters = np.array_split(np.arange(correct.shape[1]), 4)
        entries = float(np.mean([r["kv_entries"] for r in rs]))
        kinds = np.array([list(r["kinds"]) for r in rs])  # (seeds, items) initials
        row = {
            "scale": scale,
            "method": method,
            "family": rs[0]["family"],
            "seeds": len(rs),
            "prompt_tokens": rs[0]["prompt_tokens"],
            "gold_tokens": rs[0]["gold_tokens"],
            "accuracy": float(correct.mean()),
            "exact_outputs": float(np.mean([r["accuracy"] == 1.0 for r in rs])),
            **{
                f"accuracy_q{i + 1}": float(correct[:, q].mean()) if len(q) else float("nan")
                for i, q in enumerate(quarters)
            },
            **{
                f"accuracy_{kind}": float(correct[kinds == kind[0]].mean())
                if (kinds == kind[0]).any()
                else float("nan")
                for kind in KINDS
            },
            "kv_entries": round(entries, 1),
            "kv_vs_full": round(entries / full[scale], 4) if scale in full else float("nan"),
            "kv_mib": round(float(np.mean([r["kv_held_bytes"] for r in rs])) / 2**20, 3),
            "seconds_per_seed": round(float(np.mean([r["seconds"] for r in rs])) / max(1, len(rs)), 2),
        }
        out.append(row)
    order = [REFERENCE, "full"]
    return sorted(out, key=lambda r: (r["scale"], r["method"] not in order, r["kv_entries"], r["method"]))


COLUMNS = [
    ("scale", "length x"),
    ("method", "method"),
    ("kv_entries", "KV entries / layer / KV head"),
    ("kv_vs_full", "KV vs full"),
    ("accuracy", "item accuracy"),
    ("accuracy_q1", "Q1"),
    ("accuracy_q2", "Q2"),
    ("accuracy_q3", "Q3"),
    ("accuracy_q4", "Q4"),
    ("accuracy_prompt", "prompt items"),
    ("accuracy_hot", "hot items"),
    ("accuracy_back", "back items"),
    ("exact_outputs", "outputs all right"),
    ("seeds", "seeds"),
]


def write_report(rows: Sequence[dict[str, Any]], out_dir: str | pathlib.Path, position_bins: int = 16) -> pathlib.Path:
    """Summary CSV/JSON, ``testbed_report.md`` and the plots of a testbed run; returns the report path."""
    from .plots import method_colours, testbed_accuracy_figure, testbed_position_figure
    from .tables import markdown_table

    out = pathlib.Path(out_dir)
    summary = summarize(rows)
    write_csv(summary, out / "testbed_summary.csv")
    (out / "testbed_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    methods = list(dict.fromkeys(r["method"] for r in summary))
    colours = method_colours(methods)
    lines = ["# Testbed: item accuracy against KV memory", ""]
    for scale in sorted({r["scale"] for r in summary}):
        part = [r for r in summary if r["scale"] == scale]
        first = part[0]
        lines += [
            f"## {scale:g}x the trained output length: {first['prompt_tokens']}-token prompts, "
            f"{first['gold_tokens']}-token outputs",
            "",
            markdown_table(part, COLUMNS),
            "",
        ]
        name = f"testbed_accuracy_x{scale:g}.png"
        testbed_accuracy_figure(part, scale, methods, colours, out / name)
        pos_name = f"testbed_by_position_x{scale:g}.png"
        shown = list(dict.fromkeys(r["method"] for r in part))
        testbed_position_figure(rows, shown, scale, methods, colours, position_bins, out / pos_name)
        lines += [f"![accuracy against KV]({name})", "", f"![accuracy by position]({pos_name})", ""]
    path = out / "testbed_report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
