"""EEP prune phase: gradient-free evolutionary search of *which* experts each MoE layer keeps.

The number kept per layer, k_l, is given (a uniform sparsity or an EvoESAP allocation) and checked
by `moeprune.plan.LayerBounds`; a candidate is one set of k_l kept experts per layer (EEP's one-hot
merging matrix M = router mapping T). The engine (`moeprune.evolve`) runs the loop:

    population P: any given selections (e.g. a criterion's plan), then random ones (seeded)
    for iteration (generation) 1..I:
        score every selection not in the score cache (fitness, maximised: ESAP by exact masking)
        keep the best-ever selection; elites = the best E distinct selections
        next population = elites + mutants of uniformly drawn elites until P
    mutate(selection): each kept slot moves, with probability p (0.15), to a uniformly drawn unused
        expert of its layer (of its group, for group-limited routers); at least one slot moves

Deterministic for a seed (numpy PCG64); resumable from the engine's state file. The merge phase
(`merge_search`) starts from the selection this returns.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MoepruneError
from ..evolve import IterationSettings, evolve, map_scoring
from ..plan import ExpertPlan, LayerBounds, LayerShape, layer_bounds
from ..racing import Racing

__all__ = [
    "EEPConfig",
    "EEPResult",
    "LayerChoice",
    "Selection",
    "SelectionProblem",
    "from_plan",
    "layer_choices",
    "mutate",
    "search_selections",
    "to_plan",
]

Selection = tuple[tuple[int, ...], ...]  # kept expert ids per MoE layer (sorted), in layer order


@dataclass(frozen=True)
class EEPConfig(IterationSettings):
    population: int = 16
    iterations: int = 100  # the engine's generations
    elites: int = 4
    move_probability: float = 0.15
    seed: int = 0
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        if self.population < 1 or self.iterations < 1 or not 1 <= self.elites <= self.population:
            raise MoepruneError("population and iterations must be >= 1, elites between 1 and population")
        if not 0.0 < self.move_probability <= 1.0:
            raise MoepruneError("move_probability must be in (0, 1]")
        self.evolution()


@dataclass(frozen=True)
class LayerChoice:
    """What a candidate may keep in one MoE layer: `keep` experts, the same number in every group."""

    bounds: LayerBounds
    keep: int

    @property
    def index(self) -> int:  # decoder layer index
        return self.bounds.index

    @property
    def num_experts(self) -> int:
        return self.bounds.num_experts

    @property
    def num_groups(self) -> int:
        return self.bounds.step

    def group_of(self, expert: int) -> int:
        return self.bounds.group_of(expert)

    def random(self, rng: np.random.Generator) -> tuple[int, ...]:
        size, per_group = self.num_experts // self.num_groups, self.keep // self.num_groups
        kept = [g * size + int(e) for g in range(self.num_groups) for e in rng.permutation(size)[:per_group]]
        return tuple(sorted(kept))


@dataclass
class EEPResult:
    best: ExpertPlan
    best_selection: Selection
    best_score: float
    history: list[dict]
    evaluations: int
    seconds: float
    tokens: dict[str, int] = field(default_factory=dict)  # selection key -> tokens scored on
    raced_out: list[str] = field(default_factory=list)  # keys of the selections racing dropped


def layer_choices(layers: Sequence[LayerShape], keep: Mapping[int, int]) -> list[LayerChoice]:
    """One `LayerChoice` per MoE layer; `keep` = experts kept per decoder layer index, each within
    the layer's `LayerBounds`."""
    choices = []
    for layer in layers:
        k, bounds = int(keep[layer.index]), layer_bounds(layer)
        if not bounds.allows(bounds.num_experts - k):
            lowest = bounds.num_experts - bounds.max_remove
            raise MoepruneError(
                f"layer {layer.index}: cannot keep {k} of {layer.num_experts} experts (top_k {layer.top_k}, "
                f"{bounds.step} groups: keep between {lowest} and {layer.num_experts}, a multiple of "
                f"{bounds.step})"
            )
        choices.append(LayerChoice(bounds, k))
    return choices


