"""Candidate executors without Ray: the local executor scores as the evaluator does, the teacher run
travels without the model, the scheduler follows cached prefixes and balances load."""

from __future__ import annotations

import os
import pickle
import platform
import subprocess
import sys
from pathlib import Path

import torch

from moeprune.arch import moe_layers
from moeprune.execute import AffinityScheduler, LocalExecutor, ScoreSpec, prefix_keys
from moeprune.execute.ray_executor import portable
from moeprune.fitness import CandidateEvaluator, SearchSet, run_teacher
from moeprune.merge.merging import LayerMerge, expert_plan, merged_weights
from moeprune.plan import ExpertPlan
from tiny_models import tiny_model


def _setup():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    return model, run_teacher(model, SearchSet.from_tensors(ids, batch_size=2), top_k=16)


def test_local_executor_scores_as_the_evaluator():
    model, teacher = _setup()
    layers = [layer.index for layer in moe_layers(model)]
    plans = [
        ExpertPlan.from_removed({i: [(i + k) % 8, (i + 2 * k + 1) % 8] for i in layers}) for k in range(4)
    ]
    direct = CandidateEvaluator(model, teacher)
    local = LocalExecutor(model, teacher)
    assert [r.score for r in local.score(ScoreSpec(), plans)] == [direct.evaluate(p).score for p in plans]
    assert local.reuse(ScoreSpec())["evaluations"] == 4
    # a merge candidate: merged weights written into the anchors, the others masked
    merge = {i: LayerMerge.one_hot((0, 2, 5), 8) for i in layers}
    merge[layers[0]] = LayerMerge((0, 2, 5), torch.full((3, 8), 1 / 8, dtype=torch.float64))
    with merged_weights(model, merge):
        want = CandidateEvaluator(model, teacher, reuse=False).evaluate(expert_plan(model, merge)).score
    assert local.score(ScoreSpec(reuse=False, merged=True), [merge])[0].score == want


def test_teacher_run_travels_without_the_model():
    model, teacher = _setup()
    light = portable(teacher)
    assert light.replay is None and teacher.replay is not None
    data = pickle.dumps(light)
    assert len(data) < 200_000  # the records and the top-K cache, no weights
    back = pickle.loads(data)
    assert torch.equal(back.records[0].layer0_input, teacher.records[0].layer0_input)
    assert torch.equal(back.cache.slices[0].top_probs, teacher.cache.slices[0].top_probs)


def test_keep_heap_takes_on_glibc():
    """The actors' malloc settings apply (in a subprocess: this one's allocator is left alone) and
    scores computed after them are the same, bit for bit (one thread, as conftest sets here)."""
    code = (
        "import torch; from moeprune.execute.ray_executor import keep_heap; ok = keep_heap(); "
        "torch.set_num_threads(1); from test_execute import _score; print(ok, _score().hex())"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    ok, score = out.decode().split()
    assert ok == str(platform.libc_ver()[0] == "glibc")
    assert float.fromhex(score) == _score()


def _score() -> float:
    model, teacher = _setup()
    plan = ExpertPlan.from_removed({layer.index: [1, 6] for layer in moe_layers(model)})
    return LocalExecutor(model, teacher).score(ScoreSpec(), [plan])[0].score


def test_scheduler_follows_prefixes_and_balances():
    moe = [0, 1, 2, 3]
    parent_a = ExpertPlan.from_removed({0: [1], 1: [2], 2: [3], 3: [4]})
    parent_b = ExpertPlan.from_removed({0: [5], 1: [6], 2: [7], 3: [0]})
    child_a = ExpertPlan.from_removed({0: [1], 1: [2], 2: [3], 3: [6]})  # shares 3 layers with parent_a
    child_b = ExpertPlan.from_removed({0: [5], 1: [6], 2: [1], 3: [0]})  # shares 2 with parent_b
    s = AffinityScheduler(2)
    s.held[0].update(prefix_keys(parent_a, moe))
    s.held[1].update(prefix_keys(parent_b, moe))
    keys = [prefix_keys(p, moe) for p in (child_b, child_a)]
    assert s.depth(0, keys[1]) == 4 and s.depth(1, keys[0]) == 3
    assert s.take(0, [0, 1], keys, 1) == [1]  # worker 0 takes the child of its parent
    assert s.take(1, [0], keys, 1) == [0]
    # without any cached prefix, a free worker takes what no other worker holds, then population order
    s.forget(0)
    fresh = [prefix_keys(ExpertPlan.from_removed({0: [e]}), moe) for e in (5, 3, 4)]
    assert s.take(0, [0, 1, 2], fresh, 2) == [1, 2]
