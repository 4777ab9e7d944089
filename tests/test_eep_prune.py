"""EEP prune phase: a seeded evolutionary search over which experts each layer keeps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeprune import api
from moeprune.arch import moe_layers
from moeprune.errors import MoepruneError
from moeprune.evolve import score_each
from moeprune.fitness import CandidateEvaluator, SearchSet
from moeprune.merge import EEPConfig, layer_choices, search_selections
from moeprune.merge.selection_search import mutate
from tiny_models import tiny_model
from tiny_tokenizer import TEXT, save_tiny_checkpoint


def search_set(seed: int = 0) -> SearchSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (4, 12), generator=g)
    return SearchSet.from_tensors(ids, torch.ones_like(ids), batch_size=2)


@pytest.fixture(scope="module")
def qwen():
    return tiny_model("qwen3_moe")


def test_mutation_keeps_counts_and_groups():
    model = tiny_model("deepseek_v3")
    layers = moe_layers(model)
    keep = {layer.index: layer.num_experts // 2 for layer in layers}
    choices = layer_choices(layers, keep)
    rng = np.random.Generator(np.random.PCG64(0))
    sel = tuple(c.random(rng) for c in choices)
    for _ in range(50):
        child = mutate(choices, sel, 0.15, rng)
        assert child != sel  # at least one slot moves
        for c, kept in zip(choices, child, strict=True):
            assert len(set(kept)) == c.keep
            per_group = [sum(c.group_of(e) == g for e in kept) for g in range(c.num_groups)]
            assert per_group == [c.keep // c.num_groups] * c.num_groups
        sel = child


def test_search_is_seeded_and_never_loses_its_seed(qwen):
    s = search_set()
    ev = CandidateEvaluator(qwen, s, cache="dense")
    layers = moe_layers(qwen)
    choices = layer_choices(layers, {layer.index: layer.num_experts // 2 for layer in layers})
    seed_plan = api.ExpertPlan.from_removed({c.index: list(range(c.num_experts // 2)) for c in choices})

    def run(seed: int):
        return search_selections(
            choices,
            score_each(lambda plan: ev.evaluate(plan).score),
            EEPConfig(population=6, iterations=4, seed=seed),
            seeds=[seed_plan],
        )

    a, b, c = run(0), run(0), run(1)
    assert a.best == b.best and a.history == b.history
    assert a.best_score >= ev.evaluate(seed_plan).score  # elitism: the seed is in the population
    assert [h["best"] for h in a.history] == sorted(h["best"] for h in a.history)
    assert a.best_score == pytest.approx(ev.evaluate(a.best).score, abs=1e-12)
    assert a.history != c.history
    for layer in layers:
        assert len(a.best.removed[layer.index]) == layer.num_experts // 2


def test_api_eep_prune_uniform_sparsity(qwen):
    result = api.eep_prune(qwen, search_set(), sparsity=0.5, population=4, iterations=2, progress=False)
    assert {len(v) for v in result.best.removed.values()} == {4}  # 8 experts per layer, half removed
    assert result.evaluations <= 4 + 3 * 1 + 1
    with pytest.raises(MoepruneError, match="exactly one"):
        api.eep_prune(qwen, search_set(), progress=False)
    with pytest.raises(MoepruneError, match="cannot keep"):
        api.eep_prune(qwen, search_set(), removed_per_layer={0: 8}, progress=False)


def test_stacked_candidates_give_the_same_eep_search(qwen):
    """candidate_batch 3 (stacked, here with 3 active experts) finds what one-at-a-time finds."""
    runs = [
        api.eep_prune(
            qwen,
            search_set(),
            sparsity=0.5,
            population=5,
            iterations=3,
            active_experts=3,
            progress=False,
            candidate_batch=c,
        )  # fmt: skip
        for c in (1, 3)
    ]
    assert runs[0].best == runs[1].best and runs[0].evaluations == runs[1].evaluations
    assert runs[0].best_score == pytest.approx(runs[1].best_score, abs=1e-5)


def test_cli_eep_prune_writes_checkpoint(run_cli, tmp_path):
    from transformers import AutoConfig

    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "out"
    args = (
        "eep-prune", tmp_path / "model", "--sparsity", "0.5", "--search-data", tmp_path / "text.txt",
        "--out", out, "--population", "4", "--iterations", "2", "--search-samples", "2",
        "--search-seq-len", "32",
    )  # fmt: skip
    code, _, err = run_cli(*args, "--criterion", "frequency", "--data", tmp_path / "text.txt",
                           "--num-samples", "4", "--seq-len", "32", "--cache", "dense",
                           "--candidate-batch", "2")  # fmt: skip
    assert code == 0, err
    assert AutoConfig.from_pretrained(out).num_experts == 4  # uniform: a stock checkpoint
    manifest = json.loads((out / "moeprune.json").read_text())
    assert manifest["selection"] == "eep_prune" and (out / "eep_history.json").exists()
    assert "selection: `eep_prune`" in (out / "README.md").read_text()
    bad = ("eep-prune", tmp_path / "model", "--sparsity", "0.5", "--search-data", tmp_path / "text.txt",
           "--out", tmp_path / "o2", "--criterion", "frequency")  # fmt: skip
    code, _, err = run_cli(*bad)
    assert code == 2 and "a criterion needs calibration data" in err and len(err.strip().splitlines()) == 1
    for extra, needle in ((("--cache", "dens"), "did you mean 'dense'"), (("--top-k", "0"), "--top-k")):
        code, _, err = run_cli(*args[:6], "--out", tmp_path / "o3", *extra)
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "o3").exists()


def test_cli_eep_merge_and_active_experts(run_cli, tmp_path):
    """--merge-iterations and --active-experts: merged experts folded in, top-k lowered, both recorded."""
    from transformers import AutoConfig

    model = tiny_model("qwen3_moe")
    top_k = model.config.num_experts_per_tok
    save_tiny_checkpoint(tmp_path / "model", model)
    (tmp_path / "text.txt").write_text(TEXT)
    out = tmp_path / "out"
    code, _, err = run_cli(
        "eep-prune", tmp_path / "model", "--sparsity", "0.5", "--search-data", tmp_path / "text.txt",
        "--out", out, "--population", "6", "--iterations", "1", "--search-samples", "2",
        "--search-seq-len", "32", "--merge-iterations", "2", "--merge-population", "6",
        "--active-experts", str(top_k - 1),
    )  # fmt: skip
    assert code == 0, err
    config = AutoConfig.from_pretrained(out)
    assert config.num_experts == 4 and config.num_experts_per_tok == top_k - 1
    manifest = json.loads((out / "moeprune.json").read_text())
    assert manifest["selection"] == "eep_prune + eep_merge" and manifest["active_experts"] == top_k - 1
    merging = json.loads((out / "merging.json").read_text())
    assert set(merging) == {"0", "1", "2"} and len(merging["0"]["M"]) == 4
    history = json.loads((out / "eep_history.json").read_text())
    assert history["merge"]["evaluations"] >= 3
