"""The evolutionary engine: score cache, one history schema, checkpoint/resume bit for bit for all
three problems (EvoESAP counts, EEP selections, EEP merging matrices), settings checked on resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from moeprune.allocate import AllocationSpace, CountsProblem, EvoConfig
from moeprune.errors import MoepruneError
from moeprune.evolve import EvolutionConfig, evolve, score_each
from moeprune.merge import EEPConfig, MergeConfig, MergeProblem, SelectionProblem, layer_choices
from moeprune.merge.selection_search import from_plan
from moeprune.plan import ExpertPlan, layer_bounds

HISTORY_FIELDS = {
    "generation", "best", "population_best", "median", "new_evaluations", "evaluations", "tokens_scored", "raced_out",
}  # fmt: skip


def layer(index: int, experts: int = 8, groups: int = 1):
    return SimpleNamespace(index=index, num_experts=experts, top_k=2, num_groups=groups, topk_groups=1)


def _noise(key: str) -> float:
    """A deterministic score in [0, 1) from a candidate's key."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 2**32


# --- the three problems with synthetic (fast, deterministic) fitness functions -------------------
def counts_case():
    space = AllocationSpace.from_layers([layer(i) for i in range(6)], sparsity=0.5)
    cfg = EvoConfig(population=8, generations=7, elites=3, seed=11, checkpoint_every=1)
    problem = CountsProblem(space, cfg)

    def score(counts):
        return -sum((n - (1 + i)) ** 2 for i, n in enumerate(counts)) + _noise(problem.key(counts))

    return problem, score_each(score), cfg.evolution()


def selection_case():
    layers = [layer(0), layer(1, groups=2), layer(2)]
    choices = tuple(layer_choices(layers, {0: 4, 1: 4, 2: 6}))
    seed_plan = ExpertPlan.from_removed({0: [0, 1, 2, 3], 1: [0, 1, 4, 5], 2: [6, 7]})
    cfg = EEPConfig(population=6, iterations=7, elites=2, seed=4, checkpoint_every=1)
    problem = SelectionProblem(choices, cfg.move_probability, (from_plan(choices, seed_plan),))

    def score(sel):
        return sum(e * (li + 1) for li, kept in enumerate(sel) for e in kept) / 100 + _noise(problem.key(sel))

    return problem, score_each(score), cfg.evolution()


def merge_case():
    anchors = {0: (1, 4, 6), 2: (0, 3)}
    cfg = MergeConfig(population=5, iterations=7, elites=2, seed=9, checkpoint_every=1)
    problem = MergeProblem(anchors, {0: 8, 2: 6}, cfg)
    target = {
        i: np.linspace(0, 1, len(a) * n).reshape(len(a), n)
        for (i, a), n in zip(anchors.items(), (8, 6), strict=True)
    }

    def score(ms):
        return -sum(float(((m - target[i]) ** 2).sum()) for i, m in ms.items())

    return problem, score_each(score), cfg.evolution()


CASES = {"counts": counts_case, "selection": selection_case, "merge": merge_case}


def run_saving_states(problem, score_many, cfg, path: Path):
    """An uninterrupted run that keeps a copy of the state file after every generation."""
    states = []
    result = evolve(
        problem, score_many, cfg, state_path=path, progress=lambda g, b: states.append(path.read_text())
    )
    return result, states


def same(a, b, problem) -> bool:
    return (
        problem.key(a.best) == problem.key(b.best)
        and a.best_score == b.best_score
        and a.history == b.history
        and a.scores == b.scores
        and a.evaluations == b.evaluations
    )


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_at_every_checkpoint_equals_uninterrupted(case, tmp_path):
    problem, score_many, cfg = CASES[case]()
    straight = evolve(problem, score_many, cfg)
    saved, states = run_saving_states(problem, score_many, cfg, tmp_path / "full.json")
    assert same(saved, straight, problem)  # writing states changes nothing
    assert len(states) == cfg.generations
    for g, text in enumerate(states, start=1):
        path = tmp_path / f"state{g}.json"
        path.write_text(text)
        assert json.loads(text)["generation"] == g
        resumed = evolve(problem, score_many, cfg, state_path=path, resume=True)
        assert same(resumed, straight, problem), f"resumed after generation {g}"
        assert json.loads(path.read_text())["generation"] == cfg.generations
    # the state's JSON round-trips every candidate exactly
    final = json.loads(states[-1])
    for data in final["population"]:
        assert problem.encode(problem.decode(data)) == data
    assert set(straight.history[0]) >= HISTORY_FIELDS
    assert [h["generation"] for h in straight.history] == list(range(1, cfg.generations + 1))
    assert [h["best"] for h in straight.history] == sorted(h["best"] for h in straight.history)


