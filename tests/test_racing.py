"""Racing: slices combine into the one-pass fitness bit for bit, z = inf is the exact search (EvoESAP
and both EEP searches), a clearly worse candidate is dropped after the first slice and a better one
never, no elite or best is ever a raced-out candidate, token counts, resume bit for bit."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from moeprune.allocate import EvoConfig
from moeprune.arch import moe_layers
from moeprune.errors import MoepruneError
from moeprune.evolve import EvolutionConfig, evolve
from moeprune.execute import LocalExecutor, Scorer, ScoreSpec, slice_bounds
from moeprune.fitness import SearchSet, run_teacher
from moeprune.pipelines.eep import merge_into_anchors, select_experts
from moeprune.pipelines.evoesap import search_allocation
from moeprune.racing import Racing, beaten
from test_evolve import counts_case
from tiny_models import tiny_model

# --- the engine, with scripted per-token values --------------------------------------------------


class Tokens:
    """A scripted slice result: per-token values, combined in order like `fitness.FitnessResult`."""

    def __init__(self, values) -> None:
        self.values = np.asarray(values, dtype=np.float64)
        self.score, self.tokens = float(self.values.mean()), len(self.values)

    def token_scores(self) -> np.ndarray:
        return self.values

    def then(self, later: Tokens) -> Tokens:
        return Tokens(np.concatenate([self.values, later.values]))


def noise(*parts, n: int, sigma: float) -> np.ndarray:
    seed = int(hashlib.sha256(repr(parts).encode()).hexdigest()[:8], 16)
    return sigma * np.random.default_rng(seed).standard_normal(n)


@dataclass(frozen=True)
class Line:
    """Candidates are integers: 0..P-1 first, then 100, 101, ... (the same offspring every time)."""

    def describe(self) -> dict:
        return {"kind": "line"}

    def initial_population(self, rng, size):
        return list(range(size))

    def offspring(self, elites, rng, count):
        return [100 + i for i in range(count)]

    def key(self, c) -> str:
        return str(c)

    def tie_break(self, c):
        return c

    def encode(self, c):
        return c

    def decode(self, data):
        return int(data)

    def history_extras(self, best) -> dict:
        return {}


# per candidate, its mean value on each of the 4 slices (8 tokens each)
SCRIPT = {
    0: [0.5] * 4,
    1: [0.6, 0.7, 0.7, 0.7],  # weak first slice, above 2 on the others: not dropped in generation 1
    2: [0.99, 0.6, 0.6, 0.6],  # the worst elite after generation 1 (mean 0.6975): strong first slice
    3: [0.85] * 4,
    4: [0.4] * 4,
    100: [0.3] * 4,  # clearly worse: dropped after slice 1
    101: [1.0, 0.95, 0.95, 0.95],  # better: never dropped, the best
    102: [0.88] * 4,  # dropped after slice 1 (below 0.99 there), its partial mean above candidate 3's score
}


def scripted(calls: list):
    def score_slice(candidates, s):
        calls.append((s, list(candidates)))
        return [Tokens(SCRIPT[c][s] + noise(c, s, n=8, sigma=0.01)) for c in candidates]

    return score_slice


def test_clearly_worse_dropped_after_the_first_slice_better_never(tmp_path):
    calls: list = []
    cfg = EvolutionConfig(population=5, generations=2, elites=2, seed=0)
    state = tmp_path / "state.json"
    result = evolve(Line(), Racing(scripted(calls), slices=4, z=2.0), cfg, state_path=state)
    # generation 1: the 2 (= elites) best on slice 1 (2 and 3) are scored on every slice, then the
    # others race against the worse of them (2) on the slices after the first (where 2 was chosen for
    # its 0.99): 0 and 4 stop after slice 2, 1 (above 2 there; 0.6 against 0.99 on slice 1) goes on;
    # then 100 and 102 stop after slice 1
    assert calls[:7] == [
        (0, [0, 1, 2, 3, 4]),
        (1, [2, 3]),
        (2, [2, 3]),
        (3, [2, 3]),
        (1, [0, 1, 4]),
        (2, [1]),
        (3, [1]),
    ]
    assert calls[7:] == [(0, [100, 101, 102]), (1, [101]), (2, [101]), (3, [101])]
    assert result.raced_out == ["0", "4", "100", "102"]
    assert result.tokens == {"0": 16, "1": 32, "2": 32, "3": 32, "4": 16, "100": 8, "101": 32, "102": 8}
    assert result.best == 101
    assert result.scores["102"] > result.scores["3"]  # a higher partial mean ...
    saved = json.loads(state.read_text())
    assert saved["elites"] == ["101", "3"]  # ... still ranks below every fully scored candidate
    assert saved["raced_out"] == ["0", "4", "100", "102"] and saved["racing"] == {"z": 2.0, "slices": 4}
    assert result.scores["100"] == float((SCRIPT[100][0] + noise(100, 0, n=8, sigma=0.01)).mean())
    g1, g2 = result.history
    assert (g1["tokens_scored"], g1["raced_out"]) == (3 * 32 + 2 * 16, 2)
    assert (g2["tokens_scored"], g2["raced_out"], g2["new_evaluations"]) == (8 + 32 + 8, 2, 3)


def test_paired_bound():
    ref = np.array([0.5, 0.6, 0.7, 0.8])
    assert beaten(ref - 0.2, ref, 2.0)  # every difference -0.2 (se ~0)
    assert beaten(ref - 0.2 + np.array([0, 1e-3, 0, -1e-3]), ref, 2.0)
    assert not beaten(ref + 0.01, ref, 2.0)
    d = np.array([-0.1, 0.05, -0.2, 0.0])
    mean, se = d.mean(), d.std(ddof=1) / 2
    assert beaten(ref + d, ref, 0.5) == (mean + 0.5 * se < 0)
    assert beaten(ref + d, ref, 3.0) == (mean + 3.0 * se < 0)
    assert not beaten(ref[:1] - 1, ref, 2.0)  # one token: no standard error yet
    assert not beaten(ref - 1, ref, math.inf)
    for bad in (0, -1.0, math.nan):
        with pytest.raises(MoepruneError, match="z must be > 0"):
            Racing(lambda c, s: [], 4, bad)
    with pytest.raises(MoepruneError, match="at least 1 slice"):
        Racing(lambda c, s: [], 0, 2.0)


def counts_racing(z: float, calls: list | None = None):
    """The engine test's counts problem with per-token values (4 slices of 6 noisy tokens each)."""
    problem, _, cfg = counts_case()

    def quality(counts) -> float:
        return -sum((n - (1 + i)) ** 2 for i, n in enumerate(counts)) / 10

    def score_slice(candidates, s):
        if calls is not None:
            calls.append((s, [problem.key(c) for c in candidates]))
        return [Tokens(quality(c) + noise(problem.key(c), s, n=6, sigma=0.3)) for c in candidates]

    def exact(candidates):
        return [Tokens(np.concatenate([score_slice([c], s)[0].values for s in range(4)])) for c in candidates]

    return problem, Racing(score_slice, 4, z), exact, cfg


