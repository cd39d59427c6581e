"""The decoding strategy's scoring hook is a real extension point.

A new strategy with its own scorer is written here, in the test file, with nothing added to
the package; it runs through `generate` on a tiny model and matches a brute-force reference
(the independent oracle, given the same rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from conftest import make_model
from oracle import Rule, forced_decode, oracle_logits
from scope_kv import AttentionStep, ScopeCache, Slide
from scope_kv.compat import cache_kwargs

PROMPT, STEPS = 24, 40


@dataclass(frozen=True)
class KeyNormSlide(Slide):
    """Slide, but candidates are ranked by the (negated) L2 norm of their key -- low-norm keys
    draw attention, so keep those (Devoto et al., 2024) -- instead of SCOPE's probabilities."""

    def score(self, step: AttentionStep, first: int, last: int) -> torch.Tensor:
        return -step.keys[:, :, first:last].float().norm(dim=-1)


@dataclass(frozen=True)
class BlendSlide(Slide):
    """SCOPE's probabilities, re-weighted by value norms (uses the record's default scores and values)."""

    def score(self, step: AttentionStep, first: int, last: int) -> torch.Tensor:
        return step.probabilities(first, last) * step.values[:, :, first:last].float().norm(dim=-1)


def _key_norm(probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return -keys.norm(dim=-1)


def _prompt(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, PROMPT), generator=g)


def test_a_strategy_defined_here_knows_it_overrides_the_default():
    assert Slide(8, 3).default_scores
    assert not KeyNormSlide(8, 3).default_scores


@pytest.mark.parametrize("arch", ["llama", "mistral"])  # (Qwen3 normalises keys: every norm ties)
def test_custom_scorer_through_generate_matches_brute_force(arch):
    model = make_model(arch, "sdpa")
    ids = _prompt(2, seed=4)
    mask = torch.ones_like(ids)
    cache = ScopeCache(model, decoding=KeyNormSlide(8, 3))
    out = model.generate(input_ids=ids, attention_mask=mask, **cache_kwargs(cache), max_new_tokens=STEPS,
                         min_new_tokens=STEPS, do_sample=False)
    tokens = out[:, PROMPT:]
    assert all(layer.selections > 0 for layer in cache.layers)
    # The brute-force reference keeps every entry and restricts attention to what the rule keeps.
    _, logits = forced_decode(model, ScopeCache(model, decoding=KeyNormSlide(8, 3)), ids, mask, STEPS, tokens=tokens)
    expected, _ = oracle_logits(model, Rule("slide", 8, 3, score=_key_norm), ids, mask, tokens)
    for step, (a, b) in enumerate(zip(logits, expected)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"step {step}")
    # ... and the rule matters: SCOPE's own scores give other logits on the same tokens.
    scope, _ = oracle_logits(model, Rule("slide", 8, 3), ids, mask, tokens)
    assert max((a - b).abs().max().item() for a, b in zip(expected, scope)) > 1e-3


def test_custom_scorer_may_build_on_the_default_probabilities():
    model = make_model("llama", "eager")
    ids = _prompt(1, seed=5)
    mask = torch.ones_like(ids)
    tokens, logits = forced_decode(model, ScopeCache(model, decoding=BlendSlide(8, 3)), ids, mask, STEPS)

    # The scorer's inputs are checked at every selection against a brute-force recomputation
    # (softmax over every held key, summed over each KV head's query group, times value norms).
    kept_checks = []

    @dataclass(frozen=True)
    class Recording(BlendSlide):
        def score(self, step: AttentionStep, first: int, last: int) -> torch.Tensor:
            scores = super().score(step, first, last)
            probs = torch.softmax(
                (step.query.float().reshape(step.batch, step.keys.shape[1], -1, step.query.shape[-1])
                 @ step.keys.float().transpose(-1, -2)) * step.scaling, dim=-1).sum(2)
            want = probs[..., first:last] * step.values[:, :, first:last].float().norm(dim=-1)
            kept_checks.append(torch.allclose(scores, want, atol=1e-6))
            return scores

    _, replayed = forced_decode(model, ScopeCache(model, decoding=Recording(8, 3)), ids, mask, STEPS, tokens=tokens)
    assert kept_checks and all(kept_checks)
    for a, b in zip(logits, replayed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
