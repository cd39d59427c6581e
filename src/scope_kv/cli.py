"""The ``scope-kv`` command: ``demo``, ``eval longgenbench|fidelity|gold|testbed|build`` and ``report``.

Examples::

    scope-kv eval fidelity --task gsm8k --limit 2 --max-prompt-tokens 1024 --steps 192 \\
        -m full -m slide:64/32 -m snapkv:256+slide:64/32 -m unified-h2o:320/32 --out runs/fid
    scope-kv eval longgenbench --task gsm8k -m full -m slide:512/256 --out runs/lgb
    scope-kv eval gold --questions 30 --out runs/gold-k30      # the default equal-memory grid
    scope-kv eval testbed --seeds 16 --scale 1 2 --out runs/testbed
    scope-kv report runs/fid
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys

from . import demo
from .cli_eval import add_eval, err

__all__ = ["main", "build_parser"]

logger = logging.getLogger(__name__)


def _version() -> str:
    import torch
    import transformers

    from . import __version__

    return f"scope-kv {__version__} (transformers {transformers.__version__}, torch {torch.__version__})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scope-kv", description="SCOPE KV-cache compression for transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the library does")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)
    demo.add_parser(sub)
    add_eval(sub)
    rep = sub.add_parser(
        "report",
        help="markdown table and PNG plots from a results directory",
        description="Summarise `scope-kv eval` results: report.md, *_summary.csv, *.png.",
    )
    rep.add_argument("dir", type=pathlib.Path, help="results directory (--out of scope-kv eval)")
    rep.add_argument("--out", type=pathlib.Path, default=None, help="where to write (default: DIR)")
    rep.set_defaults(func=_run_report)
    return parser


def _run_report(args: argparse.Namespace) -> int:
    from .eval.report import make_report

    try:
        path = make_report(args.dir, args.out)
    except FileNotFoundError as exc:
        err(str(exc))
        return 2
    print(path.read_text(encoding="utf-8"))
    print(f"report: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
