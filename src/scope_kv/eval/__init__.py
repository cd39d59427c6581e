"""Evaluation harnesses: LongGenBench (SCOPE_SPEC §6), teacher-forced fidelity, reports.

``scope-kv eval longgenbench|fidelity ...`` and ``scope-kv report DIR`` drive these from the
command line; docs/eval.md describes the method specs, the files written and how to read them.
"""

from .common import KVAccount, Shard, current_shard, load_model
from .fidelity import FidelitySettings, reference_run, replay, run_fidelity, summarize_fidelity
from .longgenbench import (
    TASKS,
    Example,
    build_examples,
    build_prompt,
    load_examples,
    load_source_records,
    score_output,
    write_examples,
)
from .methods import Method, MethodSpecError, parse_method, parse_methods
from .report import make_report
from .runner import KVTrace, LongGenBenchSettings, run_longgenbench, summarize_longgenbench

__all__ = [
    "TASKS",
    "Example",
    "FidelitySettings",
    "KVAccount",
    "KVTrace",
    "LongGenBenchSettings",
    "Method",
    "MethodSpecError",
    "Shard",
    "build_examples",
    "build_prompt",
    "current_shard",
    "load_examples",
    "load_model",
    "load_source_records",
    "make_report",
    "parse_method",
    "parse_methods",
    "reference_run",
    "replay",
    "run_fidelity",
    "run_longgenbench",
    "score_output",
    "summarize_fidelity",
    "summarize_longgenbench",
    "write_examples",
]
