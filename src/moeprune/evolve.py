"""The one evolutionary engine of moeprune: a `Problem` says what a candidate is, `evolve` does the rest.

    population = problem.initial_population(rng, P)
    for generation g = 1..G:
        score, in one call, the candidates not in the score cache (distinct, in population order)
            (with racing: slice by slice, against the worst elite; in generation 1 against the
            worst of the E candidates best on the first slice, which are scored on every slice,
            on the later slices)
        ranked = the distinct candidates by score (descending), ties by problem.tie_break; raced-out
            candidates after every fully scored one
        best-ever = ranked[0] when it beats the best so far
        history += {generation, best, population_best, median, new_evaluations, evaluations,
                    tokens_scored, raced_out, extras}
        elites = the first E fully scored candidates of ranked
        population = elites + problem.offspring(elites with scores, rng, P - len(elites))
        every `checkpoint_every` generations and after the last: write the state (atomic JSON)

The score cache is keyed by ``problem.key(candidate)`` (a string), so a candidate seen again is
never scored twice and a state file stores scores by key. A score function may return floats or
results with ``score`` and ``tokens`` (e.g. `fitness.FitnessResult`); then the state and the result
say how many tokens every candidate was scored on. All randomness comes from one numpy PCG64
generator seeded with ``config.seed`` and passed to the problem, in the order above; the state
file holds its state, the next population, the score cache, the history and the best candidate,
so a resumed run gives the result and history of an uninterrupted one, bit for bit. The state
starts with a header (the problem's `describe()` and the config); resuming a state written with
other settings is refused with a `MoepruneError` naming what differs. Only `generations` may grow
(the search continues) and `checkpoint_every` may change.

Racing (`moeprune.racing`): given a `Racing` instead of a score function, the engine scores a
generation's new candidates slice by slice and drops those clearly worse than the worst current
elite; a dropped candidate keeps its partial mean, is marked raced out (state: ``raced_out``) and
ranks below every fully scored candidate, so it never becomes an elite or the best. The elites are
always scored on every slice; in generation 1 (no elites yet) the E candidates best on the first
slice are scored in full first and the worst of them is the bar for the others on the later slices
(`Racing.race`'s `keep`). The worst elite's per-token values are kept from its
scoring, or recomputed (deterministically, outside the history) when missing, e.g. after a resume.

Three problems plug in: EvoESAP's per-layer counts (`allocate.count_search`), EEP's expert
selections (`merge.selection_search`) and EEP's merging matrices (`merge.merge_search`).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from .errors import MoepruneError
from .racing import Racing

__all__ = [
    "STATE_VERSION",
    "EvolutionConfig",
    "EvolutionResult",
    "Problem",
    "evolve",
    "map_scoring",
    "progress_bar",
    "score_each",
    "write_json_atomic",
]

STATE_VERSION = 3

C = TypeVar("C")  # a candidate


class Problem(Protocol[C]):
    """What `evolve` needs to know about one kind of candidate."""

    def describe(self) -> dict:
        """The problem's settings as JSON (the search space, mutation rates...), for the state header:
        a state is resumed only by the same problem."""
        ...

    def initial_population(self, rng: np.random.Generator, size: int) -> list[C]:
        """The first population: `size` candidates."""
        ...

    def offspring(self, elites: list[tuple[C, float]], rng: np.random.Generator, count: int) -> list[C]:
        """`count` new candidates bred from the elites (best first, with their scores)."""
        ...

    def key(self, candidate: C) -> str:
        """A string that identifies the candidate exactly (the score cache's key)."""
        ...

    def tie_break(self, candidate: C) -> Any:
        """Orders candidates of equal score (ascending); a constant keeps the population order."""
        ...

    def encode(self, candidate: C) -> Any:
        """The candidate as JSON; ``decode(encode(c))`` must give `c` back exactly."""
        ...

    def decode(self, data: Any) -> C: ...

    def history_extras(self, best: C) -> dict:
        """Problem-specific fields of a history row (e.g. the best counts); {} for none."""
        ...


@dataclass(frozen=True)
class EvolutionConfig:
    population: int = 32
    generations: int = 50
    elites: int = 4  # at most `population` are kept
    seed: int = 0
    checkpoint_every: int = 5

    def __post_init__(self) -> None:
        if self.population < 1 or self.generations < 1 or self.elites < 1:
            raise MoepruneError("population, generations and elites must be >= 1")
        if self.checkpoint_every < 1:
            raise MoepruneError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")


@dataclass
class EvolutionResult(Generic[C]):
    best: C
    best_score: float
    history: list[dict]  # one row per generation (module docstring)
    evaluations: int  # distinct candidates scored (the size of the score cache)
    scores: dict[str, float] = field(repr=False)  # problem.key(candidate) -> score
    seconds: float = 0.0  # in this process (a resumed run counts from the resume)
    tokens: dict[str, int] = field(default_factory=dict, repr=False)  # key -> tokens scored on (if told)
    raced_out: list[str] = field(default_factory=list)  # keys of the candidates racing dropped


# config fields that may differ when resuming: they do not change what a generation computes
_RESUMABLE_CHANGES = ("generations", "checkpoint_every")


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON to `path` through a temporary file and a rename: a reader (or a kill) never sees
    half a file. Creates the parent directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _header(problem: Problem, config: EvolutionConfig, racing: Racing | None) -> dict:
    settings = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE_CHANGES}
    header = {
        "version": STATE_VERSION,
        "problem": problem.describe(),
        "config": settings,
        "racing": racing.describe() if racing is not None else None,
    }
    return json.loads(json.dumps(header))


