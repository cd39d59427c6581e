"""The trained long-output testbed: task generator, tokenizer, scoring, evaluation, training script."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import re
import sys

import numpy as np
import pytest
import torch

from scope_kv.testbed import (
    TRAINED,
    Mix,
    TestbedModelMissingError,
    build_tokenizer,
    evaluate_caches,
    execute,
    load_testbed,
    make_example,
    output_length,
    prompt_length,
    save_testbed,
    score,
)
from scope_kv.testbed import task as task_mod
from scope_kv.testbed import testbed_config as make_config
from scope_kv.testbed.tokenizer import EOS, NAMES, PAD, VOCAB_SIZE, decode_ids, encode_text

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- generator


def test_make_example_is_deterministic():
    a, b = make_example(7, 16, 24), make_example(7, 16, 24)
    assert a == b
    assert a.prompt_ids == b.prompt_ids and a.output_ids == b.output_ids
    assert make_example(8, 16, 24).prompt != a.prompt


def test_default_lengths_reach_the_trained_setting():
    ex = make_example(0)
    assert (ex.n_bindings, ex.n_items) == (TRAINED.n_bindings, TRAINED.n_items)
    assert len(ex.prompt_ids) == prompt_length(ex.n_bindings, ex.n_items) >= 1024
    assert len(ex.output_ids) == output_length(ex.n_items) >= 2048
    # 2x the output length is still generatable (fresh names suffice)
    long = make_example(0, TRAINED.n_bindings, 2 * TRAINED.n_items)
    assert len(long.output_ids) == output_length(2 * TRAINED.n_items)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_program_structure(seed):
    ex = make_example(seed)
    defined = {name for name, _ in ex.bindings}
    assert len(defined) == ex.n_bindings
    values = dict(ex.bindings)
    for item in ex.items:
        assert item.src in defined, "source used before it is defined"
        assert item.dst not in defined, "destination name is not fresh"
        values[item.dst] = values[item.src]
        assert item.value == values[item.dst]
        defined.add(item.dst)
        if item.kind == "prompt":
            assert item.src_item == -1 and item.src in dict(ex.bindings)
        else:
            assert 0 <= item.src_item < item.index and ex.items[item.src_item].dst == item.src
    # the reference interpreter, run on the prompt text alone, writes the gold output
    assert execute(ex.prompt) == ex.output
    assert execute("<s>" + ex.prompt) == ex.output
    kinds = {item.kind for item in ex.items}
    assert kinds == {"prompt", "hot", "back"}


def test_spans_and_ids_agree_with_text():
    ex = make_example(3, 8, 12)
    assert ex.prompt_ids[0] == 1 and ex.output_ids[-1] == EOS
    assert decode_ids(ex.prompt_ids) == ex.prompt
    assert decode_ids(ex.output_ids) == ex.output
    for item in ex.items:
        assert ex.output[item.chars[0] : item.chars[1]] == item.text == f"{item.src}>{item.dst}={item.value:03d};"
        assert decode_ids(ex.output_ids[item.tokens[0] : item.tokens[1]]) == item.text
    assert re.fullmatch(r"([A-Za-z]{2}=[0-9]{3};)+\|([A-Za-z]{2}>[A-Za-z]{2};)+\|", ex.prompt)


def test_sample_programs_batch_properties():
    rng = np.random.default_rng(0)
    for batch, n, m in [(64, 4, 8), (8, 64, 352)]:
        progs = task_mod.sample_programs(rng, batch, n, m)
        assert progs.names.shape == (batch, n + m)
        for row in progs.names:
            assert len(set(row.tolist())) == n + m
        assert (progs.sources < n + np.arange(m)[None, :]).all() and (progs.sources >= 0).all()
        # every value is the value of its source
        rows = np.arange(batch)[:, None]
        assert (progs.values[:, n:] == progs.values[rows, progs.sources]).all()
        hot = progs.kinds == 1
        assert ((progs.sources - n)[hot] <= np.broadcast_to(np.arange(m), (batch, m))[hot] - 2).all()


def test_mix_and_size_limits():
    with pytest.raises(ValueError):
        Mix(prompt=0.8, hot=0.5)
    with pytest.raises(ValueError):
        make_example(0, 2000, 1000)
    ex = make_example(0, 8, 40, Mix(prompt=1.0, hot=0.0))
    assert all(item.kind == "prompt" for item in ex.items)


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer().save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert len(tok) == VOCAB_SIZE and tok.pad_token_id == PAD and tok.eos_token_id == EOS
    assert tok.padding_side == "left"
    ex = make_example(1, 16, 24)
    assert tok(ex.prompt)["input_ids"] == list(ex.prompt_ids)
    assert [1] + encode_text(ex.prompt) == list(ex.prompt_ids)
    assert tok.decode(list(ex.output_ids), skip_special_tokens=True) == ex.output
    assert tok.decode(list(ex.output_ids)) == ex.output + "</s>"
    batch = tok([ex.prompt, "ab=001;|ab>cd;|"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0].item() == PAD and batch["attention_mask"][1, 0].item() == 0
    assert batch["input_ids"][1, -1].item() == tok.convert_tokens_to_ids("|")
    assert encode_text("a b") == [3, 3, 3]  # single letters and spaces are unknown
    assert encode_text("ab=7;") == [encode_text("ab")[0], 4, 3, 5]  # a value is three digits
    assert NAMES[0] == "aa" and len(NAMES) == 52 * 52


# ----------------------------------------------------------------------------- scoring


def test_score_perfect_corrupted_truncated_garbage():
    ex = make_example(2, 16, 24)
    n = ex.n_items
    assert score(ex, ex.output) == [True] * n
    assert score(ex, ex.output + "</s>junk") == [True] * n
    assert score(ex, ex.output[:-1]) == [True] * n  # the last ';' is optional

    item = ex.items[5]
    wrong = f"{(item.value + 1) % 1000:03d}"
    corrupted = ex.output[: item.chars[1] - 4] + wrong + ex.output[item.chars[1] - 1 :]
    assert score(ex, corrupted) == [i != 5 for i in range(n)]

    cut = ex.items[10].chars[0] + 3
    assert score(ex, ex.output[:cut]) == [i < 10 for i in range(n)]

    skipped = ex.output[: ex.items[7].chars[0]] + ex.output[ex.items[7].chars[1] :]
    assert score(ex, skipped) == [i != 7 for i in range(n)]

    assert score(ex, "") == [False] * n
    assert score(ex, "zz>zz=001;;;==>>" * 5) == [False] * n
    assert score(ex, ex.output.replace("=", "=0")) == [False] * n
    assert score(ex, ex.output.replace(">", "<")) == [False] * n
    # a later duplicate of an item does not override the first answer
    assert score(ex, corrupted + ex.items[5].text) == [i != 5 for i in range(n)]


# ----------------------------------------------------------------------------- model and evaluation


def _tiny_model():
    from transformers import LlamaForCausalLM

    config = make_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=64, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_full_size_config_fits_the_budget():
    from transformers import LlamaForCausalLM

    config = make_config()
    assert config.num_attention_heads == 8 and config.num_key_value_heads == 2 and config.vocab_size == VOCAB_SIZE
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    assert 2 * params <= 16 * 1024 * 1024


def test_load_testbed_missing_directory_says_how(tmp_path):
    with pytest.raises(TestbedModelMissingError, match="train.py"):
        load_testbed(tmp_path / "nowhere")


def test_save_load_and_evaluate(tmp_path):
    from transformers import DynamicCache

    files = save_testbed(_tiny_model(), tmp_path / "m")
    assert {p.name for p in files} >= {"config.json", "model.safetensors", "tokenizer.json"}
    model, tok = load_testbed(tmp_path / "m")
    assert model.dtype == torch.float32 and tok.padding_side == "left"

    res = evaluate_caches(model, tok, seeds=[0, 1, 2], n_bindings=3, n_items=4, batch_size=2)
    assert res.correct.shape == (3, 4) and len(res.accuracy_by_position) == 4
    assert 0.0 <= res.accuracy <= 1.0
    s = res.seeds[0]
    p = prompt_length(3, 4)
    assert s.new_tokens <= output_length(4)
    assert all(e >= p for e in s.entries) and s.peak_entries >= sum(s.entries) and s.held_bytes > 0
    json.dumps(res.to_dict())

    made = []

    def make_cache(model, prompt_ids):
        made.append(tuple(prompt_ids.shape))
        return DynamicCache(config=model.config)

    res2 = evaluate_caches(model, tok, seeds=[0, 1, 2], make_cache=make_cache, n_bindings=3, n_items=4, batch_size=2)
    assert made == [(2, p), (1, p)]
    assert [x.generated for x in res2.seeds] == [x.generated for x in res.seeds]


def test_evaluate_with_a_scope_cache_holds_less(tmp_path):
    from scope_kv import ScopeCache, Slide

    save_testbed(_tiny_model(), tmp_path / "m")
    model, tok = load_testbed(tmp_path / "m")
    kw = dict(n_bindings=3, n_items=8, batch_size=2, generate_kwargs={"min_new_tokens": 49})
    full = evaluate_caches(model, tok, seeds=[0, 1], **kw)
    slide = evaluate_caches(model, tok, seeds=[0, 1], make_cache=lambda m, ids: ScopeCache(m, decoding=Slide(budget=8, recent=4)), **kw)
    p = prompt_length(3, 8)
    assert full.seeds[0].new_tokens == slide.seeds[0].new_tokens == output_length(8)
    assert max(slide.seeds[0].entries) <= p + 8 < min(full.seeds[0].entries)
    assert slide.seeds[0].peak_entries < full.seeds[0].peak_entries


# ----------------------------------------------------------------------------- training script


def _train_module():
    spec = importlib.util.spec_from_file_location("testbed_train", ROOT / "benchmarks" / "testbed" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_train_smoke_and_resume(tmp_path):
    train = _train_module()
    argv = ["--smoke", "--device", "cpu", "--out", str(tmp_path / "out"), "--ckpt", str(tmp_path / "ckpt"),
            "--max-steps", "3", "--call-steps", "2"]
    first = train.main(argv)
    assert first["step"] == 2 and not first["finished"]
    assert (tmp_path / "ckpt" / "latest.pt").is_file()
    second = train.main(argv)
    assert second["step"] == 3 and second["finished"]
    records = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    starts = [r for r in records if r.get("event") == "start"]
    assert [r["resumed_from"] for r in starts] == [None, 2]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == [1, 2, 3]
    assert all(0.0 <= r["item"] <= 1.0 for r in records if "loss" in r)
    # the final model loads the normal way and the evaluation ran
    model, tok = load_testbed(tmp_path / "out")
    assert model.config.num_key_value_heads == 2
    assert json.loads((tmp_path / "out" / "final_eval.json").read_text())
    sizes = [p.stat().st_size for p in (tmp_path / "out").iterdir()]
    assert max(sizes) <= 16 * 1024 * 1024
    # a finished run re-run with the same arguments does no more steps
    third = train.main(argv)
    assert third["step"] == 3


def test_train_continues_from_its_output_without_a_checkpoint(tmp_path):
    train = _train_module()
    common = ["--smoke", "--device", "cpu", "--max-steps", "3"]
    train.main(common + ["--out", str(tmp_path / "a"), "--ckpt", str(tmp_path / "ck1"), "--call-steps", "2"])
    # a fresh machine: no checkpoint, the previous call's output brought back
    summary = train.main(common + ["--out", str(tmp_path / "b"), "--ckpt", str(tmp_path / "ck2"), "--init-from", str(tmp_path / "a")])
    assert summary["step"] == 3 and summary["finished"]
    records = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert records[0]["event"] == "start" and records[0]["resumed_from"] == 2


def test_train_position_jitter_jumps_only_at_line_boundaries():
    """Jittered position ids rise by 1 inside a line and by 1 + (0..max) after ';' or '|', stay
    under max_position, and some rows keep contiguous ids (the evaluation's layout)."""
    train = _train_module()
    testbed = train._testbed()
    stage = train.parse_stages("8-8:40-40")[0]
    rng = np.random.default_rng(0)
    ids, pos, plen, n_items, _ = train.make_batch(
        testbed, rng, stage, 200 * 40, 512, 0.0, testbed.Mix(), (0.75, 0.5, 4)
    )
    ids, pos = ids.numpy(), pos.numpy()
    step = np.diff(pos, axis=1)  # (B, T - 1)
    boundary = np.isin(ids[:, :-1], (testbed.tokenizer.SEMI, testbed.tokenizer.SEP))
    assert (step[~boundary] == 1).all()
    assert ((step[boundary] >= 1) & (step[boundary] <= 5)).all()
    assert (step[boundary] > 1).any()
    assert (pos[:, 0] == 0).all() and (pos[:, -1] < 512).all()
    contiguous = (step == 1).all(axis=1)
    assert 0 < contiguous.sum() < len(ids)
    # without jitter every row is contiguous
    _, pos0, *_ = train.make_batch(testbed, np.random.default_rng(0), stage, 200 * 40, 512, 0.0, testbed.Mix())
    assert (np.diff(pos0.numpy(), axis=1) == 1).all()


def test_train_weights_from_starts_a_new_schedule(tmp_path):
    """--weights-from: the weights of an earlier run, a new curriculum and step count."""
    train = _train_module()
    common = ["--smoke", "--device", "cpu"]
    train.main(common + ["--out", str(tmp_path / "a"), "--ckpt", str(tmp_path / "ck1"), "--max-steps", "2"])
    summary = train.main(common + ["--out", str(tmp_path / "b"), "--ckpt", str(tmp_path / "ck2"), "--max-steps", "1",
                                   "--weights-from", str(tmp_path / "a"), "--stages", "3-3:5-6", "--jitter-prob", "1"])
    assert summary["step"] == 1 and summary["finished"]
    state = json.loads((tmp_path / "b" / "train_state.json").read_text())
    assert state["weights_from"]["step"] == 2 and state["arch"]["stages"] == "3-3:5-6"
    # another geometry is refused
    with pytest.raises(SystemExit, match="geometry"):
        train.main(common + ["--out", str(tmp_path / "c"), "--ckpt", str(tmp_path / "ck3"), "--max-steps", "1",
                             "--weights-from", str(tmp_path / "a"), "--rope-theta", "1e4"])
