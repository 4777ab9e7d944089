"""EvoESAP: evolutionary search of the per-layer removal counts, maximising a fitness (ESAP).

    population P: one plan per init pattern (patterns.SPEC_ORDER), the rest from `random`
    for generation g = 1..G:
        score every plan not in the score cache
        keep the best-ever plan; elites = the best E distinct plans of the population
        next population = elites + mutants of uniformly drawn elites until P
    mutate(plan): t = min(U{1..M}, U{1..M}) moves; each move picks src with n_src > min_src,
        dst != src with room, delta ~ U{1..D}; n_src -= delta, n_dst += delta; an invalid move is
        retried (at most A attempts per move)

Deterministic for a seed (numpy PCG64). Every `checkpoint_every` generations the state (next
population, score cache, RNG state, history, best) is written atomically to a JSON file; a run
resumed from it produces the same plan and history as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import MoepruneError
from .counts import counts_from_weights
from .patterns import INIT_PATTERNS, SPEC_ORDER
from .space import AllocationSpace, Counts

STATE_VERSION = 1


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
        if self.population < 1 or self.generations < 1 or self.elites < 1:
            raise MoepruneError("population, generations and elites must be >= 1")
        for name in self.init_patterns:
            INIT_PATTERNS.get(name)


@dataclass
class EvoResult:
    best: Counts
    best_score: float
    history: list[dict]
    evaluations: int
    scores: dict[Counts, float] = field(repr=False)
    seconds: float = 0.0


def _key(c: Counts) -> str:
    return ",".join(map(str, c))


def _unkey(s: str) -> Counts:
    return tuple(int(x) for x in s.split(",")) if s else ()


def initial_population(space: AllocationSpace, cfg: EvoConfig, rng: np.random.Generator) -> list[Counts]:
    n = len(space.layers)
    names = list(cfg.init_patterns[: cfg.population])
    names += ["random"] * (cfg.population - len(names))
    return [counts_from_weights(space, INIT_PATTERNS.get(name)(n, rng)) for name in names]


def mutate(space: AllocationSpace, counts: Counts, cfg: EvoConfig, rng: np.random.Generator) -> Counts:
    """t = min(U{1..M}, U{1..M}) budget-preserving moves of delta ~ U{1..D} experts between layers."""
    c = list(counts)
    rooms = space.layers
    moves = min(int(rng.integers(1, cfg.max_moves + 1)), int(rng.integers(1, cfg.max_moves + 1)))
    for _ in range(moves):
        for _ in range(cfg.attempts):
            src_ok = [i for i, r in enumerate(rooms) if c[i] > r.min_remove]
            dst_ok = [i for i, r in enumerate(rooms) if c[i] < r.max_remove]
            if not src_ok or not dst_ok:
                break
            src = src_ok[int(rng.integers(len(src_ok)))]
            dst = dst_ok[int(rng.integers(len(dst_ok)))]
            delta = int(rng.integers(1, cfg.max_delta + 1))
            if src != dst and rooms[src].allows(c[src] - delta) and rooms[dst].allows(c[dst] + delta):
                c[src] -= delta
                c[dst] += delta
                break
    return tuple(c)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress:
    """A rich progress bar over candidate evaluations with the best fitness, or nothing."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("EvoESAP gen {task.fields[gen]}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("best {task.fields[best]}"),
                TimeElapsedColumn(),
                transient=False,
            )
            self.task = self.bar.add_task("search", total=total, completed=done, gen=done, best="-")
            self.bar.start()

    def update(self, generation: int, best: float | None) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task, completed=generation, gen=generation, best="-" if best is None else f"{best:.5f}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def evolve(
    space: AllocationSpace,
    score: Callable[[Counts], float],
    cfg: EvoConfig = EvoConfig(),
    *,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: bool = False,
    on_evaluated: Callable[[Counts, float], None] | None = None,
    score_many: Callable[[list[Counts]], list[float]] | None = None,
) -> EvoResult:
    """Maximise ``score(counts)`` over `space` (see the module docstring). ``resume`` continues from
    `state_path` when it exists (the same space and config are required). ``score_many``, when
    given, scores a generation's new plans in one call (in population order), e.g. stacked."""
    t0 = time.perf_counter()
    state_path = Path(state_path) if state_path is not None else None
    header = {"version": STATE_VERSION, "config": asdict(cfg), "space": space.as_dict()}
    header["config"]["init_patterns"] = list(cfg.init_patterns)
    rng = np.random.Generator(np.random.PCG64(cfg.seed))
    scores: dict[Counts, float] = {}
    history: list[dict] = []
    best: Counts | None = None
    best_score = float("-inf")
    done = 0
    if resume and state_path is not None and state_path.exists():
        state = json.loads(state_path.read_text())
        if {k: state.get(k) for k in header} != json.loads(json.dumps(header)):
            raise MoepruneError(
                f"{state_path} holds a search with other settings (model, sparsity, population, seed...); "
                "start a new run in another directory"
            )
        rng.bit_generator.state = state["rng"]
        population = [tuple(p) for p in state["population"]]
        scores = {_unkey(k): v for k, v in state["scores"].items()}
        history = state["history"]
        best, best_score = tuple(state["best"]), state["best_score"]
        done = state["generation"]
    else:
        population = initial_population(space, cfg, rng)

    bar = _Progress(progress, cfg.generations, done)
    try:
        for gen in range(done + 1, cfg.generations + 1):
            fresh = [c for c in dict.fromkeys(population) if c not in scores]
            values = score_many(fresh) if score_many is not None and fresh else None
            for k, c in enumerate(fresh):
                scores[c] = float(values[k] if values is not None else score(c))
                if on_evaluated is not None:
                    on_evaluated(c, scores[c])
            new = len(fresh)
            ranked = sorted(dict.fromkeys(population), key=lambda c: (-scores[c], c))
            if best is None or scores[ranked[0]] > best_score:
                best, best_score = ranked[0], scores[ranked[0]]
            pop_scores = [scores[c] for c in population]
            history.append(
                {
                    "generation": gen,
                    "best": best_score,
                    "best_counts": list(best),
                    "population_best": scores[ranked[0]],
                    "median": statistics.median(pop_scores),
                    "new_evaluations": new,
                    "evaluations": len(scores),
                }
            )
            elites = ranked[: cfg.elites]
            population = list(elites) + [
                mutate(space, elites[int(rng.integers(len(elites)))], cfg, rng)
                for _ in range(cfg.population - len(elites))
            ]
            bar.update(gen, best_score)
            if state_path is not None and (gen % cfg.checkpoint_every == 0 or gen == cfg.generations):
                _write_json_atomic(
                    state_path,
                    {
                        **header,
                        "generation": gen,
                        "population": [list(p) for p in population],
                        "rng": rng.bit_generator.state,
                        "scores": {_key(k): v for k, v in scores.items()},
                        "history": history,
                        "best": list(best),
                        "best_score": best_score,
                    },
                )
    finally:
        bar.close()
    assert best is not None
    return EvoResult(
        best=best,
        best_score=best_score,
        history=history,
        evaluations=len(scores),
        scores=scores,
        seconds=time.perf_counter() - t0,
    )
