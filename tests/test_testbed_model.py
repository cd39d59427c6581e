"""The trained testbed model shipped in the package: it solves its task at full cache, and an
uncompressed ScopeCache generates exactly what DynamicCache does on it.

Fresh seeds (training draws its examples from numpy generators seeded with ``[0, step]``, so these
streams are not among them; they start at 2,000,000,011). One greedy ``generate`` call per cache over
8 examples at the trained length (64 facts, 352 items: 1,667 prompt tokens, 2,113 output tokens).
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from scope_kv import ScopeCache
from scope_kv.testbed import TRAINED, evaluate_caches, load_testbed
from scope_kv.testbed.model import DEFAULT_MODEL_DIR

SEEDS = [2_000_000_011 + i for i in range(8)]


@pytest.fixture(scope="module")
def shipped():
    return load_testbed()


@pytest.fixture(scope="module")
def full_cache(shipped):
    model, tokenizer = shipped
    return evaluate_caches(
        model, tokenizer, SEEDS, lambda m, ids: DynamicCache(config=m.config), batch_size=len(SEEDS)
    )


def test_the_weights_ship_inside_the_package():
    """In the source tree and in the package data a wheel (a non-editable install) takes."""
    import ast
    import fnmatch
    import pathlib
    import re

    names = {p.name for p in DEFAULT_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    package = DEFAULT_MODEL_DIR.parents[1]  # src/scope_kv
    pyproject = (package.parents[1] / "pyproject.toml").read_text()  # (tomllib is 3.11+)
    section = pyproject.split("[tool.setuptools.package-data]", 1)[1]
    patterns = ast.literal_eval(re.search(r"^scope_kv = (\[.*?\])$", section, re.M).group(1))
    for name in names:
        relative = (DEFAULT_MODEL_DIR / name).relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns), relative
    assert all((DEFAULT_MODEL_DIR / n).stat().st_size <= 16 * 2**20 for n in names)
    assert pathlib.Path(DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size > 1_000_000


def test_full_cache_greedy_accuracy_at_the_trained_length(full_cache):
    assert full_cache.n_bindings == TRAINED.n_bindings and full_cache.n_items == TRAINED.n_items
    assert len(full_cache.seeds) == 8
    per_seed = [sum(s.correct) / len(s.correct) for s in full_cache.seeds]
    assert full_cache.accuracy >= 0.95, per_seed
    assert all(len(s.correct) == TRAINED.n_items for s in full_cache.seeds)


def test_uncompressed_scope_cache_generates_what_dynamic_cache_does(shipped, full_cache):
    model, tokenizer = shipped
    ours = evaluate_caches(model, tokenizer, SEEDS, lambda m, ids: ScopeCache(m), batch_size=len(SEEDS))
    assert [s.generated for s in ours.seeds] == [s.generated for s in full_cache.seeds]
    assert [s.new_tokens for s in ours.seeds] == [s.new_tokens for s in full_cache.seeds]
    assert all(n > 2000 for n in (s.new_tokens for s in ours.seeds))
