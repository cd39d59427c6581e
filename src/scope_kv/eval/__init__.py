"""Evaluation harnesses: LongGenBench (docs/method.md §10), teacher-forced fidelity, gold-output
teacher forcing, reports.

``scope-kv eval longgenbench|fidelity|gold ...`` and ``scope-kv report DIR`` drive these from
the command line; docs/eval.md describes the method specs, the files written and how to read
them.
"""

from .common import KVAccount, Shard, current_shard, load_model
from .fidelity import FidelitySettings, reference_run, replay, run_fidelity, summarize_fidelity
from .gold import GoldSettings, full_reference, prepare_gold, run_gold, summarize_gold, teacher_force
from .longgenbench import (
    TASKS,
    Example,
    PromptSettings,
    TaskSpec,
    build_examples,
    build_prompt,
    encode_prompt,
    gold_output,
    load_examples,
    load_source_records,
    regroup,
    score_output,
    write_examples,
)
from .methods import Method, MethodSpecError, gold_grid, parse_method, parse_methods
from .report import make_report
from .runner import KVTrace, LongGenBenchSettings, run_longgenbench, summarize_longgenbench
from .runs import Progress

__all__ = [
    "TASKS",
    "Example",
    "FidelitySettings",
    "GoldSettings",
    "KVAccount",
    "KVTrace",
    "LongGenBenchSettings",
    "Method",
    "MethodSpecError",
    "Progress",
    "PromptSettings",
    "Shard",
    "TaskSpec",
    "build_examples",
    "build_prompt",
    "current_shard",
    "encode_prompt",
    "full_reference",
    "gold_grid",
    "gold_output",
    "load_examples",
    "load_model",
    "load_source_records",
    "make_report",
    "parse_method",
    "parse_methods",
    "prepare_gold",
    "reference_run",
    "regroup",
    "replay",
    "run_fidelity",
    "run_gold",
    "run_longgenbench",
    "score_output",
    "summarize_fidelity",
    "summarize_gold",
    "summarize_longgenbench",
    "teacher_force",
    "write_examples",
]
