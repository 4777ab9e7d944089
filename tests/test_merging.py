"""Expert merging: masked evaluation with merged weights == merge + structural removal == reload."""

from __future__ import annotations

import copy

import pytest
import torch

from moeprune.arch import moe_layers
from moeprune.merge.merging import LayerMerge, expert_plan, merge_experts_, merged_weights
from moeprune.surgery import load, mask_experts, remove_experts_, save_pruned
from tiny_models import tiny_model


def random_merge(model, seed: int = 0) -> dict[int, LayerMerge]:
    """Half the experts of each layer (equal per group) as anchors, M = one-hot + dense noise."""
    g = torch.Generator().manual_seed(seed)
    plan = {}
    for layer in moe_layers(model):
        size = layer.num_experts // layer.num_groups
        keep = max(size // 2, -(-layer.top_k // layer.topk_groups))
        anchors = sorted(
            grp * size + int(i)
            for grp in range(layer.num_groups)
            for i in torch.randperm(size, generator=g)[:keep]
        )
        m = LayerMerge.one_hot(tuple(anchors), layer.num_experts).weights
        m = m + 0.3 * torch.rand(m.shape, generator=g, dtype=torch.float64)
        plan[layer.index] = LayerMerge(tuple(anchors), m)
    return plan


def logits(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe"])
def test_merged_masked_equals_structural_equals_reloaded(family, tmp_path):
    model = tiny_model(family)
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(1))
    full = logits(model, ids)
    plan = random_merge(model)
    with merged_weights(model, plan), mask_experts(model, expert_plan(model, plan)):
        masked = logits(model, ids)
    assert torch.equal(logits(model, ids), full), "the original weights must be back"
    merged = copy.deepcopy(model)
    merge_experts_(merged, plan)
    structural = logits(merged, ids)
    torch.testing.assert_close(masked, structural, rtol=0, atol=1e-5)
    out = save_pruned(merged, tmp_path / "out", manifest={})
    torch.testing.assert_close(logits(load(out), ids), structural, rtol=0, atol=1e-5)
    # merging differs from pruning the same anchors
    pruned = copy.deepcopy(model)
    remove_experts_(pruned, expert_plan(model, plan))
    assert (logits(pruned, ids) - structural).abs().max() > 1e-4


def test_one_hot_merge_is_pruning():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 100, (2, 10), generator=torch.Generator().manual_seed(2))
    plan = {i: LayerMerge.one_hot(m.anchors, 8) for i, m in random_merge(model).items()}
    merged, pruned = copy.deepcopy(model), copy.deepcopy(model)
    merge_experts_(merged, plan)
    remove_experts_(pruned, expert_plan(model, plan))
    torch.testing.assert_close(logits(merged, ids), logits(pruned, ids), rtol=0, atol=1e-6)


def test_merge_search_never_ends_below_pruning():
    from moeprune import api
    from moeprune.fitness import CandidateEvaluator, SearchSet
    from moeprune.merge.merging import expert_plan as removal

    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 100, (4, 12), generator=torch.Generator().manual_seed(3))
    s = SearchSet.from_tensors(ids, torch.ones_like(ids), batch_size=2)
    anchors = removal(model, random_merge(model))
    a = api.eep_merge(model, s, anchors, population=4, iterations=3, progress=False)
    b = api.eep_merge(model, s, anchors, population=4, iterations=3, progress=False)
    assert a.best_score == b.best_score and a.history == b.history  # seeded
    pruned_score = CandidateEvaluator(model, s, cache="hidden").evaluate(anchors).score  # the default
    assert a.start_score == pytest.approx(pruned_score, abs=1e-9)  # the one-hot start is plain pruning
    assert a.best_score >= a.start_score
    assert a.evaluations == 4 + 2 * 2  # population, then 2 children per iteration (2 elites)
    assert set(a.best) == {layer.index for layer in moe_layers(model)}
