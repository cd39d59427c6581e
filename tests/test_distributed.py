"""Data-parallel evaluation: ``scope-kv eval`` split over two processes.

Each process of a launcher's group (``accelerate launch --multi_gpu`` on GPUs, ``torchrun``
anywhere) evaluates every ``world_size``-th example, appends to its own part file, and the
last one to finish merges the parts into the files a single-process run writes. Here two
CPU processes (gloo) run the real CLI on a tiny random Llama saved to a temporary directory
with a byte-level tokenizer built offline, and the merged files are compared with a
single-process run's: same (example, method) records in the same order, same metrics, same
verdicts; only wall-clock fields may differ. A run killed half-way and started again resumes:
the records written before the kill are kept (their timings survive), the rest are computed,
and the merged result is again the single-process one.

Every process runs one intra-op thread, so the arithmetic, and thus every metric, is the
same in all runs.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from scope_kv import cli

# Fields that measure time, not results.
TIMING = {"seconds", "prefill_seconds", "tokens_per_second"}
EXAMPLES = 6
FIDELITY = ["--steps", "12", "-m", "slide:6/2", "-m", "adaptive:6/2", "-m", "snapkv:40,window=4+slide:6/2"]
LONGGENBENCH = ["--max-new-tokens", "12", "-m", "full", "-m", "slide:6/2"]
TIMEOUT = 300


def _tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte symbols + end-of-text), built with no download."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<eos>": 0, **{symbol: i + 1 for i, symbol in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def _examples() -> list[dict]:
    """LongGenBench-format GSM8K rows, short enough for a tiny model (about 450 prompt bytes)."""
    rows = []
    for i in range(EXAMPLES):
        questions = [f"Tom has {i + j} apples and buys {j} more. How many apples does he have?" for j in (1, 2, 3)]
        prompt = (
            "Examples: \nQuestion_1: \nTom has 1 apple and buys 1 more. How many apples does he have?\n"
            "Answer_1: 1 + 1 = 2. The answer is 2.\n\nFollowing Question: \n"
            + "".join(f"Question_{k + 1}: \n{q}\n\n" for k, q in enumerate(questions))
        )
        answers = [f"{i + j} + {j} = {i + 2 * j}\n#### {i + 2 * j}" for j in (1, 2, 3)]
        rows.append({"id": f"toy-{i}", "prompt": prompt, "questions": questions, "answers": answers})
    return rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("dp")
    tokenizer = _tokenizer()
    torch.manual_seed(99)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharper attention, so that compression changes the distributions
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                param.mul_(4.0)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    data = root / "gsm8k_3.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _examples()), encoding="utf-8")
    return root


def _args(workspace: pathlib.Path, harness: str, out: pathlib.Path) -> list[str]:
    extra = FIDELITY if harness == "fidelity" else LONGGENBENCH
    return [
        "eval", harness, "--model", str(workspace / "model"), "--data", str(workspace / "gsm8k_3.jsonl"),
        "--task", "gsm8k", "--device", "cpu", "--no-progress", "--out", str(out), *extra,
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(launcher: str, args: list[str]) -> list[str]:
    """The documented two-process command lines (docs/multi_gpu.md)."""
    port = str(_free_port())
    if launcher == "accelerate":
        # `--multi_gpu` picks accelerate's torchrun-based launcher; on a machine without GPUs the
        # processes join a gloo group (`accelerate launch --cpu --num_processes 2` would start ONE
        # process unless MPI is set up).
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", port, "-m", "scope_kv.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
            "-m", "scope_kv.cli", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}


def _run_launched(launcher: str, args: list[str]) -> str:
    proc = subprocess.run(_launch_command(launcher, args), env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    return output


def _run_single(args: list[str]) -> None:
    """A single-process run, in this process, with the same one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(args) == 0
    finally:
        torch.set_num_threads(threads)


def _records(path: pathlib.Path) -> list[dict]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line torn by a kill
            continue
    return rows


def _results(out: pathlib.Path, harness: str) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in _records(out / f"{harness}.jsonl")]


def _summary(out: pathlib.Path, harness: str) -> list[dict]:
    with (out / f"{harness}_summary.csv").open(encoding="utf-8") as fh:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(fh)]


def _assert_same_files(single: pathlib.Path, parallel: pathlib.Path, harness: str) -> None:
    one, two = _results(single, harness), _results(parallel, harness)
    assert [(r["example"], r["method"]) for r in two] == [(r["example"], r["method"]) for r in one]
    assert two == one
    assert _summary(parallel, harness) == _summary(single, harness)
    assert json.loads((parallel / f"{harness}.config.json").read_text()) == json.loads(
        (single / f"{harness}.config.json").read_text()
    )
    # Only the files a single-process run writes are left: no part files, markers or lock.
    assert sorted(p.name for p in parallel.iterdir()) == sorted(p.name for p in single.iterdir())


