"""Decoding strategies without a model: schedules, selection timing, validation."""

from __future__ import annotations

import pytest

from scope_kv import Adaptive, Discontinuous, Slide


def test_paper_delta():
    # docs/method.md §2: delta = (T - r) // (B - r) = 15 for T=4096, r=256, B=512.
    assert Adaptive(512, 256, max_new_tokens=4096).delta == 15
    assert Discontinuous(512, 256, max_new_tokens=4096).delta == 15
    assert Adaptive(512, 256, delta=7).delta == 7


def test_slide_budget_is_constant_and_selects_from_full_pool():
    s = Slide(8, 3)
    assert [s.budget_at(t) for t in (0, 5, 1000)] == [8, 8, 8]
    assert s.plan(7, 10, 0) == (False, 0)
    assert s.plan(8, 10, 0) == (True, 0)
    assert s.plan(9, 10, 0) == (True, 0)
    assert s.slack == 0 and s.max_held == 9


def test_adaptive_budget_grows_linearly_and_is_capped():
    a = Adaptive(10, 4, delta=3)
    assert [a.budget_at(t) for t in range(0, 22, 3)] == [4, 5, 6, 7, 8, 9, 10, 10]
    assert a.budget_at(10_000) == 10
    # reaches B near t = T for the derived delta
    b = Adaptive(512, 256, max_new_tokens=4096)
    assert b.budget_at(4095 - 256) <= 512 and b.budget_at(4095) == 512
    assert b.budget_at((512 - 256) * 15 - 1) == 511


def test_discontinuous_skips_delta_eligible_steps_then_selects():
    d = Discontinuous(10, 4, delta=2)
    skipped, decisions = 0, []
    for n in (3, 4, 5, 6, 7):  # t = 0: B(0) = 4, so n=3 is not eligible
        select, skipped = d.plan(n, 0, skipped)
        decisions.append(select)
    assert decisions == [False, False, False, True, False]
    assert d.slack == 2


def test_discontinuous_pool_growth_is_bounded_by_slack():
    d = Discontinuous(12, 4, delta=3)
    n, skipped, worst = 0, 0, 0
    for t in range(500):
        n += 1
        select, skipped = d.plan(n, t, skipped)
        if select:
            n = d.budget_at(t)
        worst = max(worst, n - d.budget_at(t))
    assert worst <= d.slack


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Slide(8, 8), "recent"),
        (lambda: Slide(8, 9), "smaller than budget"),
        (lambda: Slide(0, 0), ">= 2"),
        (lambda: Slide(8, 0), ">= 1"),
        (lambda: Slide(-4, 1), ">= 2"),
        (lambda: Adaptive(8, 4), "max_new_tokens"),
        (lambda: Discontinuous(8, 4), "max_new_tokens"),
        (lambda: Adaptive(8, 4, max_new_tokens=100, delta=3), "not both"),
        (lambda: Adaptive(512, 256, max_new_tokens=300), "at least budget"),
        (lambda: Adaptive(8, 4, delta=0), ">= 1"),
    ],
)
def test_invalid_settings_raise_value_error(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("make", [lambda: Slide(8.0, 2), lambda: Slide(8, "2"), lambda: Adaptive(8, 2, delta=1.5), lambda: Slide(True, 1)])
def test_wrong_types_raise_type_error(make):
    with pytest.raises(TypeError):
        make()


def test_strategies_are_frozen_and_hashable():
    s = Slide(8, 3)
    with pytest.raises(AttributeError):
        s.budget = 9  # type: ignore[misc]
    assert hash(s) == hash(Slide(8, 3)) and s == Slide(8, 3)