def test_elites_and_best_are_always_fully_scored(tmp_path):
    problem, racing, _, cfg = counts_racing(z=0.5)
    path, states = tmp_path / "s.json", []
    result = evolve(
        problem, racing, cfg, state_path=path, progress=lambda g, b: states.append(path.read_text())
    )
    assert result.raced_out and len(result.raced_out) < len(result.tokens)  # racing did drop some
    assert {result.tokens[k] for k in result.raced_out} <= {6, 12, 18}
    full = {k for k, n in result.tokens.items() if n == 24}
    assert full.isdisjoint(result.raced_out) and full | set(result.raced_out) == set(result.scores)
    assert problem.key(result.best) in full
    for text in states:
        state = json.loads(text)
        assert state["elites"] and set(state["elites"]) <= full
        assert result.scores[state["elites"][0]] == state["best_score"]
    fully = {result.scores[k] for k in full}
    assert all(h["best"] in fully and h["population_best"] in fully for h in result.history)
    assert sum(h["tokens_scored"] for h in result.history) == sum(result.tokens.values())
    assert sum(h["raced_out"] for h in result.history) == len(result.raced_out)


def test_z_inf_scores_every_token_like_the_exact_search():
    problem, racing, exact, cfg = counts_racing(z=math.inf)
    raced, straight = evolve(problem, racing, cfg), evolve(problem, exact, cfg)
    assert raced.raced_out == [] and raced.tokens == straight.tokens
    assert (raced.best, raced.history, raced.scores) == (straight.best, straight.history, straight.scores)


