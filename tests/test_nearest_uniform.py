"""nearest_uniform: a searched (non-uniform) plan -> the nearest plan with one expert count per layer."""

from __future__ import annotations

import itertools
import json
import random

import pytest
from transformers import AutoConfig

from moeprune.allocate.nearest_uniform import (
    check_order,
    nearest_uniform,
    plan_distance,
    run_order,
    run_plan,
    uniform_count,
)
from moeprune.errors import PlanError
from moeprune.surgery import ExpertPlan

ORDER = {0: [5, 2, 7, 0, 1, 3, 6, 4], 1: [3, 4, 0, 6, 1, 7, 2, 5], 2: [1, 0, 2, 3, 4, 5, 6, 7]}


def prefix_plan(order, counts):
    return ExpertPlan.from_removed({i: order[i][:n] for i, n in counts.items() if n})


def test_a_uniform_plan_is_its_own_nearest():
    searched = prefix_plan(ORDER, {0: 3, 1: 3, 2: 3})
    assert nearest_uniform(searched, ORDER) == searched


def test_non_uniform_prefix_plan_maps_to_the_order_prefix_at_the_mean_count():
    searched = prefix_plan(ORDER, {0: 1, 1: 5, 2: 3})  # 9 removed over 3 layers -> 3 each
    got = nearest_uniform(searched, ORDER)
    assert got == prefix_plan(ORDER, {0: 3, 1: 3, 2: 3})
    assert got.total_removed() == searched.total_removed()
    assert plan_distance(got, searched) == 2 + 2 + 0
    assert set(searched.removed[0]) < set(got.removed[0])  # must lose more: all searched + more
    assert set(got.removed[1]) < set(searched.removed[1])  # must lose fewer: a subset


def test_total_not_divisible_rounds_halves_up_and_otherwise_to_the_nearest():
    # 10 removed over 3 layers: 3.33 -> 3 each (total 9, the nearest reachable)
    assert uniform_count(prefix_plan(ORDER, {0: 2, 1: 4, 2: 4}), {i: 8 for i in ORDER}) == 8 - 3
    # 3 removed over 2 layers: 1.5 -> a tie between 1 and 2 each; halves round up (2), as uniform_counts
    two = {0: ORDER[0], 1: ORDER[1]}
    assert uniform_count(prefix_plan(two, {0: 1, 1: 2}), {0: 8, 1: 8}) == 8 - 2


def _all_uniform_plans(order, k):
    per_layer = [list(itertools.combinations(sorted(ids), len(ids) - k)) for ids in order.values()]
    for combo in itertools.product(*per_layer):
        yield dict(zip(order, combo, strict=True))


@pytest.mark.parametrize("seed", range(12))
def test_minimal_symmetric_difference_against_brute_force(seed):
    """Any searched plan (not only order prefixes): no uniform plan with the same count is nearer."""
    rng = random.Random(seed)
    order = {i: rng.sample(range(6), 6) for i in range(3)}
    searched = {i: rng.sample(range(6), rng.randint(0, 4)) for i in range(3)}
    got = nearest_uniform(searched, order, max_remove={i: 4 for i in range(3)})
    k = 6 - len(next(iter(got.removed.values()), ()))
    assert all(len(v) == 6 - k for v in got.removed.values()) and len(got.removed) in (0, 3)
    best = min(plan_distance(p, searched) for p in _all_uniform_plans(order, k))
    assert plan_distance(got, searched) == best == sum(abs((6 - k) - len(v)) for v in searched.values())


def test_group_limited_router_loses_the_same_number_in_every_group():
    order = {0: [1, 6, 0, 7, 2, 5, 3, 4], 1: [4, 0, 5, 1, 6, 2, 7, 3]}  # groups {0..3}, {4..7}
    groups = {0: 2, 1: 2}
    searched = {0: [1, 6], 1: [4, 0, 5, 1, 6, 2]}  # 1 and 3 per group -> 2 per group
    check_order(searched, order, groups)
    got = nearest_uniform(searched, order, groups=groups)
    for removed in got.removed.values():
        assert len([e for e in removed if e < 4]) == len([e for e in removed if e >= 4]) == 2
    assert set(searched[0]) < set(got.removed[0]) and set(got.removed[1]) < set(searched[1])
    assert plan_distance(got, searched) == 2 + 2


def test_layer_limits_push_the_count():
    # layer 0 may lose at most 3 (its top_k must stay): the mean 5 is impossible, so every layer loses 3
    got = nearest_uniform(
        prefix_plan(ORDER, {0: 3, 1: 7}), {0: ORDER[0], 1: ORDER[1]}, max_remove={0: 3, 1: 7}
    )
    assert {i: len(v) for i, v in got.removed.items()} == {0: 3, 1: 3}


def test_layers_the_plan_leaves_alone_take_part():
    got = nearest_uniform({1: ORDER[1][:6]}, ORDER)  # 6 removed over 3 layers -> 2 each
    assert {i: len(v) for i, v in got.removed.items()} == {0: 2, 1: 2, 2: 2}


