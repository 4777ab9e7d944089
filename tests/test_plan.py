"""The one rule set of `moeprune.plan`: layer bounds and the one meaning of "uniform" everywhere."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from moeprune import api
from moeprune.allocate import AllocationSpace, EvoConfig, initial_population, uniform_allocation
from moeprune.arch import moe_layers
from moeprune.errors import PlanError
from moeprune.fitness import SearchSet
from moeprune.merge import layer_choices
from moeprune.observe import observe
from moeprune.plan import (
    ExpertPlan,
    LayerBounds,
    layer_bounds,
    max_active_experts,
    uniform_counts,
    validate_plan,
)
from tiny_models import FAMILIES, tiny_model

SPARSITIES = (0.25, 0.3, 0.5, 0.75, 0.9)


def layer(index=0, experts=8, top_k=2, groups=1, topk_groups=1):
    return SimpleNamespace(
        index=index, num_experts=experts, top_k=top_k, num_groups=groups, topk_groups=topk_groups
    )


def test_layer_bounds_rules():
    assert layer_bounds(layer()) == LayerBounds(0, 8, 1, 0, 6)
    # 2 groups of 4, top-2 from 1 group: the selected group keeps >= 2, so each group loses <= 2
    b = layer_bounds(layer(experts=8, groups=2, topk_groups=1))
    assert (b.step, b.max_remove) == (2, 4)
    assert [n for n in range(9) if b.allows(n)] == [0, 2, 4]
    assert [b.group_of(e) for e in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    # 8 groups of 32, top-8 from 4 groups: each selected group keeps >= 2
    assert layer_bounds(layer(experts=256, top_k=8, groups=8, topk_groups=4)).max_remove == 8 * 30
    assert max_active_experts(layer(experts=256, top_k=8, groups=8, topk_groups=4)) == 128
    narrowed = layer_bounds(layer(groups=2), min_remove=1, max_remove=3)  # rounded inwards to the step
    assert (narrowed.min_remove, narrowed.max_remove) == (2, 2)
    with pytest.raises(PlanError, match="no valid removal count"):
        layer_bounds(layer(), min_remove=7)
    with pytest.raises(PlanError, match="multiple of 2"):
        b.check(3)
    with pytest.raises(PlanError, match="remove 0..4"):
        b.check(6)


def test_uniform_counts_per_layer():
    three = [layer(i) for i in range(3)]
    assert uniform_counts(three, 0.3) == {0: 2, 1: 2, 2: 2}  # round(2.4) per layer, not spread from 7.2
    assert uniform_counts([layer(experts=8, groups=2)], 0.3) == {0: 2}
    assert uniform_counts([layer(experts=8, groups=2)], 0.9) == {0: 4}  # capped by the groups
    assert uniform_counts([layer(experts=4, top_k=2)], 0.5) == {0: 2}  # 2.0 + half up
    assert uniform_counts([layer(experts=5, top_k=1)], 0.5) == {0: 3}  # 2.5 -> 3 (half up)
    assert uniform_counts({3: layer(3)}, 0.5) == {3: 4}  # a mapping of layers (ExpertStats.layers)
    with pytest.raises(PlanError, match=r"\[0, 1\)"):
        uniform_counts(three, 1.0)


def test_validate_plan_follows_the_bounds():
    model = tiny_model("deepseek_v3")  # 2 groups of 4, top-2 from 1 group
    for lay in moe_layers(model):
        b = layer_bounds(lay)
        for n in range(0, 9):
            per_group = n // 2
            removed = list(range(per_group)) + list(range(4, 4 + n - per_group))
            ok = b.allows(n)
            try:
                validate_plan(model, ExpertPlan.from_removed({lay.index: removed}))
            except PlanError:
                assert not ok, n
            else:
                assert ok, n


def search_data() -> SearchSet:
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    return SearchSet.from_tensors(ids, batch_size=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_uniform_is_the_same_plan_everywhere(family):
    """`criteria`'s uniform plan, the EvoESAP search's uniform baseline (and its budget) and EEP's
    removal per layer agree, for every family and several sparsities."""
    from test_criteria import calibration

    model = tiny_model(family)
    layers = moe_layers(model)
    stats = observe(model, calibration(samples=2), progress=False)
    for sparsity in SPARSITIES:
        criterion = api.criterion_plan(stats, "frequency", sparsity=sparsity)
        by_criterion = {i: len(criterion.removed.get(i, ())) for i in stats.layers}
        space = AllocationSpace.from_layers(layers, sparsity=sparsity)
        baseline = dict(zip([b.index for b in space.layers], uniform_allocation(space), strict=True))
        first = initial_population(space, EvoConfig(population=2), _rng())[0]
        eep = api.eep_prune(
            model, search_data(), sparsity=sparsity, population=4, iterations=1, progress=False
        )
        by_eep = {lay.index: len(eep.best.removed.get(lay.index, ())) for lay in layers}
        assert by_criterion == baseline == by_eep == uniform_counts(layers, sparsity), (family, sparsity)
        assert space.budget == sum(baseline.values())
        assert first == tuple(baseline.values())
        layer_choices(layers, {b.index: b.num_experts - baseline[b.index] for b in space.layers})


def _rng() -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(0))


def test_testbed_budget_is_the_sum_of_uniform_counts():
    """On the bundled testbed (8 layers x 32 experts, top-4) s = 0.3 removes round(9.6) = 10 per
    layer: B = 80 (a global round(0.3 * 256) would be 77, not a uniform plan)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from moeprune.testbed import testbed_dirs

    with torch.device("meta"):  # the layers' shapes are all that is needed
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(testbed_dirs()[0]))
    layers = moe_layers(model)
    for sparsity, per_layer in ((0.25, 8), (0.3, 10), (0.5, 16)):
        space = AllocationSpace.from_layers(layers, sparsity=sparsity)
        assert space.uniform == (per_layer,) * len(layers)
        assert space.budget == per_layer * len(layers)
