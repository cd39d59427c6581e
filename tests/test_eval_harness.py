"""The harnesses on a tiny random Llama: fidelity invariants, KV accounting, resume, sharding, report."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import DynamicCache

from conftest import make_model
from scope_kv import ScopeCache, Slide
from scope_kv.compat import cache_kwargs
from scope_kv.eval import (
    FidelitySettings,
    KVAccount,
    LongGenBenchSettings,
    Shard,
    load_examples,
    make_report,
    parse_methods,
    reference_run,
    replay,
    run_fidelity,
    run_longgenbench,
)
from scope_kv.eval.common import current_shard

STEPS = 24
PROMPT = 40


class TinyTokenizer:
    """Maps the last PROMPT characters of a text to ids in the tiny model's vocabulary."""

    chat_template = None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [3 + ord(c) % 120 for c in text[-PROMPT:]]
        if return_tensors:
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        return " ".join(str(i) for i in ids)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    m = make_model("llama")
    m.generation_config.eos_token_id = None  # random weights: run the full length
    return m


@pytest.fixture(scope="module")
def examples():
    return load_examples("gsm8k", limit=2)


def _methods(steps=STEPS, specs=("full", "slide:8/4", "adaptive:10/4", "discontinuous:10/4")):
    methods, errors = parse_methods(list(specs), max_new_tokens=steps)
    assert not errors
    return methods


def test_reference_and_replay_invariants(model):
    ids = torch.randint(3, 128, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    ref = reference_run(model, ids, STEPS)
    assert ref.tokens.shape == (STEPS,) and ref.log_probs.shape == (STEPS, 128)
    assert ref.entries == [2 * (PROMPT + t + 1) for t in range(STEPS)]  # 2 layers, full cache

    full = replay(model, ScopeCache(model), ids, ref)
    assert max(full["kl"]) < 1e-5 and all(full["top1"])
    assert full["entries"] == ref.entries

    slide = replay(model, ScopeCache(model, decoding=Slide(8, 4)), ids, ref)
    assert len(slide["kl"]) == STEPS
    assert max(slide["entries"]) <= 2 * (PROMPT + 8)
    # Identical to the full cache until the decoding pool first overflows, then it drifts.
    assert max(slide["kl"][:7]) < 1e-5
    assert max(slide["kl"][8:]) > 1e-6


def test_kv_account_matches_dynamic_cache(model):
    account = KVAccount(model)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.arange(3, 20)[None], **cache_kwargs(cache))
    entries = account.entries(cache)
    assert entries == [17, 17]
    assert account.held_bytes(sum(entries)) == sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _strip(rows):
    drop = {"seconds", "prefill_seconds", "tokens_per_second"}
    return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True) for r in rows)


def test_fidelity_run_resumes_and_shards_like_one_process(model, examples, tmp_path):
    settings = FidelitySettings(steps=12)
    methods = _methods(12, ("full", "slide:8/4", "discontinuous:10/4"))
    single = run_fidelity(model, TinyTokenizer(), examples, methods, tmp_path / "one", settings)
    assert len(single) == len(examples) * 4  # reference + 3 methods
    assert (tmp_path / "one" / "fidelity_summary.csv").exists()
    assert not list((tmp_path / "one").glob("*.part-*"))

    # Two ranks writing into one directory: the merged file equals the single-process one.
    for rank in (1, 0):
        run_fidelity(model, TinyTokenizer(), examples, methods, tmp_path / "two", settings, Shard(rank, 2))
    merged = [json.loads(line) for line in (tmp_path / "two" / "fidelity.jsonl").read_text().splitlines()]
    assert _strip(merged) == _strip(single)
    assert [(r["index"], r["method"]) for r in merged] == [(r["index"], r["method"]) for r in single]

    # Resuming does nothing new; adding a method runs only that method.
    extra = _methods(12, ("slide:6/2",))
    rows = run_fidelity(model, TinyTokenizer(), examples, methods + extra, tmp_path / "one", settings)
    assert len(rows) == len(examples) * 5
    assert _strip([r for r in rows if r["method"] != "slide:6/2"]) == _strip(single)
    # Other settings in the same directory are refused.
    with pytest.raises(ValueError, match="other settings"):
        run_fidelity(model, TinyTokenizer(), examples, methods, tmp_path / "one", FidelitySettings(steps=13))


def test_resume_skips_done_pairs(model, examples, tmp_path, monkeypatch):
    settings = FidelitySettings(steps=8)
    methods = _methods(8, ("full", "slide:6/2"))
    run_fidelity(model, TinyTokenizer(), examples[:1], methods, tmp_path, settings)
    calls = []
    import scope_kv.eval.fidelity as fidelity

    monkeypatch.setattr(fidelity, "replay", lambda *a, **k: calls.append(a) or pytest.fail("re-ran a done pair"))
    run_fidelity(model, TinyTokenizer(), examples[:1], methods, tmp_path, settings)
    assert not calls