@pytest.mark.parametrize(
    "searched, order, needle",
    [
        ({0: [1]}, {0: [0, 1, 1, 3]}, "each of its 4 experts once"),
        ({3: [1]}, {0: [0, 1, 2, 3]}, "layers [3]"),
        ({0: [9]}, {0: [0, 1, 2, 3]}, "out of range"),
        ({0: [1, 1]}, {0: [0, 1, 2, 3]}, "repeat"),
    ],
)
def test_bad_input_is_a_plan_error(searched, order, needle):
    with pytest.raises(PlanError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        nearest_uniform(searched, order)


def test_no_common_count_is_a_plan_error():
    # 2 groups in layer 0 (even removals only) and at most 1 removal in layer 1: only K = E works
    assert uniform_count({0: [0, 4]}, {0: 8, 1: 8}, groups={0: 2}, max_remove={1: 1}) == 8
    with pytest.raises(PlanError, match="no expert count"):
        uniform_count({0: [0, 4]}, {0: 8, 1: 7}, groups={0: 2}, max_remove={1: 0})


def test_check_order_rejects_an_order_the_search_did_not_use():
    searched = prefix_plan(ORDER, {0: 2, 1: 4})
    check_order(searched, ORDER)
    with pytest.raises(PlanError, match="layer 0"):
        check_order(searched, {**ORDER, 0: list(reversed(ORDER[0]))})


def test_run_files(tmp_path):
    (tmp_path / "plan.json").write_text(json.dumps({"counts_removed": {"0": 2}, "removed": {"0": [5, 2]}}))
    assert run_plan(tmp_path) == ExpertPlan.from_removed({0: [5, 2]})
    assert run_order(tmp_path) is None
    (tmp_path / "removal_order.json").write_text(
        json.dumps({"criterion": "frequency", "order": {"0": ORDER[0]}})
    )
    assert run_order(tmp_path) == {0: ORDER[0]}


def test_cli_prune_uniform_from(run_cli, tiny_dir, tmp_path):
    """`moeprune prune --uniform-from RUN` writes a stock (uniform) checkpoint of the nearest plan."""
    src = tiny_dir("qwen3_moe")
    order = {0: [5, 2, 7, 0, 1, 3, 6, 4], 1: [3, 4, 0, 6, 1, 7, 2, 5], 2: [1, 0, 2, 3, 4, 5, 6, 7]}
    run = tmp_path / "run"
    run.mkdir()
    searched = prefix_plan(order, {0: 1, 1: 4, 2: 4})  # 9 -> 3 per layer
    (run / "plan.json").write_text(json.dumps(searched.to_dict()))
    code, _, err = run_cli("prune", src, "--uniform-from", run, "--out", tmp_path / "out")
    assert code == 2 and "removal_order.json" in err and not (tmp_path / "out").exists()  # no order saved
    (run / "removal_order.json").write_text(json.dumps({"criterion": "frequency", "order": order}))
    code, _, err = run_cli("prune", src, "--uniform-from", run, "--out", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "moeprune.json").read_text())
    assert {i: sorted(v) for i, v in manifest["removed"].items()} == {
        str(i): sorted(v[:3]) for i, v in order.items()
    }
    config = AutoConfig.from_pretrained(tmp_path / "out")
    assert config.num_experts == 5 and getattr(config, "num_experts_per_layer", None) is None
    code, _, err = run_cli("prune", src, "--uniform-from", run, "--sparsity", "0.5", "--out", tmp_path / "o2")
    assert code == 2 and "--uniform-from" in err


def test_cli_uniform_from_a_real_search(run_cli, tmp_path):
    """A search's run directory holds its removal order (removal_order.json): `prune --uniform-from`
    writes the stock-loadable nearest uniform plan, checked against the searched plan."""
    from tiny_tokenizer import TEXT, save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "calib.txt").write_text(TEXT)
    (tmp_path / "search.txt").write_text(TEXT[::-1])
    calib = ("--data", tmp_path / "calib.txt", "--num-samples", "4", "--seq-len", "32")
    code, _, err = run_cli(
        "search", tmp_path / "model", "--criterion", "frequency", "--sparsity", "0.5", *calib,
        "--search-data", tmp_path / "search.txt", "--out", tmp_path / "run", "--population", "6",
        "--generations", "2", "--search-samples", "2", "--search-seq-len", "32",
    )  # fmt: skip
    assert code == 0, err
    searched = run_plan(tmp_path / "run")
    assert run_order(tmp_path / "run") is not None
    code, _, err = run_cli(
        "prune", tmp_path / "model", "--uniform-from", tmp_path / "run", "--out", tmp_path / "u"
    )
    assert code == 0, err
    removed = json.loads((tmp_path / "u" / "moeprune.json").read_text())["removed"]
    assert sorted(len(v) for v in removed.values()) == [4, 4, 4]  # 12 of 24 -> 4 per layer
    assert plan_distance(ExpertPlan.from_removed(removed), searched) == sum(
        abs(4 - len(searched.removed.get(i, ()))) for i in range(3)
    )
    assert getattr(AutoConfig.from_pretrained(tmp_path / "u"), "num_experts_per_layer", None) is None
