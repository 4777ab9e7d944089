"""EvoESAP: evolutionary search of the per-layer removal counts, maximising a fitness (ESAP).

A candidate is one count n_l per MoE layer (`Counts`) in an `AllocationSpace` (sum = budget B).
The engine (`moeprune.evolve`) runs the loop; this problem supplies:

    initial population: one plan per init pattern (patterns.SPEC_ORDER; ``uniform`` is the uniform
        plan u itself), the rest from ``random``
    offspring: mutants of uniformly drawn elites
    mutate(plan): t = min(U{1..M}, U{1..M}) moves; each move picks src with n_src > min_src,
        dst with room, delta ~ U{1..D}; n_src -= delta, n_dst += delta when src != dst and both stay
        allowed, else the move is retried (at most A attempts per move)

so that with the engine:
    for generation g = 1..G:
        score every plan not in the score cache
        keep the best-ever plan; elites = the best E distinct plans of the population
        next population = elites + mutants until P

Deterministic for a seed (numpy PCG64); resumable from the engine's state file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..evolve import EvolutionConfig, EvolutionResult, evolve
from ..racing import Racing
from .counts import counts_from_weights, uniform_allocation
from .patterns import INIT_PATTERNS, SPEC_ORDER
from .space import AllocationSpace, Counts

__all__ = ["CountsProblem", "EvoConfig", "initial_population", "mutate", "search_counts"]


@dataclass(frozen=True)
class EvoConfig:
    population: int = 32
    generations: int = 50
    elites: int = 4
    max_moves: int = 3  # M
    max_delta: int = 4  # D
    attempts: int = 32  # A
    seed: int = 0
    checkpoint_every: int = 5
    init_patterns: tuple[str, ...] = SPEC_ORDER

    def __post_init__(self) -> None:
        self.evolution()  # checks population, generations, elites, checkpoint_every
        for name in self.init_patterns:
            INIT_PATTERNS.get(name)

    def evolution(self) -> EvolutionConfig:
        """The engine's part of the settings."""
        return EvolutionConfig(
            population=self.population,
            generations=self.generations,
            elites=self.elites,
            seed=self.seed,
            checkpoint_every=self.checkpoint_every,
        )


def initial_population(
    space: AllocationSpace, cfg: EvoConfig, rng: np.random.Generator, size: int | None = None
) -> list[Counts]:
    """`size` (default: the population) plans: one per init pattern of `cfg` (``uniform``: the
    uniform plan), then ``random`` plans."""
    n, size = len(space.layers), cfg.population if size is None else size
    names = list(cfg.init_patterns[:size])
    names += ["random"] * (size - len(names))
    return [
        uniform_allocation(space)
        if name == "uniform"
        else counts_from_weights(space, INIT_PATTERNS.get(name)(n, rng))
        for name in names
    ]


def mutate(space: AllocationSpace, counts: Counts, cfg: EvoConfig, rng: np.random.Generator) -> Counts:
    """t = min(U{1..M}, U{1..M}) budget-preserving moves of delta ~ U{1..D} experts between layers."""
    c = list(counts)
    layers = space.layers
    moves = min(int(rng.integers(1, cfg.max_moves + 1)), int(rng.integers(1, cfg.max_moves + 1)))
    for _ in range(moves):
        for _ in range(cfg.attempts):
            src_ok = [i for i, r in enumerate(layers) if c[i] > r.min_remove]
            dst_ok = [i for i, r in enumerate(layers) if c[i] < r.max_remove]
            if not src_ok or not dst_ok:
                break
            src = src_ok[int(rng.integers(len(src_ok)))]
            dst = dst_ok[int(rng.integers(len(dst_ok)))]
            delta = int(rng.integers(1, cfg.max_delta + 1))
            if src != dst and layers[src].allows(c[src] - delta) and layers[dst].allows(c[dst] + delta):
                c[src] -= delta
                c[dst] += delta
                break
    return tuple(c)


@dataclass(frozen=True)
class CountsProblem:
    """EvoESAP's candidates for `evolve`: per-layer removal counts in `space`."""

    space: AllocationSpace
    config: EvoConfig

    def describe(self) -> dict:
        c = self.config
        return {
            "kind": "evoesap-counts",
            "space": self.space.as_dict(),
            "max_moves": c.max_moves,
            "max_delta": c.max_delta,
            "attempts": c.attempts,
            "init_patterns": list(c.init_patterns),
        }

    def initial_population(self, rng: np.random.Generator, size: int) -> list[Counts]:
        return initial_population(self.space, self.config, rng, size)

    def offspring(
        self, elites: list[tuple[Counts, float]], rng: np.random.Generator, count: int
    ) -> list[Counts]:
        return [
            mutate(self.space, elites[int(rng.integers(len(elites)))][0], self.config, rng)
            for _ in range(count)
        ]

    def key(self, counts: Counts) -> str:
        return ",".join(map(str, counts))

    def tie_break(self, counts: Counts) -> Counts:
        return counts

    def encode(self, counts: Counts) -> list[int]:
        return list(counts)

    def decode(self, data: list[int]) -> Counts:
        return tuple(int(n) for n in data)

    def history_extras(self, best: Counts) -> dict:
        return {"best_counts": list(best)}


def search_counts(
    space: AllocationSpace,
    score_many: Callable[[list[Counts]], Sequence] | Racing,
    config: EvoConfig = EvoConfig(),
    *,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> EvolutionResult[Counts]:
    """Maximise the fitness of per-layer counts over `space` (module docstring). `score_many` scores
    a generation's new plans in one call (in population order), e.g. stacked, or races them (a
    `racing.Racing` of counts); ``evolve.score_each`` turns a one-plan score function into one.
    `state_path`/`resume`/`progress`: see `evolve`."""
    return evolve(
        CountsProblem(space, config),
        score_many,
        config.evolution(),
        state_path=state_path,
        resume=resume,
        progress=progress,
    )