@pytest.fixture(scope="module")
def single_fidelity(workspace) -> pathlib.Path:
    out = workspace / "fidelity-1"
    _run_single(_args(workspace, "fidelity", out))
    rows = _results(out, "fidelity")
    assert len(rows) == EXAMPLES * 4  # the reference and three methods per prompt
    # The comparison below means something only if compression changed the distributions.
    assert any(r.get("mean_kl", 0) > 0 for r in rows)
    return out


def test_fidelity_over_two_processes_equals_one_process(workspace, single_fidelity):
    out = workspace / "fidelity-2"
    output = _run_launched("accelerate", _args(workspace, "fidelity", out))
    _assert_same_files(single_fidelity, out, "fidelity")
    # One merged result, announced once: the two processes were two shards of one run, not two
    # copies of a single-process run racing over the same files.
    assert output.count("results: ") == 1, output[-4000:]


def test_longgenbench_over_two_processes_equals_one_process(workspace):
    single, parallel = workspace / "lgb-1", workspace / "lgb-2"
    _run_single(_args(workspace, "longgenbench", single))
    _run_launched("torchrun", _args(workspace, "longgenbench", parallel))
    _assert_same_files(single, parallel, "longgenbench")
    rows = _results(parallel, "longgenbench")
    assert len(rows) == EXAMPLES * 2
    assert all(len(r["verdicts"]) == 3 for r in rows)


def test_interrupted_two_process_run_resumes(workspace, single_fidelity):
    out = workspace / "fidelity-resumed"
    args = _args(workspace, "fidelity", out)
    proc = subprocess.Popen(
        _launch_command("torchrun", args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group, so the kill reaches the launcher and both ranks
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        written: list[dict] = []
        while time.monotonic() < deadline and proc.poll() is None:
            written = [r for part in out.glob("fidelity.part-*.jsonl") for r in _records(part)]
            if len(written) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert len(written) >= 3, "no records written before the deadline"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert not (out / "fidelity.jsonl").exists(), "the killed run must not have merged"
    parts = sorted(out.glob("fidelity.part-*.jsonl"))
    assert {p.name for p in parts} <= {"fidelity.part-0-of-2.jsonl", "fidelity.part-1-of-2.jsonl"}, parts
    before = {(r["example"], r["method"]): r for part in parts for r in _records(part)}
    assert 0 < len(before) < EXAMPLES * 4
    for part in parts:  # each rank wrote only the examples it owns
        rank = int(part.name.split(".part-")[1].split("-of-")[0])
        assert all(row["index"] % 2 == rank for row in _records(part)), part.name

    _run_launched("torchrun", args)
    _assert_same_files(single_fidelity, out, "fidelity")
    merged = {(r["example"], r["method"]): r for r in _records(out / "fidelity.jsonl")}
    for key, row in before.items():
        # Kept, not recomputed: the first run's own timing is still there.
        assert merged[key]["seconds"] == row["seconds"], key


@pytest.mark.parametrize("resume_with", ["one-process", "same-two-shards"])
def test_resume_after_a_torn_write(workspace, single_fidelity, resume_with):
    """A two-process run killed while writing a record leaves part files whose last line is cut
    short; a run over the directory, with one process or with the same two shards (``--rank`` /
    ``--world-size``, one after the other), recomputes what is missing and merges."""
    out = workspace / f"fidelity-torn-{resume_with}"
    out.mkdir()
    (out / "fidelity.config.json").write_bytes((single_fidelity / "fidelity.config.json").read_bytes())
    reference = (single_fidelity / "fidelity.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    rows = [json.loads(line) for line in reference]
    for rank in (0, 1):
        mine = [line for line, row in zip(reference, rows) if row["index"] % 2 == rank][:3]
        torn = mine[-1][: len(mine[-1]) // 2]  # the third record was being written when the run died
        (out / f"fidelity.part-{rank}-of-2.jsonl").write_text("".join(mine[:-1]) + torn, encoding="utf-8")
    args = _args(workspace, "fidelity", out)
    if resume_with == "one-process":
        _run_single(args)
    else:
        for rank in (0, 1):
            _run_single([*args, "--rank", str(rank), "--world-size", "2"])
    _assert_same_files(single_fidelity, out, "fidelity")
