"""EEP prune phase: gradient-free evolutionary search of *which* experts each MoE layer keeps.

The number kept per layer, k_l, is given (a uniform sparsity or an EvoESAP allocation); a candidate
is one set of k_l kept experts per layer (EEP's one-hot merging matrix M = router mapping T):

    population P: random selections (seeded), plus any given selections (e.g. a criterion's plan)
    for iteration 1..I:
        score every selection not in the score cache (fitness, maximised: ESAP by exact masking)
        keep the best-ever selection; elites = the best E distinct selections
        next population = elites + mutants of uniformly drawn elites until P
    mutate(selection): each kept slot moves, with probability p (0.15), to a uniformly drawn unused
        expert of its layer (of its group, for group-limited routers); at least one slot moves

Deterministic for a seed (numpy PCG64). The merge phase of EEP (continuous M, T) builds on the
selection this returns; it is not implemented yet.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from ..arch import MoELayer
from ..errors import MoepruneError
from ..surgery import ExpertPlan

Selection = tuple[tuple[int, ...], ...]  # kept expert ids per MoE layer (sorted), in layer order


@dataclass(frozen=True)
class EEPConfig:
    population: int = 16
    iterations: int = 100
    elites: int = 4
    move_probability: float = 0.15
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 1 or self.iterations < 1 or not 1 <= self.elites <= self.population:
            raise MoepruneError("population and iterations must be >= 1, elites between 1 and population")
        if not 0.0 < self.move_probability <= 1.0:
            raise MoepruneError("move_probability must be in (0, 1]")


@dataclass(frozen=True)
class LayerChoice:
    """What a candidate may keep in one MoE layer: k experts, the same number in every group."""

    index: int  # decoder layer index
    num_experts: int
    num_groups: int
    keep: int

    def group_of(self, expert: int) -> int:
        return expert // (self.num_experts // self.num_groups)

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


def layer_choices(layers: Sequence[MoELayer], keep: Mapping[int, int]) -> list[LayerChoice]:
    """One `LayerChoice` per MoE layer; `keep` = experts kept per decoder layer index."""
    choices = []
    for layer in layers:
        k = int(keep[layer.index])
        lowest = max(layer.top_k, 1)
        if not lowest <= k <= layer.num_experts or k % layer.num_groups:
            raise MoepruneError(
                f"layer {layer.index}: cannot keep {k} of {layer.num_experts} experts (top_k {layer.top_k}, "
                f"{layer.num_groups} groups: keep between {lowest} and {layer.num_experts}, a multiple of "
                f"{layer.num_groups})"
            )
        choices.append(LayerChoice(layer.index, layer.num_experts, layer.num_groups, k))
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


def eep_prune_search(
    choices: Sequence[LayerChoice],
    score: Callable[[ExpertPlan], float],
    cfg: EEPConfig = EEPConfig(),
    *,
    seeds: Sequence[ExpertPlan] = (),
    progress: Callable[[int, float], None] | None = None,
    score_many: Callable[[list[ExpertPlan]], list[float]] | None = None,
) -> EEPResult:
    """Maximise ``score(plan)`` over the selections of `choices` (see the module docstring).
    ``score_many``, when given, scores an iteration's new selections in one call (e.g. stacked)."""
    t0 = time.perf_counter()
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    population = [from_plan(choices, p) for p in seeds][: cfg.population]
    population += [tuple(c.random(rng) for c in choices) for _ in range(cfg.population - len(population))]
    scores: dict[Selection, float] = {}
    history: list[dict] = []
    best, best_score = population[0], float("-inf")
    for it in range(1, cfg.iterations + 1):
        fresh = [sel for sel in dict.fromkeys(population) if sel not in scores]
        plans = [to_plan(choices, sel) for sel in fresh]
        values = score_many(plans) if score_many is not None and plans else [score(p) for p in plans]
        scores.update((sel, float(v)) for sel, v in zip(fresh, values, strict=True))
        new = len(fresh)
        ranked = sorted(dict.fromkeys(population), key=lambda s: (-scores[s], s))
        if scores[ranked[0]] > best_score:
            best, best_score = ranked[0], scores[ranked[0]]
        history.append(
            {
                "iteration": it,
                "best": best_score,
                "median": statistics.median(scores[s] for s in population),
                "new_evaluations": new,
                "evaluations": len(scores),
            }
        )
        elites = ranked[: cfg.elites]
        population = list(elites) + [
            mutate(choices, elites[int(rng.integers(len(elites)))], cfg.move_probability, rng)
            for _ in range(cfg.population - len(elites))
        ]
        if progress is not None:
            progress(it, best_score)
    return EEPResult(
        best=to_plan(choices, best),
        best_selection=best,
        best_score=best_score,
        history=history,
        evaluations=len(scores),
        seconds=time.perf_counter() - t0,
    )