def test_longgenbench_run_records(model, examples, tmp_path):
    settings = LongGenBenchSettings(max_new_tokens=16, max_questions=2)
    rows = run_longgenbench(model, TinyTokenizer(), examples[:2], _methods(16), tmp_path, settings)
    assert len(rows) == 8
    full = next(r for r in rows if r["method"] == "full")
    slide = next(r for r in rows if r["method"] == "slide:8/4")
    for r in (full, slide):
        assert r["questions"] == 2 and len(r["verdicts"]) == 2
        assert r["output_tokens"] == 16 and len(r["kv_entries_trace"]) == 16
        assert r["kv_bytes_peak"] == KVAccount(model).held_bytes(r["kv_entries_peak"])
        assert r["tokens_per_second"] > 0
    # The prefill forward leaves the prompt; each later forward adds one entry per layer.
    assert full["kv_entries_trace"] == [2 * (PROMPT + i) for i in range(16)]
    assert slide["kv_entries_peak"] <= 2 * (PROMPT + 8) < full["kv_entries_peak"]
    summary = (tmp_path / "longgenbench_summary.csv").read_text().splitlines()
    assert len(summary) == 5 and summary[0].startswith("task,method")
    again = run_longgenbench(model, TinyTokenizer(), examples[:2], _methods(16), tmp_path, settings)
    assert _strip(again) == _strip(rows)

    import matplotlib  # noqa: F401  (the report needs it; a test dependency)
    report = make_report(tmp_path)
    text = report.read_text()
    assert "| gsm8k | slide:8/4 |" in text
    for png in ("accuracy_vs_memory.png", "longgenbench_kv_over_steps.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_report_on_fidelity(model, examples, tmp_path):
    import matplotlib  # noqa: F401  (the report needs it; a test dependency)
    methods = _methods(12, ("full", "slide:8/4"))
    run_fidelity(model, TinyTokenizer(), examples[:2], methods, tmp_path, FidelitySettings(steps=12))
    text = make_report(tmp_path, tmp_path / "out").read_text()
    assert "top-1 agreement" in text and "| slide:8/4 |" in text
    for png in ("agreement_vs_memory.png", "kv_over_steps.png", "fidelity_over_steps.png"):
        assert (tmp_path / "out" / png).stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="scope-kv eval"):
        make_report(tmp_path / "out")


def test_shard_from_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert current_shard() == Shard(0, 1)
    assert current_shard(1, 3) == Shard(1, 3)
    assert [i for i in range(7) if Shard(1, 3).owns(i)] == [1, 4]
    with pytest.raises(ValueError):
        Shard(2, 2)


def test_prompt_relative_unified_budget_in_replay(model, examples, tmp_path):
    methods = _methods(12, ("slide:8/4", "unified-h2o:prompt+8/4"))
    rows = run_fidelity(model, TinyTokenizer(), examples[:1], methods, tmp_path, FidelitySettings(steps=12))
    peaks = {r["method"]: r.get("kv_entries_peak") for r in rows}
    # Same KV memory as SCOPE's slide on the whole prompt: prompt + 8 per layer.
    assert peaks["unified-h2o:prompt+8/4"] == peaks["slide:8/4"] == 2 * (PROMPT + 8)


def test_reference_that_ends_at_once(model):
    ids = TinyTokenizer()("abc" * 20, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = int(model(input_ids=ids).logits[0, -1].argmax())
    eos_model = make_model("llama")
    eos_model.generation_config.eos_token_id = first  # the very first greedy token ends the turn
    assert reference_run(eos_model, ids, 5, allow_eos=True).tokens.numel() == 0
    assert reference_run(eos_model, ids, 5).tokens.numel() == 5  # by default eos is never chosen


def test_one_prompt_preparation_and_one_kv_count_for_every_harness(model):
    from scope_kv.accounting import bytes_per_entry, kv_footprint
    from scope_kv.eval import GoldSettings, PromptSettings

    # One implementation of cutting/encoding prompts, shared by the harnesses' settings.
    for cls in (LongGenBenchSettings, FidelitySettings, GoldSettings):
        assert cls.prepare is PromptSettings.prepare and cls.encode is PromptSettings.encode
    # KVAccount keeps no counting of its own: it reports scope_kv.accounting's figures.
    account = KVAccount(model)
    assert account.bytes_per_entry == bytes_per_entry(model)
    cache = ScopeCache(model, decoding=Slide(8, 4))
    with torch.no_grad():
        model(input_ids=torch.arange(3, 20)[None], **cache_kwargs(cache))
    footprint = kv_footprint(cache)
    assert account.entries(cache) == list(footprint.entries) == [17, 17]
    assert account.allocated_bytes(cache) == footprint.allocated_bytes == cache.nbytes()


def test_every_harness_runs_its_work_through_the_one_loop(model, examples, tmp_path, monkeypatch):
    """LongGenBench and fidelity runs (the gold and testbed harnesses too: tests/test_eval_gold.py,
    tests/test_eval_testbed.py run them) do their work as passes of HarnessRun.run_passes, once
    per run; nothing of a harness's own writes records."""
    from scope_kv.eval.runs import HarnessRun

    calls: list[int] = []
    original = HarnessRun.run_passes

    def spy(self, passes, *args, **kwargs):
        calls.append(len(passes))
        return original(self, passes, *args, **kwargs)

    monkeypatch.setattr(HarnessRun, "run_passes", spy)
    methods = _methods(8, ("full", "slide:6/2"))
    run_fidelity(model, TinyTokenizer(), examples[:1], methods, tmp_path / "f", FidelitySettings(steps=8))
    assert calls == [3]  # the reference, then each method
    run_longgenbench(model, TinyTokenizer(), examples[:1], methods, tmp_path / "l", LongGenBenchSettings(max_new_tokens=8))
    assert calls == [3, 2]
    run_fidelity(model, TinyTokenizer(), examples[:1], methods, tmp_path / "f", FidelitySettings(steps=8))
    assert calls == [3, 2, 0]  # resumed: nothing left to run
