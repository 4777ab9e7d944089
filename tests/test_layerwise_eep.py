"""EEP layer by layer: merge plans and fewer active experts scored, searched and evaluated one decoder
layer at a time (the merged experts computed from each loaded layer) give what the model in memory
gives: ESAP of merge plans, the merge search's plan and history, logits, perplexity and multiple
choice of the merged model, and a whole run with evaluation and streamed surgery."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from moeprune import api
from moeprune.arch import moe_layers
from moeprune.evaluate.suite import read_jsonl
from moeprune.execute import LayerwiseModel, LocalExecutor, ScoreSpec, layerwise_evaluator
from moeprune.fitness import SearchSet, run_teacher
from moeprune.merge.active import set_active_experts_
from moeprune.merge.merging import LayerMerge, merge_experts_
from moeprune.pipelines.eep import merge_into_anchors
from moeprune.plan import ExpertPlan
from moeprune.recipe import Recipe
from moeprune.surgery import load
from moeprune.testbed import load_testbed, token_split
from moeprune.testbed import testbed_dirs as bundled_testbed
from test_layerwise import _approx, approx_tree, assert_same_evaluations, evaluations
from test_merging import random_merge
from tiny_models import tiny_model

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe"]


def search_set(samples: int = 6, length: int = 12) -> SearchSet:
    ids = torch.randint(3, 128, (samples, length), generator=torch.Generator().manual_seed(2))
    return SearchSet.from_tensors(ids, batch_size=4)


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_esap_of_merge_plans_equals_in_memory(family, tmp_path):
    """ESAP of merge plans (in lockstep, two sharing their first merged layer), with the model's top-k
    and with one active expert == the in-memory `Scorer` (merged weights written into the whole model);
    a plain plan routed to fewer experts too. Every layer goes back to the meta device after."""
    tiny_model(family).save_pretrained(tmp_path, max_shard_size="20KB")
    model, search = load(tmp_path), search_set()
    memory_teacher = run_teacher(model, search, cache="hidden")
    lm = LayerwiseModel(tmp_path)
    layers_teacher = lm.run_teacher(search, cache="hidden")
    plans = [random_merge(model, seed) for seed in (0, 1)]
    first = min(plans[0])
    plans.append({**plans[1], first: plans[0][first]})  # the same merge as plans[0] in the first layer
    m = plans[0][first]
    plans.append({**plans[0], first: LayerMerge(m.anchors, m.weights * 0.9)})  # same anchors, other M
    memory = LocalExecutor(model, memory_teacher)
    layers = LocalExecutor(lm, layers_teacher, layerwise_evaluator)
    for k in (None, 1):
        spec = ScoreSpec(reuse=False, active_experts=k, merged=True)
        want = [r.value for r in memory.score(spec, plans)]
        got = [r.value for r in layers.score(spec, plans)]
        assert got == pytest.approx(want, abs=1e-6)
        assert len(set(got)) == 4
    removed = ExpertPlan.from_kept(
        {i: m.anchors for i, m in plans[0].items()}, {x.index: x.num_experts for x in moe_layers(model)}
    )
    spec = ScoreSpec(active_experts=1)
    assert layers.score(spec, [removed])[0].value == pytest.approx(
        memory.score(spec, [removed])[0].value, abs=1e-6
    )
    shared = sum(e.shared_runs for e in layers.scorer.evaluators.values())
    assert shared >= 2, "plans with the same merge in their first MoE layer share it"
    assert all(p.is_meta for p in lm.model.parameters())
    assert lm.model.config.get_text_config().to_dict() == model.config.get_text_config().to_dict()


def test_layerwise_logits_of_a_merged_model_with_fewer_experts(tmp_path):
    """`LayerwiseModel.masked(merges, active_experts)` computes what the merged, structurally pruned
    model with fewer active experts computes; the originals and the top-k are back after."""
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    lm, plan = LayerwiseModel(tmp_path), random_merge(model, 3)
    ids = torch.randint(3, 128, (3, 10), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    (plain,) = lm.batch_logits([(ids, mask)])
    with lm.masked(plan, active_experts=1):
        (merged,) = lm.batch_logits([(ids, mask)])
    merge_experts_(model, plan)
    set_active_experts_(model, 1)
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).logits
    assert (merged - want).abs().max().item() <= 1e-5
    assert (merged - plain).abs().max().item() > 1e-4
    (again,) = lm.batch_logits([(ids, mask)])
    assert torch.equal(again, plain)


# --- the testbed -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed():
    model, tok, model_dir, data_dir = load_testbed()
    return model, tok, model_dir, data_dir, LayerwiseModel(model_dir, dtype="float32")


def test_layerwise_merge_search_gives_the_in_memory_plan_and_history(testbed):
    """EEP's merge search on the testbed, routing to one expert fewer (same seed): each iteration's
    merge plans in one stream; the same matrices, history and scores as in memory."""
    model, tok, _, data_dir, lm = testbed
    search = SearchSet.from_tokens(token_split(tok, data_dir / "search.jsonl", 2, 32))
    anchors = ExpertPlan.from_kept({i: range(0, 32, 2) for i in range(8)}, dict.fromkeys(range(8), 32))
    options = dict(population=4, iterations=2, seed=0, active_experts=3, progress=False, racing=False)
    memory = merge_into_anchors(model, run_teacher(model, search, cache="hidden"), anchors, **options)
    teacher = lm.run_teacher(search, cache="hidden")
    executor = LocalExecutor(lm, teacher, layerwise_evaluator)
    layers = merge_into_anchors(lm.model, teacher, anchors, executor=executor, **options)
    assert layers.history == [_approx(g) for g in memory.history]  # floats to 1e-7: test_layerwise.py
    assert layers.best.keys() == memory.best.keys()
    for i, m in memory.best.items():
        assert layers.best[i].anchors == m.anchors and torch.equal(layers.best[i].weights, m.weights)
    assert layers.best_score == pytest.approx(memory.best_score, abs=1e-7)
    assert layers.evaluations == sum(e.stats.evaluations for e in executor.scorer.evaluators.values())


def test_layerwise_perplexity_and_multiple_choice_of_a_merge(testbed):
    """Perplexity and multiple choice of the merged model with fewer active experts, layer by layer
    == in memory with the merged weights, the non-anchors masked and the top-k lowered."""
    from moeprune.merge.active import reduced_active_experts
    from moeprune.merge.merging import expert_plan, merged_weights
    from moeprune.surgery import mask_experts

    model, tok, _, data_dir, lm = testbed
    plan = random_merge(model, 5)
    rows = read_jsonl(data_dir / "test.jsonl")[:20]
    items = read_jsonl(data_dir / "multiple_choice.jsonl")[:8]
    with reduced_active_experts(model, 3), merged_weights(model, plan):
        with mask_experts(model, expert_plan(model, plan)):  # the masked routers take the lower top-k
            in_memory = evaluations(model, tok, rows, items, max_tokens_per_domain=300, seq_len=64)
    with lm.masked(plan, active_experts=3):
        assert_same_evaluations(
            evaluations(lm, tok, rows, items, max_tokens_per_domain=300, seq_len=64), in_memory
        )


# --- recipe, CLI and a whole run ---------------------------------------------------------------------


def test_recipe_takes_eep_merging_and_fewer_experts_layer_by_layer():
    spec = {
        "model": "m", "out": "o", "allocation": "eep", "sparsity": 0.5, "search": {"data": {"data": "s.jsonl"}},
        "device": "layers", "eep": {"merge_iterations": 3, "active_experts": 1},
    }  # fmt: skip
    r = Recipe.build(spec)
    assert (r.mode, r.eep.merge_iterations, r.eep.active_experts) == ("layers", 3, 1)


def test_eep_merge_run_in_mode_layers_equals_the_in_memory_run(testbed, tmp_path, capsys, monkeypatch):
    """EEP with merging and fewer active experts in mode layers (selection and merge searches layer by
    layer, held-out ESAP of the merged result, streamed merging surgery) == the same run in memory:
    merges, histories, evaluation, and the checkpoint's tensors and config; mode auto goes layer by
    layer by itself when the model does not fit."""
    _, _, model_dir, data_dir, _ = testbed
    search = {"data": str(data_dir / "search.jsonl"), "samples": 2, "seq_len": 32}
    options = dict(sparsity=0.5, population=4, iterations=2, merge_population=3, merge_iterations=2)
    options |= dict(active_experts=3, dtype="float32", racing=False, search_data=search, progress=False)
    options |= dict(evaluate={"suite": None, "heldout": search | {"seed": 7}, "baselines": True})
    memory = api.eep(model_dir, tmp_path / "memory", mode="memory", **options)
    layers = api.eep(model_dir, tmp_path / "layers", device="layers", **options)
    assert layers.kept == memory.kept
    assert layers.evaluation.keys() == memory.evaluation.keys() == {"unpruned", "EEP"}
    for name, column in memory.evaluation.items():
        assert layers.evaluation[name]["heldout_esap"] == pytest.approx(column["heldout_esap"], abs=1e-5)
    dirs = {"memory": tmp_path / "memory", "layers": tmp_path / "layers"}
    for name in ("merging.json", "eep_history.json"):  # floats to 1e-7 (test_layerwise.py)
        assert json.loads((dirs["layers"] / name).read_text()) == approx_tree(
            json.loads((dirs["memory"] / name).read_text())
        )
    assert json.loads((dirs["layers"] / "moeprune.json").read_text())["surgery"] == "streamed"
    config, want_config = (json.loads((d / "config.json").read_text()) for d in dirs.values())
    assert config["num_experts_per_tok"] == want_config["num_experts_per_tok"] == 3
    assert config["num_experts"] == want_config["num_experts"] == 16
    got, want = (
        {k: v for f in d.glob("*.safetensors") for k, v in load_file(f).items()} for d in dirs.values()
    )
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.allclose(got[k].float(), v.float(), rtol=1e-2, atol=1e-3), k
    capsys.readouterr()
    monkeypatch.setenv("MOEPRUNE_MEMORY_BUDGET", "1MB")
    options |= dict(evaluate=None)
    api.eep(model_dir, tmp_path / "auto", **options)
    assert "running it layer by layer" in capsys.readouterr().err
    for name in ("merging.json", "eep_history.json"):
        assert (tmp_path / "auto" / name).read_text() == (dirs["layers"] / name).read_text()


def test_cli_eep_prune_merges_with_device_layers(run_cli, tmp_path):
    model_dir, data_dir = bundled_testbed()
    args = ["eep-prune", model_dir, "--sparsity", "0.5", "--search-data", data_dir / "search.jsonl"]
    args += ["--search-samples", "1", "--search-seq-len", "16", "--population", "4", "--iterations", "1"]
    args += ["--merge-population", "3", "--merge-iterations", "1", "--active-experts", "3"]
    code, _, err = run_cli(*args, "--device", "layers", "--out", tmp_path / "out")
    assert code == 0, err
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_experts_per_tok"] == 3
    assert (tmp_path / "out" / "merging.json").exists()
