"""Gold-output teacher forcing on a tiny random Llama: the reference output, batching, the one-call
reference, resume and sharding, method specs with prompt shares, the report and the CLI."""

from __future__ import annotations

import json
import re

import pytest
import torch

import scope_kv.eval
from conftest import make_model
from scope_kv import ScopeCache, Slide, SnapKV, UnifiedH2O
from scope_kv.cli import main
from scope_kv.eval import (
    GoldSettings,
    Shard,
    full_reference,
    gold_grid,
    gold_output,
    load_examples,
    make_report,
    parse_method,
    parse_methods,
    prepare_gold,
    regroup,
    run_gold,
    score_output,
    teacher_force,
)
from scope_kv.eval.gold import GoldBatch, method_family, plan_tokens
from scope_kv.eval.gold.records import budget_of
from scope_kv.eval.methods import MethodSpecError

GOLD_TOKENS = 40


class CharTokenizer:
    """Prompts: the last 30-46 characters (length varies with the text, so batches need padding);
    reference outputs: one token per character, with offsets."""

    chat_template = None
    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True, return_tensors=None, return_offsets_mapping=False):
        if return_offsets_mapping:
            return {"input_ids": [3 + ord(c) % 120 for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}
        ids = [3 + ord(c) % 120 for c in text[-(30 + len(text) % 17) :]]
        if return_tensors:
            return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
        return {"input_ids": ids}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


@pytest.fixture(scope="module")
def model():
    m = make_model("llama")
    m.generation_config.eos_token_id = None
    return m


@pytest.fixture(scope="module")
def items():
    # Short references that still reach the first answers: one question, the tail of its solution.
    examples = load_examples("gsm8k", limit=3)
    return prepare_gold(examples, CharTokenizer(), GoldSettings(max_questions=1, max_gold_tokens=GOLD_TOKENS))


SPECS = ("full", "slide:8/4", "adaptive:10/4", "discontinuous:10/4", "unified-h2o:prompt+8/4",
         "unified-streamingllm:prompt+8/4", "snapkv:prompt/2+slide:8/4", "unified-h2o:prompt/2+8/4")


def _methods(items, specs=SPECS):
    methods, errors = parse_methods(list(specs), plan_tokens(items))
    assert not errors
    return methods


# -- the reference output -------------------------------------------------------------------------
def test_gold_output_is_the_answer_the_prompt_asks_for():
    example = load_examples("gsm8k", limit=1)[0]
    gold = gold_output(example)
    assert gold.text.startswith("Answer_9:\nJanet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every")
    assert "<<" not in gold.text and "####" not in gold.text
    blocks = gold.text.split("\n\n")
    assert len(blocks) == example.k == len(gold.answer_spans)
    assert gold.labels == tuple(range(9, 9 + example.k))
    for block, label in zip(blocks, gold.labels, strict=True):
        # The demos' format: Answer_<n>:, the reasoning line by line, "The answer is N."
        assert re.fullmatch(rf"Answer_{label}:\n(.+\n)+The answer is [-\d,.]+\.", block), block
    finals = [gold.text[a:b] for a, b in gold.answer_spans]
    assert finals[:3] == ["18", "3", "70000"]
    assert score_output(example, gold.text).correct == example.k  # the reference scores perfectly
    with pytest.raises(ValueError, match="option letters"):
        gold_output(load_examples("mmlu", limit=1)[0])


def test_regroup_joins_rows_in_order():
    shipped = load_examples("gsm8k")
    sixty = regroup(shipped, 60)
    assert len(sixty) == len(shipped) * 30 // 60 == 21
    assert sixty[0].questions == shipped[0].questions + shipped[1].questions
    assert sixty[20].questions == shipped[40].questions + shipped[41].questions  # row 42 is left over
    assert [e.id for e in sixty[:2]] == ["gsm8k-k60-0", "gsm8k-k60-1"]
    assert {e.first_label for e in sixty} == {9}
    assert f"Question_{9 + 59}:" in sixty[0].prompt and "Answer_8:" in sixty[0].prompt
    assert [e.questions for e in regroup(shipped, 60)] == [e.questions for e in sixty]  # deterministic
    thirty = regroup(shipped, 30)
    assert [e.questions for e in thirty] == [e.questions for e in shipped]


def test_answer_tokens_are_the_final_numbers(items):
    tok = CharTokenizer()
    example = load_examples("gsm8k", limit=1)[0]
    (item,) = prepare_gold([example], tok, GoldSettings(max_questions=2))
    text = gold_output(item.example).text  # one token per character
    assert len(text) == item.gold_ids.numel()
    answers = ["".join(text[i] for i in range(len(text)) if int(item.answer_of[i]) == j) for j in range(2)]
    assert answers == ["18", "3"]
    assert int((item.answer_of >= 0).sum()) == 3
    assert all(it.gold_ids.numel() == GOLD_TOKENS for it in items)  # cut by max_gold_tokens
    assert len({it.prompt_ids.numel() for it in items}) == 2  # different prompt lengths (padding), two alike


# -- the one-call reference and teacher forcing ------------------------------------------------------
def test_stepping_a_full_cache_reproduces_the_one_call_reference(model, items):
    batch = GoldBatch.of(items, 0)
    assert (batch.prompt_mask.sum(1).tolist(), batch.gold_valid.sum(1).tolist()) == (
        [it.prompt_ids.numel() for it in items], [GOLD_TOKENS] * 3)
    reference = full_reference(model, batch, rows_per_chunk=2)
    # Independent computation, one row at a time without padding: one forward of prompt + gold.
    for row, it in enumerate(items):
        ids = torch.cat([it.prompt_ids, it.gold_ids])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        p = it.prompt_ids.numel()
        want = -logp[p - 1 : -1].gather(-1, it.gold_ids[:, None])[:, 0]
        torch.testing.assert_close(reference.nll[row], want, atol=1e-4, rtol=1e-4)
    for cache in (ScopeCache(model), ScopeCache(model, decoding=Slide(10_000, 64))):
        stats = teacher_force(model, cache, batch, reference)
        torch.testing.assert_close(stats.nll, reference.nll, atol=1e-4, rtol=1e-4)
        assert float(stats.kl.max()) < 1e-5 and bool(stats.top1.all())
        assert stats.kv_slots_peak == batch.prompt_ids.shape[1] + GOLD_TOKENS - 1


def test_chunked_prefill_and_reference_change_nothing(model, items):
    batch = GoldBatch.of(items, 0)
    whole = full_reference(model, batch, rows_per_chunk=3, chunk_tokens=1024)
    chunked = full_reference(model, batch, rows_per_chunk=2, chunk_tokens=7)  # some chunks hold pads only
    torch.testing.assert_close(chunked.nll, whole.nll, atol=1e-4, rtol=1e-4)
    assert torch.equal(chunked.top1, whole.top1)
    lengths = list(batch.prompt_tokens)
    for spec in ("slide:8/4", "snapkv:prompt/2+slide:8/4", "h2o:prompt/2+slide:8/4"):
        method = parse_method(spec)
        one = teacher_force(model, method.make_cache(model, lengths), batch, whole)
        many = teacher_force(model, method.make_cache(model, lengths), batch, whole, chunk_tokens=7)
        torch.testing.assert_close(many.nll, one.nll, atol=1e-4, rtol=1e-4, msg=spec)
        assert torch.equal(many.top1, one.top1), spec


def test_compression_drifts_only_after_the_budget_fills(model, items):
    batch = GoldBatch.of(items[:1], 0)
    reference = full_reference(model, batch)
    stats = teacher_force(model, ScopeCache(model, decoding=Slide(8, 4)), batch, reference)
    # The pool first exceeds 8 entries at the 9th decode step (reference token 9).
    assert float(stats.kl[:, :9].max()) < 1e-5
    assert float(stats.kl[:, 10:].max()) > 1e-6


def test_padded_batch_gives_the_numbers_of_one_example_at_a_time(model, items, tmp_path):
    methods = _methods(items)
    batched = run_gold(model, CharTokenizer(), items, methods, tmp_path / "batch", GoldSettings(keep_per_token=True))
    single = run_gold(model, CharTokenizer(), items, methods, tmp_path / "one", GoldSettings(keep_per_token=True, batch_size=1))
    assert len(batched) == len(single) == len(items) * (len(methods) + 1)
    by_key = {(r["example"], r["method"]): r for r in single}
    for row in batched:
        other = by_key[(row["example"], row["method"])]
        for field in ("nll", "ref_nll", "kl"):
            torch.testing.assert_close(torch.tensor(row["per_token"][field]), torch.tensor(other["per_token"][field]),
                                       atol=2e-4, rtol=1e-4, msg=f"{row['method']} {field}")
        assert row["per_token"]["top1"] == other["per_token"]["top1"], row["method"]
        assert row["kv_entries_bound"] == other["kv_entries_bound"]
    rows = {(r["method"], r["prompt_tokens"]): r.get("batch_rows") for r in batched}
    lengths = [it.prompt_ids.numel() for it in items]
    for p in lengths:
        assert rows[("slide:8/4", p)] == rows[("snapkv:prompt/2+slide:8/4", p)] == 3  # one batch
        # each row's own prompt length: one cache per length
        assert rows[("unified-h2o:prompt+8/4", p)] == lengths.count(p)


def test_records_and_memory_bounds(model, items, tmp_path):
    rows = run_gold(model, CharTokenizer(), items, _methods(items), tmp_path, GoldSettings())
    by = {(r["example"], r["method"]): r for r in rows}
    item = items[0]
    p, g = item.prompt_ids.numel(), GOLD_TOKENS
    ref = by[(item.example.id, "reference")]
    assert ref["delta_nll"] == 0 and ref["kl"] == 0 and ref["top1"] == 1 and ref["kv_entries_bound"] == p + g - 1
    assert by[(item.example.id, "slide:8/4")]["kv_entries_bound"] == p + 8
    assert by[(item.example.id, "discontinuous:10/4")]["kv_entries_bound"] == p + 10 + parse_method(
        "discontinuous:10/4", plan_tokens(items)).decoding.delta
    assert by[(item.example.id, "unified-h2o:prompt+8/4")]["kv_entries_bound"] == p + 8  # equal memory
    assert by[(item.example.id, "snapkv:prompt/2+slide:8/4")]["kv_entries_bound"] == p // 2 + 8
    assert by[(item.example.id, "unified-h2o:prompt/2+8/4")]["kv_entries_bound"] == p // 2 + 8
    slide = by[(item.example.id, "slide:8/4")]
    assert slide["budget"] == 8 and slide["family"] == "slide:B/r"
    assert len(slide["quarter_delta_nll"]) == 4 and slide["bins"]["count"] == [float(g)]
    assert slide["bins"]["delta_nll"][0] == pytest.approx(slide["delta_nll"] * g, abs=1e-4)
    summary = (tmp_path / "gold_summary.csv").read_text().splitlines()
    assert summary[0].startswith("task,method,family,budget") and len(summary) == 1 + len(SPECS) + 1


def test_resume_and_method_shards_merge_like_one_process(model, items, tmp_path):
    methods = _methods(items, ("slide:8/4", "unified-h2o:prompt+8/4", "adaptive:10/4"))
    settings = GoldSettings()
    single = run_gold(model, CharTokenizer(), items, methods, tmp_path / "one", settings)
    for rank in (1, 0):
        run_gold(model, CharTokenizer(), items, methods, tmp_path / "two", settings, Shard(rank, 2))
    merged = [json.loads(line) for line in (tmp_path / "two" / "gold.jsonl").read_text().splitlines()]
    drop = {"seconds", "group_steps_per_second"}

    def strip(rows):
        return sorted(json.dumps({k: v for k, v in r.items() if k not in drop}, sort_keys=True) for r in rows)

    assert strip(merged) == strip(single)
    again = run_gold(model, CharTokenizer(), items, methods, tmp_path / "one", settings)
    assert strip(again) == strip(single)  # nothing new ran
    with pytest.raises(ValueError, match="other settings"):
        run_gold(model, CharTokenizer(), items, methods, tmp_path / "one", GoldSettings(bin_tokens=64))


def test_longest_prompt_budget_runs_one_batch(model, items, tmp_path):
    methods = _methods(items, ("unified-h2o:prompt+8/4",))
    rows = run_gold(model, CharTokenizer(), items, methods, tmp_path, GoldSettings(prompt_budget="longest"),
                    progress=True)  # (the progress bars run too)
    longest = max(it.prompt_ids.numel() for it in items)
    for row in rows:
        if row["method"] != "reference":
            assert row["batch_rows"] == 3 and row["budget_prompt_tokens"] == longest
            assert row["kv_entries_bound"] == min(longest + 8, row["prompt_tokens"] + GOLD_TOKENS - 1)
    import matplotlib  # noqa: F401  (the report needs it; a test dependency)

    assert "Not at equal memory per example" in make_report(tmp_path).read_text()  # the report says so


def test_settings_are_validated():
    with pytest.raises(ValueError, match="prompt_budget"):
        GoldSettings(prompt_budget="median")
    with pytest.raises(ValueError, match="max_gold_tokens"):
        GoldSettings(max_gold_tokens=0)
    with pytest.raises(ValueError, match="max_questions"):
        GoldSettings(max_questions=0)


# -- method specs ----------------------------------------------------------------------------------
def test_prompt_shares_in_method_specs():
    snap = parse_method("snapkv:prompt/4+slide:128/64")
    assert isinstance(snap.prefill, SnapKV) and snap.decoding == Slide(128, 64) and not snap.depends_on_prompt
    counts = snap.prefill.keep_counts(torch.tensor([3000, 400, 5]), 0, 30)
    assert counts.tolist() == [750, 100, 5]  # a quarter of each row's prompt, never more than it holds
    assert snap.prefill.describe() == "snapkv:prompt/4"
    unified = parse_method("unified-h2o:prompt/4+128/64")
    assert unified.depends_on_prompt and unified.decoding_for(3000) == UnifiedH2O(750 + 128, 64)
    assert parse_method("unified-h2o:prompt+128/64").decoding_for(3000) == UnifiedH2O(3128, 64)
    assert parse_method("h2o:prompt/2,recent=8").prefill.keep_counts(torch.tensor([100]), 0, 1).tolist() == [50]
    for spec, match in [
        ("pyramidkv:prompt/4", "per layer"),
        ("unified-h2o:prompt/4/64", "cannot read"),
        ("slide:prompt/4+8/4", "unified baselines"),
        ("snapkv:prompt/4,budget=9", "drop budget"),
    ]:
        with pytest.raises(MethodSpecError, match=match):
            parse_method(spec)
    with pytest.raises(MethodSpecError, match="different lengths"):
        unified.make_cache(make_model("llama"), [100, 120])
    with pytest.raises(MethodSpecError, match="window"):
        parse_method("snapkv:prompt/64+slide:8/4").make_cache(make_model("llama"), [400])


def test_default_grid_is_the_equal_memory_comparison():
    grid = gold_grid()
    assert len(grid) == 33 and len(set(grid)) == 33
    for b in (128, 256, 512):
        r = b // 2
        assert {f"slide:{b}/{r}", f"adaptive:{b}/{r}", f"discontinuous:{b}/{r}", f"unified-h2o:prompt+{b}/{r}",
                f"unified-streamingllm:prompt+{b}/{r}", f"snapkv:prompt/4+slide:{b}/{r}",
                f"unified-h2o:prompt/4+{b}/{r}"} <= set(grid)
        buffer = min(128, b // 4)
        assert {f"rkv:{b - buffer}/8,buffer={buffer}", f"unified-rkv:prompt+{b - buffer}/8,buffer={buffer}"} <= set(grid)
        assert {f"morphkv:{b}/{max(8, b // 16)}", f"unified-morphkv:prompt+{b}/{max(8, b // 16)}"} <= set(grid)
    methods, errors = parse_methods(grid, 4096)
    assert not errors and len(methods) == 33
    assert {budget_of(m) for m in methods} == {128, 256, 512}  # R-KV compared at budget + buffer
    assert {method_family(s) for s in grid} == {
        "slide:B/r", "adaptive:B/r", "discontinuous:B/r", "unified-h2o:prompt+B/r",
        "unified-streamingllm:prompt+B/r", "snapkv:prompt/4+slide:B/r", "unified-h2o:prompt/4+B/r",
        "rkv:B/r,buffer=b", "unified-rkv:prompt+B/r,buffer=b", "morphkv:B/r", "unified-morphkv:prompt+B/r"}
    with pytest.raises(ValueError, match="even"):
        gold_grid((127,))


# -- report and CLI ----------------------------------------------------------------------------------
def test_report_draws_one_plot_per_budget(model, items, tmp_path):
    import matplotlib  # noqa: F401  (the report needs it; a test dependency)

    methods = _methods(items, ("slide:8/4", "unified-h2o:prompt+8/4", "slide:12/6"))
    run_gold(model, CharTokenizer(), items, methods, tmp_path, GoldSettings(bin_tokens=16))
    text = make_report(tmp_path).read_text()
    assert "## Gold outputs" in text and "| reference (full cache) |" in text and "| slide:8/4 |" in text
    for budget in (8, 12):
        assert (tmp_path / f"gold_B{budget}.png").stat().st_size > 1000
        assert f"gold_B{budget}.png" in text


@pytest.fixture
def tiny_cli(monkeypatch, model):
    loaded = []

    def fake_load(name, gguf_file, device, dtype, attn, device_map=None):
        loaded.append((name, gguf_file))
        return model, CharTokenizer()

    monkeypatch.setattr(scope_kv.eval, "load_model", fake_load)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return loaded


def test_gold_cli(tiny_cli, tmp_path, capsys):
    out = tmp_path / "gold"
    rc = main(["eval", "gold", "--limit", "4", "--questions", "2", "--max-gold-tokens", "24", "-m", "slide:8/4",
               "-m", "unified-h2o:prompt+8/4", "-m", "adaptive:10/4", "-m", "slide:4/8", "--out", str(out),
               "--no-progress", "--gguf-file", "/copied/SmolLM2.gguf"])
    captured = capsys.readouterr()
    assert rc == 1 and "skipping method 'slide:4/8'" in captured.err  # one bad spec, the others ran
    assert "| slide:8/4 |" in captured.out and tiny_cli == [("smollm2", "/copied/SmolLM2.gguf")]
    rows = [json.loads(line) for line in (out / "gold.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"reference", "slide:8/4", "unified-h2o:prompt+8/4", "adaptive:10/4"}
    assert {r["questions"] for r in rows} == {2} and {r["gold_tokens"] for r in rows} == {24}
    config = json.loads((out / "gold.config.json").read_text())
    assert config["questions"] == 2 and config["plan_tokens_used"] == 24 and config["max_gold_tokens"] == 24
    assert main(["eval", "gold", "--task", "mmlu", "--out", str(tmp_path / "m")]) == 2
    assert "worked solutions" in capsys.readouterr().err


def test_gold_cli_default_grid_parses(tiny_cli, tmp_path, monkeypatch):
    seen = {}

    def fake_run(model, tok, items, methods, out, settings, shard, progress, info):
        seen["methods"] = [m.spec for m in methods]
        seen["settings"] = settings
        return []

    monkeypatch.setattr("scope_kv.eval.gold.run_gold", fake_run)
    assert main(["eval", "gold", "--limit", "1", "--max-questions", "1", "--budgets", "16", "32", "--prompt-budget",
                 "longest", "--batch-size", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    assert seen["methods"] == gold_grid((16, 32))
    assert seen["settings"].prompt_budget == "longest" and seen["settings"].batch_size == 4


def test_tokens_past_the_trained_context_are_counted_and_reported(model, items, tmp_path, monkeypatch, caplog):
    import matplotlib  # noqa: F401  (the report needs it; a test dependency)

    monkeypatch.setattr(model.config, "max_position_embeddings", 60)
    with caplog.at_level("WARNING"):
        rows = run_gold(model, CharTokenizer(), items, _methods(items, ("slide:8/4",)), tmp_path, GoldSettings())
    assert "beyond the model's 60 positions" in caplog.text
    for row in rows:
        assert row["tokens_beyond_positions"] == row["prompt_tokens"] + GOLD_TOKENS - 1 - 60
    assert "Beyond the model's trained positions" in make_report(tmp_path).read_text()
