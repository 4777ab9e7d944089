"""One EvoESAP search run in a directory: teacher cache, search (resumable), run files.

Files in the run directory: ``search_state.json`` (checkpoint, during the search), ``plan.json``
(counts and removed experts per layer), ``search_history.json`` (per-generation history, reuse
statistics, timings), ``allocation.png`` and ``fitness.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..arch import moe_layers
from ..errors import MoepruneError
from ..evolve import EvolutionResult, progress_bar
from ..fitness import CandidateEvaluator, SearchSet
from ..plan import ExpertPlan
from .count_search import EvoConfig, search_counts
from .counts import uniform_allocation
from .plots import plot_allocation, plot_history
from .space import AllocationSpace, Counts, RemovalOrder, plan_from_counts

STATE_FILE = "search_state.json"
PLAN_FILE = "plan.json"
HISTORY_FILE = "search_history.json"


@dataclass
class SearchOutcome:
    space: AllocationSpace
    best: Counts
    uniform: Counts
    plan: ExpertPlan
    uniform_plan: ExpertPlan
    best_fitness: dict
    uniform_fitness: dict
    result: EvolutionResult[Counts]
    reuse: dict
    teacher: dict
    seconds: float
    files: dict[str, str] = field(default_factory=dict)

    def plan_json(self) -> dict:
        return {
            "counts_removed": {str(r.index): n for r, n in zip(self.space.layers, self.best, strict=True)},
            "uniform_counts_removed": {
                str(r.index): n for r, n in zip(self.space.layers, self.uniform, strict=True)
            },
            **self.plan.to_dict(),
            "fitness": self.best_fitness,
            "uniform_fitness": self.uniform_fitness,
        }

    def history_json(self) -> dict:
        return {
            "history": self.result.history,
            "evaluations": self.result.evaluations,
            "search_seconds": round(self.result.seconds, 3),
            "total_seconds": round(self.seconds, 3),
            "reuse": self.reuse,
            "teacher": self.teacher,
        }


def check_run_dir(
    out_dir: str | Path, resume: bool, overwrite: bool, state_files: tuple[str, ...] = (STATE_FILE,)
) -> Path:
    """Fail early (before any work) unless `out_dir` is new, resumable (`resume`: it holds the first
    of `state_files`) or may be replaced."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MoepruneError(f"output path {out} exists and is not a directory")
    if resume and not (out / state_files[0]).exists():
        raise MoepruneError(f"nothing to resume: {out / state_files[0]} does not exist")
    if out.exists() and not resume and not overwrite and any(out.iterdir()):
        raise MoepruneError(
            f"output directory {out} already exists; pass --resume to continue its search or --overwrite"
        )
    return out


def prepare_run_dir(
    out_dir: str | Path, resume: bool, overwrite: bool, state_files: tuple[str, ...] = (STATE_FILE,)
) -> Path:
    """The run directory: new, or (resume) one that holds a search state; with `overwrite` (and no
    `resume`) old search states are removed."""
    out = check_run_dir(out_dir, resume, overwrite, state_files)
    out.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for name in state_files:
            (out / name).unlink(missing_ok=True)
    return out


def _fitness_dict(r) -> dict:
    return {k: v for k, v in vars(r).items() if v is not None}


def run_search(
    model: nn.Module,
    order: RemovalOrder,
    search: SearchSet,
    out_dir: str | Path,
    *,
    sparsity: float,
    fitness: str = "esap",
    cache: str = "sparse",
    top_k: int = 64,
    config: EvoConfig = EvoConfig(),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    min_remove: dict[int, int] | None = None,
    max_remove: dict[int, int] | None = None,
    cache_bytes: int = 512 * 2**20,
    candidate_batch: int = 1,
) -> SearchOutcome:
    """Search the per-layer counts for `model` (unpruned, left unchanged) and write the run files.

    `order`: within-layer removal order per decoder layer (``criteria.removal_order``), fixed.
    `candidate_batch`: candidates stacked into one forward (see `CandidateEvaluator.evaluate_many`).
    """
    t0 = time.perf_counter()
    out = prepare_run_dir(out_dir, resume, overwrite)
    space = AllocationSpace.from_layers(
        moe_layers(model), sparsity=sparsity, min_remove=min_remove, max_remove=max_remove
    )
    uniform = uniform_allocation(space)
    plan_from_counts(space, order, uniform)  # a bad order fails before the teacher pass
    evaluator = CandidateEvaluator(
        model,
        search,
        fitness=fitness,
        cache=cache,
        top_k=top_k,
        cache_bytes=cache_bytes,
        candidate_batch=candidate_batch,
    )
    details: dict[Counts, object] = {}

    def score_many(many: list[Counts]) -> list[float]:
        results = evaluator.evaluate_many([plan_from_counts(space, order, c) for c in many])
        details.update(zip(many, results, strict=True))
        return [r.score for r in results]

    with progress_bar("EvoESAP", config.generations, enabled=progress) as bar:
        result = search_counts(
            space, score_many, config, state_path=out / STATE_FILE, resume=resume, progress=bar
        )
    best_r = details.get(result.best) or evaluator.evaluate(plan_from_counts(space, order, result.best))
    uni_r = details.get(uniform) or evaluator.evaluate(plan_from_counts(space, order, uniform))
    outcome = SearchOutcome(
        space=space,
        best=result.best,
        uniform=uniform,
        plan=plan_from_counts(space, order, result.best),
        uniform_plan=plan_from_counts(space, order, uniform),
        best_fitness=_fitness_dict(best_r),
        uniform_fitness=_fitness_dict(uni_r),
        result=result,
        reuse=evaluator.stats.as_dict() | {"hidden_cache_entries": len(evaluator.hidden)},
        teacher={
            "kind": cache,
            "top_k": top_k,
            "bytes": evaluator.teacher.nbytes(),
            "seconds": round(evaluator.teacher_seconds, 3),
            "scored_tokens": search.num_scored(),
        },
        seconds=time.perf_counter() - t0,
    )
    write_run_files(outcome, out, fitness)
    return outcome


def write_run_files(outcome: SearchOutcome, out: Path, fitness: str = "esap") -> dict[str, str]:
    """plan.json, search_history.json and the two plots into `out` (kept by the caller across saves)."""
    files = {
        PLAN_FILE: json.dumps(outcome.plan_json(), indent=1) + "\n",
        HISTORY_FILE: json.dumps(outcome.history_json(), indent=1) + "\n",
    }
    for name, text in files.items():
        (out / name).write_text(text)
    plot_allocation(outcome.space, outcome.best, outcome.uniform, out / "allocation.png")
    plot_history(outcome.result.history, out / "fitness.png", label=fitness)
    outcome.files = {
        name: str(out / name) for name in (PLAN_FILE, HISTORY_FILE, "allocation.png", "fitness.png")
    }
    return outcome.files