def mutate(choices: Sequence[LayerChoice], sel: Selection, p: float, rng: np.random.Generator) -> Selection:
    """Each kept slot moves with probability p to an unused expert of the same layer (and group)."""
    out = [list(kept) for kept in sel]
    slots = [(li, si) for li, kept in enumerate(sel) for si in range(len(kept))]
    moving = [s for s in slots if rng.random() < p] or [slots[int(rng.integers(len(slots)))]]
    for li, si in moving:
        choice, kept = choices[li], out[li]
        group = choice.group_of(kept[si])
        unused = [e for e in range(choice.num_experts) if e not in kept and choice.group_of(e) == group]
        if unused:
            kept[si] = unused[int(rng.integers(len(unused)))]
    return tuple(tuple(sorted(kept)) for kept in out)


def to_plan(choices: Sequence[LayerChoice], sel: Selection) -> ExpertPlan:
    return ExpertPlan.from_kept(
        {c.index: kept for c, kept in zip(choices, sel, strict=True)},
        {c.index: c.num_experts for c in choices},
    )


def from_plan(choices: Sequence[LayerChoice], plan: ExpertPlan) -> Selection:
    sel = []
    for c in choices:
        kept = tuple(sorted(set(range(c.num_experts)) - set(plan.removed.get(c.index, ()))))
        if len(kept) != c.keep:
            raise MoepruneError(
                f"a seed plan keeps {len(kept)} experts in layer {c.index}, the search {c.keep}"
            )
        sel.append(kept)
    return tuple(sel)


@dataclass(frozen=True)
class SelectionProblem:
    """EEP's prune-phase candidates for `evolve`: the kept experts of every layer."""

    choices: tuple[LayerChoice, ...]
    move_probability: float
    seeds: tuple[Selection, ...] = ()  # join the initial population first

    def describe(self) -> dict:
        return {
            "kind": "eep-selection",
            "layers": [
                {"index": c.index, "num_experts": c.num_experts, "groups": c.num_groups, "keep": c.keep}
                for c in self.choices
            ],
            "move_probability": self.move_probability,
            "seeds": [self.encode(s) for s in self.seeds],
        }

    def initial_population(self, rng: np.random.Generator, size: int) -> list[Selection]:
        population = list(self.seeds[:size])
        return population + [
            tuple(c.random(rng) for c in self.choices) for _ in range(size - len(population))
        ]

    def offspring(
        self, elites: list[tuple[Selection, float]], rng: np.random.Generator, count: int
    ) -> list[Selection]:
        return [
            mutate(self.choices, elites[int(rng.integers(len(elites)))][0], self.move_probability, rng)
            for _ in range(count)
        ]

    def key(self, sel: Selection) -> str:
        return "|".join(",".join(map(str, kept)) for kept in sel)

    def tie_break(self, sel: Selection) -> Selection:
        return sel

    def encode(self, sel: Selection) -> list[list[int]]:
        return [list(kept) for kept in sel]

    def decode(self, data: list[list[int]]) -> Selection:
        return tuple(tuple(int(e) for e in kept) for kept in data)

    def history_extras(self, best: Selection) -> dict:
        return {}


def search_selections(
    choices: Sequence[LayerChoice],
    score_many: Callable[[list[ExpertPlan]], Sequence] | Racing,
    cfg: EEPConfig = EEPConfig(),
    *,
    seeds: Sequence[ExpertPlan] = (),
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> EEPResult:
    """Maximise the fitness of the selections of `choices` (module docstring). `score_many` scores
    an iteration's new selections, as plans, in one call (e.g. stacked), or races them (a
    `racing.Racing` of plans); ``evolve.score_each`` turns a one-plan score function into one.
    `state_path`/`resume`/`progress`: see `evolve.evolve`."""
    t0 = time.perf_counter()
    choices = tuple(choices)
    problem = SelectionProblem(choices, cfg.move_probability, tuple(from_plan(choices, p) for p in seeds))
    result = evolve(
        problem,
        map_scoring(score_many, lambda sel: to_plan(choices, sel)),
        cfg.evolution(),
        state_path=state_path,
        resume=resume,
        progress=progress,
    )
    return EEPResult(
        best=to_plan(choices, result.best),
        best_selection=result.best,
        best_score=result.best_score,
        history=result.history,
        evaluations=result.evaluations,
        seconds=time.perf_counter() - t0,
        tokens=result.tokens,
        raced_out=result.raced_out,
    )
