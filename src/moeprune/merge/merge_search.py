"""EEP merge phase: evolutionary search of the merging matrices M_l (k_l × E_l), anchors fixed.

Starts from the prune phase's selection (M = one-hot rows at the anchors, i.e. plain pruning). The
engine (`moeprune.evolve`) runs the loop:

    population P: the one-hot plan and P - 1 of its children
    for iteration (generation) 1..I:
        score the candidates not scored yet (fitness, maximised: ESAP by exact masking with the
            merged weights written into the anchors)
        keep the best-ever plan; elites = the best E (ties: population order)
        next population = elites + children; child = crossover of two elites drawn uniformly
            (each row of every M from the second parent with probability p_c = 0.3), then
            Gaussian noise (each entry, with probability p_n = 0.25, += N(0, σ²), σ = 0.065),
            then (optional) every row renormalised to sum 1

A candidate is a dict layer -> M (float64 numpy array); its score-cache key is a SHA-256 of the
arrays' bytes and the state file stores every array exactly (base64 of its float64 bytes).
Deterministic for a seed (numpy PCG64); resumable. The best plan scores at least the one-hot plan it
started from (elitism), so merging never ends worse than pruning on the search set.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import MoepruneError
from ..evolve import IterationSettings, evolve, map_scoring
from ..racing import Racing
from .merging import LayerMerge, MergePlan

__all__ = ["Matrices", "MergeConfig", "MergeProblem", "MergeResult", "search_merges"]

Matrices = dict[int, np.ndarray]  # layer -> M (k, E) float64


@dataclass(frozen=True)
class MergeConfig(IterationSettings):
    population: int = 8
    iterations: int = 300  # the engine's generations
    elites: int = 2
    sigma: float = 0.065
    noise_probability: float = 0.25
    crossover_probability: float = 0.3
    renormalise: bool = True
    seed: int = 0
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        if self.population < 2 or self.iterations < 1 or not 1 <= self.elites < self.population:
            raise MoepruneError("population >= 2, iterations >= 1, 1 <= elites < population")
        self.evolution()


@dataclass
class MergeResult:
    best: dict[int, LayerMerge]
    best_score: float
    start_score: float  # the one-hot (pruning) plan's score
    history: list[dict]
    evaluations: int
    seconds: float
    tokens: dict[str, int] = field(default_factory=dict)  # candidate key -> tokens scored on
    raced_out: list[str] = field(default_factory=list)  # keys of the candidates racing dropped


@dataclass(frozen=True)
class MergeProblem:
    """EEP's merge-phase candidates for `evolve`: one merging matrix per layer, anchors fixed."""

    anchors: Mapping[int, tuple[int, ...]]  # kept expert ids per decoder layer, in layer order
    num_experts: Mapping[int, int]
    config: MergeConfig

    def start(self) -> Matrices:
        """The one-hot matrices: plain pruning to the anchors."""
        return {
            i: LayerMerge.one_hot(tuple(a), self.num_experts[i]).weights.numpy()
            for i, a in self.anchors.items()
        }

    def child(self, a: Matrices, b: Matrices, rng: np.random.Generator) -> Matrices:
        """Row crossover of `a` with `b`, Gaussian noise, optional row renormalisation (module docstring)."""
        cfg, child = self.config, {}
        for layer, m in a.items():
            rows = rng.random(m.shape[0]) < cfg.crossover_probability  # (k,)
            c = np.where(rows[:, None], b[layer], m)  # (k, E)
            noise = rng.normal(0.0, cfg.sigma, m.shape) * (rng.random(m.shape) < cfg.noise_probability)
            c = c + noise
            if cfg.renormalise:
                c = c / c.sum(axis=1, keepdims=True)
            child[layer] = c
        return child

    def to_plan(self, ms: Matrices) -> dict[int, LayerMerge]:
        return {i: LayerMerge(tuple(self.anchors[i]), torch.from_numpy(m)) for i, m in ms.items()}

    def describe(self) -> dict:
        c = self.config
        return {
            "kind": "eep-merge",
            "anchors": [[int(i), [int(e) for e in a]] for i, a in self.anchors.items()],
            "num_experts": [[int(i), int(self.num_experts[i])] for i in self.anchors],
            "sigma": c.sigma,
            "noise_probability": c.noise_probability,
            "crossover_probability": c.crossover_probability,
            "renormalise": c.renormalise,
        }

    def initial_population(self, rng: np.random.Generator, size: int) -> list[Matrices]:
        start = self.start()
        return [start] + [self.child(start, start, rng) for _ in range(size - 1)]

    def offspring(
        self, elites: list[tuple[Matrices, float]], rng: np.random.Generator, count: int
    ) -> list[Matrices]:
        children = []
        for _ in range(count):
            a, b = rng.integers(len(elites), size=2)
            children.append(self.child(elites[int(a)][0], elites[int(b)][0], rng))
        return children

    def key(self, ms: Matrices) -> str:
        h = hashlib.sha256()
        for i, m in ms.items():
            h.update(f"{i}:{m.shape}:".encode())
            h.update(np.ascontiguousarray(m, dtype="<f8").tobytes())
        return h.hexdigest()

    def tie_break(self, ms: Matrices) -> int:
        return 0  # equal scores keep the population order

    def encode(self, ms: Matrices) -> list:
        return [
            [int(i), list(m.shape), base64.b64encode(np.ascontiguousarray(m, dtype="<f8").tobytes()).decode()]
            for i, m in ms.items()
        ]

    def decode(self, data: list) -> Matrices:
        return {
            int(i): np.frombuffer(base64.b64decode(b), dtype="<f8").reshape(shape).astype(np.float64)
            for i, shape, b in data
        }

    def history_extras(self, best: Matrices) -> dict:
        return {}


def search_merges(
    anchors: Mapping[int, tuple[int, ...]],
    num_experts: Mapping[int, int],
    score_many: Callable[[list[MergePlan]], Sequence] | Racing,
    cfg: MergeConfig = MergeConfig(),
    *,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> MergeResult:
    """Maximise the score of merge plans with the given anchors (module docstring). `score_many`
    scores an iteration's new plans in one call (in population order; e.g. on several workers), or
    races them (a `racing.Racing` of merge plans); ``evolve.score_each`` turns a one-plan score
    function into one.
    `state_path`/`resume`/`progress`: see `evolve.evolve`."""
    t0 = time.perf_counter()
    problem = MergeProblem({i: tuple(a) for i, a in anchors.items()}, dict(num_experts), cfg)
    result = evolve(
        problem,
        map_scoring(score_many, problem.to_plan),
        cfg.evolution(),
        state_path=state_path,
        resume=resume,
        progress=progress,
    )
    return MergeResult(
        best=problem.to_plan(result.best),
        best_score=result.best_score,
        start_score=result.scores[problem.key(problem.start())],
        history=result.history,
        evaluations=result.evaluations,
        seconds=time.perf_counter() - t0,
        tokens=result.tokens,
        raced_out=result.raced_out,
    )
