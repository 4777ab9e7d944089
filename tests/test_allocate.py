"""Allocation space constraints, init patterns, mutation, determinism of the evolutionary search."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moeprune.allocate import (
    INIT_PATTERNS,
    AllocationSpace,
    EvoConfig,
    counts_from_weights,
    initial_population,
    mutate,
    plan_from_counts,
    search_counts,
    uniform_allocation,
)
from moeprune.arch import moe_layers
from moeprune.errors import PlanError
from moeprune.evolve import score_each
from moeprune.fitness import CandidateEvaluator, SearchSet
from moeprune.plan import LayerBounds, validate_plan
from tiny_models import tiny_model


def space(n_layers: int = 6, experts: int = 8, budget: int = 24, step: int = 1, lo: int = 0, hi: int = 6):
    return AllocationSpace(tuple(LayerBounds(i, experts, step, lo, hi) for i in range(n_layers)), budget)


def synthetic_score(counts) -> float:
    """A smooth landscape that prefers removing from late layers."""
    return -sum((n - (2 + i // 2)) ** 2 for i, n in enumerate(counts)) + 0.01 * counts[-1]


@pytest.mark.parametrize("name", INIT_PATTERNS.names())
def test_every_pattern_gives_valid_counts(name):
    for sp in (
        space(),
        space(step=2, hi=6, budget=24),
        space(lo=1, hi=5, budget=20),
        space(n_layers=1, budget=3),
    ):
        rng = np.random.Generator(np.random.PCG64(0))
        counts = counts_from_weights(sp, INIT_PATTERNS.get(name)(len(sp.layers), rng))
        assert sp.is_valid(counts), (name, counts)


def test_weights_to_counts_floor_remainder_round_robin():
    sp = space(n_layers=3, budget=10, hi=6)
    # targets 10 * (1, 1, 2) / 4 = (2.5, 2.5, 5): floors (2, 2, 5), one left -> largest fraction, lowest layer
    assert counts_from_weights(sp, [1, 1, 2]) == (3, 2, 5)
    # capped at max 6 -> the rest goes round-robin
    assert counts_from_weights(sp, [0, 0, 1]) == (2, 2, 6)
    assert uniform_allocation(space(budget=24)) == (4,) * 6


def test_model_space_constraints():
    v3 = moe_layers(tiny_model("deepseek_v3"))  # 2 groups of 4, top-2 from 1 group
    sp = AllocationSpace.from_layers(v3, sparsity=0.25)
    assert [(r.step, r.min_remove, r.max_remove) for r in sp.layers] == [(2, 0, 4), (2, 0, 4)]
    assert sp.budget == 4
    for counts in [(0, 4), (2, 2), (4, 0)]:
        assert sp.is_valid(counts)
    assert not sp.is_valid((1, 3)) and not sp.is_valid((3, 1))
    mix = moe_layers(tiny_model("mixtral"))
    sp = AllocationSpace.from_layers(mix, sparsity=0.5, min_remove={0: 2}, max_remove={2: 3})
    assert [(r.min_remove, r.max_remove) for r in sp.layers] == [(2, 6), (0, 6), (0, 3)]
    with pytest.raises(PlanError, match="cannot remove"):
        AllocationSpace.from_layers(mix, sparsity=0.5, max_remove={0: 2, 1: 2, 2: 2})
    with pytest.raises(PlanError, match="no valid removal count"):
        AllocationSpace.from_layers(mix, sparsity=0.5, min_remove={0: 7})
    with pytest.raises(PlanError, match="budget"):
        sp.check((2, 2, 2))


def test_plan_from_counts_respects_groups_and_order():
    model = tiny_model("deepseek_v3")
    sp = AllocationSpace.from_layers(moe_layers(model), sparsity=0.25)
    order = {1: [7, 6, 0, 1, 2, 3, 4, 5], 2: list(range(8))}
    plan = plan_from_counts(sp, order, (4, 0))
    assert sorted(plan.removed[1]) == [0, 1, 6, 7]  # 2 per group, first in the order within each group
    validate_plan(model, plan)
    with pytest.raises(PlanError, match="removal order"):
        plan_from_counts(sp, {1: [0, 1], 2: list(range(8))}, (2, 2))


def test_mutation_keeps_budget_and_limits():
    rng = np.random.Generator(np.random.PCG64(1))
    cfg = EvoConfig()
    for sp in (space(), space(step=2, budget=24), space(lo=1, hi=5, budget=20)):
        c = uniform_allocation(sp)
        changed = 0
        for _ in range(300):
            m = mutate(sp, c, cfg, rng)
            assert sp.is_valid(m)
            changed += m != c
            c = m
        assert changed > 200


def test_initial_population_uses_every_pattern_then_random():
    sp = space()
    cfg = EvoConfig(population=16)
    pop = initial_population(sp, cfg, np.random.Generator(np.random.PCG64(0)))
    assert len(pop) == 16 and pop[0] == uniform_allocation(sp)
    assert pop == initial_population(sp, cfg, np.random.Generator(np.random.PCG64(0)))


def test_same_seed_same_plan_and_history():
    sp = space()
    cfg = EvoConfig(population=12, generations=8, seed=3)
    a, b = (
        search_counts(sp, score_each(synthetic_score), cfg),
        search_counts(sp, score_each(synthetic_score), cfg),
    )
    assert a.best == b.best and a.history == b.history
    assert [h["best"] for h in a.history] == sorted(h["best"] for h in a.history)  # best-ever never drops
    assert a.best_score >= synthetic_score(uniform_allocation(sp))
    c = search_counts(sp, score_each(synthetic_score), EvoConfig(population=12, generations=8, seed=4))
    assert c.history != a.history


def test_uniform_and_given_counts():
    sp = space()
    assert uniform_allocation(sp) == (4,) * 6
    assert sp.check([6, 6, 6, 6, 0, 0]) == (6, 6, 6, 6, 0, 0)
    with pytest.raises(PlanError):
        sp.check([6, 6, 6, 6, 6, 6])


def test_real_search_is_deterministic():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 128, (4, 10), generator=torch.Generator().manual_seed(0))
    s = SearchSet.from_tensors(ids, batch_size=4)
    sp = AllocationSpace.from_layers(moe_layers(model), sparsity=0.5)
    order = {
        r.index: list(torch.randperm(8, generator=torch.Generator().manual_seed(r.index)).tolist())
        for r in sp.layers
    }
    cfg = EvoConfig(population=6, generations=3, seed=0)
    results = []
    for _ in range(2):
        ev = CandidateEvaluator(model, s, top_k=8)
        score = score_each(lambda c, ev=ev: ev.evaluate(plan_from_counts(sp, order, c)).score)
        results.append(search_counts(sp, score, cfg))
    assert results[0].best == results[1].best and results[0].history == results[1].history