def test_resume_with_racing_is_bit_for_bit(tmp_path):
    calls: list = []
    problem, racing, _, cfg = counts_racing(z=1.0, calls=calls)
    straight = evolve(problem, racing, cfg)
    assert straight.raced_out
    path, states = tmp_path / "full.json", []
    evolve(problem, racing, cfg, state_path=path, progress=lambda g, b: states.append(path.read_text()))
    for g, text in enumerate(states[:-1], start=1):
        path = tmp_path / f"state{g}.json"
        path.write_text(text)
        calls.clear()
        resumed = evolve(problem, racing, cfg, state_path=path, resume=True)
        assert resumed.best == straight.best and resumed.history == straight.history
        assert resumed.scores == straight.scores and resumed.tokens == straight.tokens
        assert resumed.raced_out == straight.raced_out
        # the worst elite's per-token values were recomputed: it alone, on every slice, first
        worst = json.loads(text)["elites"][-1]
        assert calls[:4] == [(s, [worst]) for s in range(4)]
    other = Racing(racing.score_slice, 4, 2.0)
    with pytest.raises(MoepruneError, match=r"racing\.z: 1\.0 in the state, 2\.0 now"):
        evolve(problem, other, cfg, state_path=tmp_path / "state1.json", resume=True)
    with pytest.raises(MoepruneError, match="racing"):  # nor as an exact search
        evolve(problem, lambda cs: [0.0] * len(cs), cfg, state_path=tmp_path / "state1.json", resume=True)


# --- real evaluation on a tiny model -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    model = tiny_model("mixtral")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 128, (7, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    search = SearchSet.from_tensors(ids, mask, batch_size=2)  # 4 batches: 2, 2, 2, 1 sequences
    layers = moe_layers(model)
    order = {
        r.index: torch.randperm(8, generator=torch.Generator().manual_seed(r.index)).tolist() for r in layers
    }
    return model, search, order


def test_slice_bounds():
    assert slice_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert slice_bounds(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert slice_bounds(3, 4) == [(0, 1), (1, 2), (2, 3)]
    assert slice_bounds(1, 4) == [(0, 1)]
    assert slice_bounds(9, 2) == [(0, 5), (5, 9)]


@pytest.mark.parametrize(
    "cache, fitness", [("sparse", "esap"), ("dense", "kl_teacher_draft"), ("hidden", "esap")]
)
def test_slices_combine_into_the_one_pass_result_bitwise(tiny, cache, fitness):
    model, search, order = tiny
    teacher = run_teacher(model, search, cache=cache, top_k=8)
    scorer = Scorer(model, teacher)
    plans = [
        {0: [0, 1, 2], 1: [3, 4], 2: [5, 6, 7]},
        {0: [7], 1: [0, 1, 2, 3], 2: [4, 5]},
    ]
    whole = scorer.score(ScoreSpec(fitness=fitness), plans)
    parts = [scorer.score(ScoreSpec(fitness=fitness, slice=b), plans) for b in slice_bounds(4, 3)]
    for i, one in enumerate(whole):
        combined = parts[0][i].then(parts[1][i]).then(parts[2][i])
        assert combined.as_dict() == one.as_dict()  # value, score, bounds and tokens: bitwise
        assert combined.tokens == teacher.search.num_scored()
        assert combined.token_scores().mean() == pytest.approx(one.score, abs=1e-9)
    assert one.totals is None and "totals" not in one.as_dict()


def test_shuffled_rows_seeded_and_the_exact_fitness_unchanged(tiny):
    """The pipeline's search rows are in a seeded random order: the same rows, the same order for a
    seed, every mask moved with its row; the exact (one-pass) fitness is the same to rounding."""
    model, search, _ = tiny
    rows = [(b.input_ids, b.attention_mask, b.score_mask) for b in search.batches]
    ids, mask, score = (torch.cat(t) for t in zip(*rows, strict=True))
    score = score.clone()
    score[2, :6] = False  # a prompt part, not scored

    class Tokens:
        input_ids, attention_mask, score_mask = ids, mask, score

    plain = SearchSet.from_tokens(Tokens, batch_size=2)
    a, b, c = (SearchSet.from_tokens(Tokens, batch_size=2, shuffle_seed=s) for s in (5, 5, 6))
    flat = [torch.cat([getattr(x, f) for x in s.batches]) for s in (a, b, c) for f in ("input_ids",)]
    assert (
        torch.equal(flat[0], flat[1]) and not torch.equal(flat[0], flat[2]) and not torch.equal(flat[0], ids)
    )
    rows_of = {tuple(r.tolist()): (m.tolist(), s.tolist()) for r, m, s in zip(ids, mask, score, strict=True)}
    got = [(tuple(r.tolist()), (m.tolist(), s.tolist())) for x in a.batches for r, m, s in zip(x.input_ids, x.attention_mask, x.score_mask, strict=True)]  # fmt: skip
    assert sorted(r for r, _ in got) == sorted(rows_of) and all(rows_of[r] == ms for r, ms in got)
    plan = {0: [0, 1, 2], 1: [3, 4], 2: [5, 6, 7]}
    one, other = (
        Scorer(model, run_teacher(model, s, cache="dense")).score(ScoreSpec(), [plan])[0] for s in (plain, a)
    )
    assert one.tokens == other.tokens and other.value == pytest.approx(one.value, abs=1e-6)


def counts_search(tiny, state=None, **options):
    model, search, order = tiny
    teacher = run_teacher(model, search, cache="sparse", top_k=8)
    config = EvoConfig(population=8, generations=options.pop("generations", 4), seed=3, checkpoint_every=1)
    return search_allocation(
        model, order, teacher, sparsity=0.5, config=config, progress=False, state_path=state,
        executor=LocalExecutor(model, teacher), **options,
    )  # fmt: skip


def test_z_inf_is_the_exact_evoesap_search_bit_for_bit(tiny, tmp_path):
    exact = counts_search(tiny, tmp_path / "exact.json", racing=False)
    raced = counts_search(tiny, tmp_path / "inf.json", racing=True, racing_z=math.inf)
    assert exact.racing is None and raced.racing["z"] == "inf" and raced.racing["raced_out"] == 0
    assert raced.best == exact.best and raced.plan.to_dict() == exact.plan.to_dict()
    assert raced.result.history == exact.result.history
    assert raced.result.scores == exact.result.scores and raced.result.tokens == exact.result.tokens
    assert raced.best_fitness == exact.best_fitness and raced.uniform_fitness == exact.uniform_fitness
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("exact.json", "inf.json"))
    assert a.pop("racing") is None and b.pop("racing") == {"z": "inf", "slices": 4}
    assert a == b  # the same state file apart from the racing settings
    assert raced.reuse["evaluations"] >= 4 * raced.result.evaluations - 8  # slices report their reuse