def _score_of(value: Any) -> tuple[float, int | None]:
    """(score, tokens) of what a score function returned: a float or a result with ``score``."""
    if hasattr(value, "score"):
        tokens = getattr(value, "tokens", None)
        return float(value.score), None if tokens is None else int(tokens)
    return float(value), None


def _first_difference(saved: Any, now: Any, where: str = "") -> str | None:
    """'where: saved vs now' for the first place two JSON values differ, else None."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in list(saved) + [k for k in now if k not in saved]:
            found = _first_difference(saved.get(k), now.get(k), f"{where}.{k}" if where else str(k))
            if found:
                return found
        return None
    if isinstance(saved, list) and isinstance(now, list) and len(saved) == len(now):
        for i, (a, b) in enumerate(zip(saved, now, strict=True)):
            found = _first_difference(a, b, f"{where}[{i}]")
            if found:
                return found
        return None
    if saved != now:
        show = lambda v: json.dumps(v)[:60]  # noqa: E731
        return f"{where or 'state'}: {show(saved)} in the state, {show(now)} now"
    return None


def _load_state(path: Path, header: dict, config: EvolutionConfig) -> dict:
    try:
        state = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MoepruneError(f"search state {path} is not valid JSON ({e}); start a new run") from None
    diff = _first_difference({k: state.get(k) for k in header}, header)
    if diff:
        raise MoepruneError(
            f"{path} holds a search with other settings ({diff}); resume with the same settings or "
            "start a new run elsewhere"
        )
    if state["generation"] > config.generations:
        raise MoepruneError(
            f"{path} has already run {state['generation']} generations, more than the {config.generations} "
            "asked for; ask for at least as many"
        )
    return state


class IterationSettings:
    """For a search's config (a dataclass with population, iterations, elites, seed and
    checkpoint_every) whose `iterations` are the engine's generations."""

    def evolution(self) -> EvolutionConfig:
        """The engine's part of the settings."""
        return EvolutionConfig(
            population=self.population,  # type: ignore[attr-defined]
            generations=self.iterations,  # type: ignore[attr-defined]
            elites=self.elites,  # type: ignore[attr-defined]
            seed=self.seed,  # type: ignore[attr-defined]
            checkpoint_every=self.checkpoint_every,  # type: ignore[attr-defined]
        )