def test_merge_matrices_round_trip_exactly():
    problem, _, _ = merge_case()
    rng = np.random.Generator(np.random.PCG64(0))
    ms = problem.initial_population(rng, 3)[2]
    ms[0][0, 0] = -0.0
    ms[0][0, 1] = np.nextafter(1.0, 2.0)
    back = problem.decode(json.loads(json.dumps(problem.encode(ms))))
    assert list(back) == list(ms)  # layer order kept: the children draw random numbers in that order
    for i in ms:
        assert back[i].dtype == np.float64 and back[i].tobytes() == ms[i].tobytes()
        assert back[i].flags.writeable
    assert problem.key(back) == problem.key(ms)
    ms[2][1, 1] += 1e-16 if ms[2][1, 1] else 5e-324
    assert problem.key(back) != problem.key(ms)


def test_growing_generations_continues_the_same_search(tmp_path):
    problem, score_many, cfg = counts_case()
    short = EvolutionConfig(**{**cfg.__dict__, "generations": 3, "checkpoint_every": 2})
    evolve(problem, score_many, short, state_path=tmp_path / "s.json")
    resumed = evolve(problem, score_many, cfg, state_path=tmp_path / "s.json", resume=True)
    assert same(resumed, evolve(problem, score_many, cfg), problem)
    with pytest.raises(MoepruneError, match="already run 7 generations"):
        evolve(problem, score_many, short, state_path=tmp_path / "s.json", resume=True)


def test_resume_with_other_settings_is_refused(tmp_path):
    problem, score_many, cfg = selection_case()
    path = tmp_path / "s.json"
    evolve(problem, score_many, cfg, state_path=path)
    other_seed = EvolutionConfig(**{**cfg.__dict__, "seed": 5})
    with pytest.raises(MoepruneError) as e:
        evolve(problem, score_many, other_seed, state_path=path, resume=True)
    assert "config.seed: 4 in the state, 5 now" in str(e.value) and "\n" not in str(e.value)
    other_rate = SelectionProblem(problem.choices, 0.3, problem.seeds)
    with pytest.raises(MoepruneError, match=r"problem\.move_probability: 0\.15 in the state, 0\.3 now"):
        evolve(other_rate, score_many, cfg, state_path=path, resume=True)
    counts, counts_score, counts_cfg = counts_case()
    with pytest.raises(MoepruneError, match="problem.kind"):
        evolve(counts, counts_score, counts_cfg, state_path=path, resume=True)
    path.write_text("{")
    with pytest.raises(MoepruneError, match="not valid JSON"):
        evolve(problem, score_many, cfg, state_path=path, resume=True)
    # resume without a state file: a fresh run
    fresh = evolve(problem, score_many, cfg, state_path=tmp_path / "new.json", resume=True)
    assert same(fresh, evolve(problem, score_many, cfg), problem)


def test_score_cache_and_batched_scoring():
    """score_many gets each generation's new candidates once, distinct, in population order."""
    space = AllocationSpace.from_layers([layer(i, experts=4) for i in range(3)], sparsity=0.25)  # 7 plans
    cfg = EvoConfig(population=6, generations=5, seed=0)
    problem = CountsProblem(space, cfg)
    calls: list[list] = []

    def score_many(many):
        calls.append(list(many))
        return [float(sum(i * n for i, n in enumerate(c))) for c in many]

    result = evolve(problem, score_many, cfg.evolution())
    seen = [c for call in calls for c in call]
    assert len(seen) == len(set(seen)) == result.evaluations == len(result.scores)
    assert result.evaluations <= 7 < cfg.population * cfg.generations  # seen again: taken from the cache
    assert all(len(call) for call in calls)  # no empty calls
    assert [h["new_evaluations"] for h in result.history if h["new_evaluations"]] == [len(c) for c in calls]
    assert result.history[-1]["evaluations"] == result.evaluations
    assert result.best == max(seen, key=lambda c: (sum(i * n for i, n in enumerate(c)), [-x for x in c]))
    with pytest.raises(MoepruneError, match="returned 1 scores"):
        evolve(problem, lambda many: [0.0], cfg.evolution())


def test_counts_history_names_the_best_counts():
    problem, score_many, cfg = counts_case()
    result = evolve(problem, score_many, cfg)
    assert all(h["best_counts"] == list(result.best) for h in result.history[-1:])
    assert all(set(h) == HISTORY_FIELDS | {"best_counts"} for h in result.history)


def test_bounds_shared_by_the_problems():
    """EEP's selections respect the same bounds as EvoESAP's counts (the topk_group limit included)."""
    grouped = SimpleNamespace(index=0, num_experts=8, top_k=4, num_groups=2, topk_groups=1)
    assert layer_bounds(grouped).max_remove == 0  # the one selected group must hold all 4 experts
    with pytest.raises(MoepruneError, match="cannot keep 6 of 8"):
        layer_choices([grouped], {0: 6})
    with pytest.raises(MoepruneError, match="cannot remove"):
        AllocationSpace.from_layers([grouped], budget=2)