def test_racing_counts_tokens_and_resumes_bit_for_bit(tiny, tmp_path):
    straight = counts_search(tiny, racing_z=0.5)
    r = straight.result
    assert r.raced_out, "z = 0.5 drops some candidates of this search"
    full = 19 + 22 + 22 + 11  # scored tokens per batch (the padded row has 8 of 11)
    assert straight.racing["tokens_per_candidate"] == full
    assert all(r.tokens[k] == full for k in set(r.tokens) - set(r.raced_out))
    assert {r.tokens[k] for k in r.raced_out} <= {19, 19 + 22, 19 + 22 + 22}  # after slice 1, 2 or 3
    assert straight.racing["saved"] == round(1 - sum(r.tokens.values()) / (full * len(r.tokens)), 4)
    assert sum(h["tokens_scored"] for h in r.history) == sum(r.tokens.values())
    assert straight.best_fitness["tokens"] == full
    # stopped after 2 generations, resumed to 4 with a new executor (cold caches): the same search
    state = tmp_path / "s.json"
    counts_search(tiny, state, racing_z=0.5, generations=2)
    resumed = counts_search(tiny, state, racing_z=0.5, resume=True)
    assert resumed.best == straight.best and resumed.result.history == r.history
    assert resumed.result.tokens == r.tokens and resumed.result.raced_out == r.raced_out
    assert resumed.best_fitness == straight.best_fitness


def test_z_inf_is_the_exact_eep_searches(tiny):
    model, search, _ = tiny
    teacher = run_teacher(model, search, cache="sparse", top_k=8)
    common = dict(sparsity=0.5, population=4, iterations=3, seed=1, progress=False)
    exact = select_experts(model, teacher, racing=False, **common)
    raced = select_experts(model, teacher, racing=True, racing_z=math.inf, **common)
    assert raced.best_selection == exact.best_selection and raced.history == exact.history
    assert raced.tokens == exact.tokens and raced.raced_out == []
    merge = dict(population=3, iterations=2, seed=1, progress=False)
    exact_m = merge_into_anchors(model, teacher, exact.best, racing=False, **merge)
    raced_m = merge_into_anchors(model, teacher, exact.best, racing=True, racing_z=math.inf, **merge)
    assert raced_m.history == exact_m.history and raced_m.best_score == exact_m.best_score
    assert raced_m.tokens == exact_m.tokens
    for a, b in zip(raced_m.best.values(), exact_m.best.values(), strict=True):
        assert torch.equal(a.weights, b.weights)