def evolve(
    problem: Problem[C],
    score_many: Callable[[list[C]], Sequence[Any]] | Racing,
    config: EvolutionConfig = EvolutionConfig(),
    *,
    state_path: str | Path | None = None,
    resume: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> EvolutionResult[C]:
    """Maximise the score of `problem`'s candidates (module docstring).

    `score_many` scores a generation's new candidates in one call (distinct, in population order;
    floats, or results with ``score`` and ``tokens``, in the same order); a `racing.Racing` races
    them instead. With `state_path` the state is written every ``config.checkpoint_every``
    generations and after the last; with `resume` the search continues from that file when it exists
    (it must hold the same problem and settings). `progress` is called after every generation (after
    its checkpoint) with (generation, best-ever score).
    """
    t0 = time.perf_counter()
    path = Path(state_path) if state_path is not None else None
    racing = score_many if isinstance(score_many, Racing) else None
    header = _header(problem, config, racing)
    rng = np.random.Generator(np.random.PCG64(config.seed))
    scores: dict[str, float] = {}
    tokens: dict[str, int] = {}
    raced_out: list[str] = []  # in the order they were dropped
    elite_keys: list[str] = []  # the current elites, best first
    elite_values: dict[str, np.ndarray] = {}  # their per-token values (racing), where known
    history: list[dict] = []
    best: C | None = None
    best_score = float("-inf")
    done = 0
    if resume and path is not None and path.exists():
        state = _load_state(path, header, config)
        rng.bit_generator.state = state["rng"]
        population = [problem.decode(c) for c in state["population"]]
        scores = {str(k): float(v) for k, v in state["scores"].items()}
        tokens = {str(k): int(v) for k, v in state["tokens"].items()}
        raced_out, elite_keys = list(state["raced_out"]), list(state["elites"])
        history = state["history"]
        best, best_score = problem.decode(state["best"]), float(state["best_score"])
        done = int(state["generation"])
    else:
        population = problem.initial_population(rng, config.population)

    for generation in range(done + 1, config.generations + 1):
        keys = [problem.key(c) for c in population]
        first: dict[str, C] = {}
        for k, c in zip(keys, population, strict=True):
            first.setdefault(k, c)
        distinct = list(first.items())  # in population order
        fresh = [c for k, c in distinct if k not in scores]
        dropped = set(raced_out)
        if racing is None:
            values = list(score_many(fresh)) if fresh else []  # type: ignore[operator]
            if len(values) != len(fresh):
                raise MoepruneError(f"score_many returned {len(values)} scores for {len(fresh)} candidates")
            for c, v in zip(fresh, values, strict=True):
                score, n = _score_of(v)
                scores[problem.key(c)] = score
                if n is not None:
                    tokens[problem.key(c)] = n
        elif fresh:
            reference = None
            if elite_keys and not math.isinf(racing.z):  # against the worst elite (generation 1: none,
                # the candidates best on the first slice are scored in full and set the bar)
                worst = elite_keys[-1]
                if worst not in elite_values:  # e.g. after a resume: score it again, outside the history
                    elite_values[worst] = racing.race([first[worst]], None)[0][0].token_scores()
                reference = elite_values[worst]
            results, out = racing.race(fresh, reference, keep=config.elites)
            for c, r, o in zip(fresh, results, out, strict=True):
                k = problem.key(c)
                scores[k], tokens[k] = float(r.score), int(r.tokens)
                if o:
                    raced_out.append(k)
                    dropped.add(k)
                else:
                    elite_values[k] = r.token_scores()
        ranked = sorted(distinct, key=lambda kc: (kc[0] in dropped, -scores[kc[0]], problem.tie_break(kc[1])))
        top_key, top = ranked[0]
        if best is None or scores[top_key] > best_score:
            best, best_score = top, scores[top_key]
        new_keys = [problem.key(c) for c in fresh]
        told = all(k in tokens for k in new_keys)  # the score function says how many tokens it scored
        history.append(
            {
                "generation": generation,
                "best": best_score,
                "population_best": scores[top_key],
                "median": statistics.median(scores[k] for k in keys),
                "new_evaluations": len(fresh),
                "evaluations": len(scores),
                "tokens_scored": sum(tokens[k] for k in new_keys) if told else None,
                "raced_out": sum(k in dropped for k in new_keys),
                **problem.history_extras(best),
            }
        )
        elites = [(k, c) for k, c in ranked if k not in dropped][: config.elites]
        elite_keys = [k for k, _ in elites]
        elite_values = {k: elite_values[k] for k in elite_keys if k in elite_values}
        population = [c for _, c in elites] + problem.offspring(
            [(c, scores[k]) for k, c in elites], rng, config.population - len(elites)
        )
        if path is not None and (
            generation % config.checkpoint_every == 0 or generation == config.generations
        ):
            write_json_atomic(
                path,
                {
                    **header,
                    "generation": generation,
                    "population": [problem.encode(c) for c in population],
                    "rng": rng.bit_generator.state,
                    "scores": scores,
                    "tokens": tokens,
                    "raced_out": raced_out,
                    "elites": elite_keys,
                    "history": history,
                    "best": problem.encode(best),
                    "best_score": best_score,
                },
            )
        if progress is not None:
            progress(generation, best_score)
    if best is None:  # a resumed state always has a best; a fresh run scores at least one generation
        raise MoepruneError("the search ran no generation")
    return EvolutionResult(
        best=best,
        best_score=best_score,
        history=history,
        evaluations=len(scores),
        scores=scores,
        seconds=time.perf_counter() - t0,
        tokens=tokens,
        raced_out=raced_out,
    )


def map_scoring(score_many: Callable | Racing, convert: Callable[[Any], Any]) -> Callable | Racing:
    """`score_many` (a score function or a `Racing`) for candidates that `convert` turns into its own."""
    if isinstance(score_many, Racing):
        return score_many.mapped(convert)
    return lambda candidates: score_many([convert(c) for c in candidates])


def score_each(score: Callable[[C], float]) -> Callable[[list[C]], list[float]]:
    """A `score_many` for `evolve` from a function that scores one candidate."""
    return lambda candidates: [score(c) for c in candidates]


@contextmanager
def progress_bar(
    title: str, generations: int, enabled: bool = True
) -> Iterator[Callable[[int, float], None]]:
    """A rich progress bar over generations with the best score; yields the `progress` callback for
    `evolve` (a no-op when not `enabled`)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(title), BarColumn(), MofNCompleteColumn(), TextColumn("best {task.fields[best]}"),
        TimeElapsedColumn(), disable=not enabled, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(title, total=generations, best="-")
        yield lambda generation, best: bar.update(task, completed=generation, best=f"{best:.5f}")
