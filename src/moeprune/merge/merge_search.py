"""EEP merge phase: evolutionary search of the merging matrices M_l (k_l × E_l), anchors fixed.

Starts from the prune phase's selection (M = one-hot rows at the anchors, i.e. plain pruning):

    population P: the one-hot plan and P - 1 of its mutants
    for iteration 1..I:
        score the candidates not scored yet (fitness, maximised: ESAP by exact masking with the
            merged weights written into the anchors)
        keep the best-ever plan; elites = the best E
        next population = elites + children; child = crossover of two elites drawn uniformly
            (each row of every M from the second parent with probability p_c = 0.3), then
            Gaussian noise (each entry, with probability p_n = 0.25, += N(0, σ²), σ = 0.065),
            then (optional) every row renormalised to sum 1

Deterministic for a seed (numpy PCG64). The best plan scores at least the one-hot plan it started
from (elitism), so merging never ends worse than pruning on the search set.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MoepruneError
from .merging import LayerMerge, MergePlan


@dataclass(frozen=True)
class MergeConfig:
    population: int = 8
    iterations: int = 300
    elites: int = 2
    sigma: float = 0.065
    noise_probability: float = 0.25
    crossover_probability: float = 0.3
    renormalise: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 2 or self.iterations < 1 or not 1 <= self.elites < self.population:
            raise MoepruneError("population >= 2, iterations >= 1, 1 <= elites < population")


@dataclass
class MergeResult:
    best: dict[int, LayerMerge]
    best_score: float
    start_score: float  # the one-hot (pruning) plan's score
    history: list[dict]
    evaluations: int
    seconds: float


Matrices = dict[int, np.ndarray]  # layer -> M (k, E) float64


def _child(a: Matrices, b: Matrices, cfg: MergeConfig, rng: np.random.Generator) -> Matrices:
    child = {}
    for layer, m in a.items():
        rows = rng.random(m.shape[0]) < cfg.crossover_probability  # (k,)
        c = np.where(rows[:, None], b[layer], m)  # (k, E)
        noise = rng.normal(0.0, cfg.sigma, m.shape) * (rng.random(m.shape) < cfg.noise_probability)
        c = c + noise
        if cfg.renormalise:
            c = c / c.sum(axis=1, keepdims=True)
        child[layer] = c
    return child


def eep_merge_search(
    anchors: Mapping[int, tuple[int, ...]],
    num_experts: Mapping[int, int],
    score: Callable[[MergePlan], float],
    cfg: MergeConfig = MergeConfig(),
    *,
    progress: Callable[[int, float], None] | None = None,
) -> MergeResult:
    """Maximise ``score(plan)`` over merging matrices with the given anchors (module docstring)."""
    t0 = time.perf_counter()
    rng = np.random.Generator(np.random.PCG64(cfg.seed))

    def to_plan(ms: Matrices) -> dict[int, LayerMerge]:
        return {i: LayerMerge(tuple(anchors[i]), torch.from_numpy(m)) for i, m in ms.items()}

    start = {i: LayerMerge.one_hot(tuple(a), num_experts[i]).weights.numpy() for i, a in anchors.items()}
    population: list[Matrices] = [start] + [_child(start, start, cfg, rng) for _ in range(cfg.population - 1)]
    scores: list[float | None] = [None] * len(population)
    history: list[dict] = []
    best, best_score, start_score, evaluations = start, float("-inf"), float("nan"), 0
    for it in range(1, cfg.iterations + 1):
        for j, ms in enumerate(population):
            if scores[j] is None:
                scores[j] = float(score(to_plan(ms)))
                evaluations += 1
        if it == 1:
            start_score = scores[0]
        order = sorted(range(len(population)), key=lambda j: -scores[j])
        if scores[order[0]] > best_score:
            best, best_score = population[order[0]], scores[order[0]]
        history.append(
            {
                "iteration": it,
                "best": best_score,
                "median": statistics.median(scores),
                "evaluations": evaluations,
            }
        )
        elites = [population[j] for j in order[: cfg.elites]]
        elite_scores = [scores[j] for j in order[: cfg.elites]]
        children = []
        for _ in range(cfg.population - cfg.elites):
            a, b = rng.integers(len(elites), size=2)
            children.append(_child(elites[int(a)], elites[int(b)], cfg, rng))
        population, scores = elites + children, elite_scores + [None] * len(children)
        if progress is not None:
            progress(it, best_score)
    return MergeResult(
        best=to_plan(best),
        best_score=best_score,
        start_score=start_score,
        history=history,
        evaluations=evaluations,
        seconds=time.perf_counter() - t0,
    )
