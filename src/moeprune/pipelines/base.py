"""What every pipeline shares: the run context (inputs checked before any weight loads, the model,
statistics and teacher loaded once, on demand) and the `Choice` a pipeline returns.

A pipeline is ``choose(ctx) -> Choice``: which experts go (and, for EEP, how the others are merged
and how many each token uses). `pipelines.run` does the rest the same way for every allocation:
evaluate, apply the choice in place, save, report.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from ..arch import moe_layers
from ..errors import MoepruneError
from ..plan import ExpertPlan
from ..registry import Registry

STATE_FILE = "search_state.json"  # EvoESAP's checkpoint, kept beside the saved checkpoint
STATE_FILES = (STATE_FILE, "eep_prune_state.json", "eep_merge_state.json")  # every search's


@dataclass
class Choice:
    """A pipeline's decision, applied by surgery and recorded in ``moeprune.json``."""

    plan: ExpertPlan  # experts removed (with merges: every expert but the anchors)
    record: dict  # what goes into moeprune.json besides kept/removed ids and the recipe
    summary: str  # one line for people
    label: str = "pruned"  # the column name of the result in evaluation tables
    uniform: ExpertPlan | None = None  # the uniform plan of the same size, the baseline
    merges: dict | None = None  # {layer: merge.LayerMerge}: fold experts into the anchors
    active_experts: int | None = None  # route every token to this many experts
    files: dict[str, str | bytes] = field(default_factory=dict)  # run files beside the checkpoint
    card_plot: str | None = None  # a PNG among `files` shown in the model card
    details: dict = field(default_factory=dict)  # numbers for callers (search outcome, timings)


Pipeline = Callable[["RunContext"], Choice]
PIPELINES: Registry[Pipeline] = Registry("allocation")


def work_dir(out: Path) -> Path:
    """Where a search keeps its checkpoint until the run's output is written: ``.OUT.run``."""
    return out.parent / f".{out.name}.run"


class RunContext:
    """The inputs of one run, checked before any weight loads; the model, expert statistics and the
    teacher are built once, when a pipeline first asks for them."""

    def __init__(self, spec, *, overwrite: bool, resume: bool, progress: bool) -> None:
        from ..data import load_data
        from ..plan import validate_plan
        from ..recipe import placement
        from ..surgery.checkpoint import check_output_dir, load_tokenizer, skeleton

        self.spec, self.progress, self.resume = spec, progress, resume
        self.source = spec.model
        self.out = Path(spec.out)
        self.work = work_dir(self.out)
        searches = spec.allocation in ("evoesap", "eep")
        if resume:
            if not searches:
                raise MoepruneError(f"--resume continues a search; allocation '{spec.allocation}' has none")
            if not any((d / n).exists() for d in (self.work, self.out) for n in STATE_FILES):
                raise MoepruneError(f"nothing to resume: no search state for {self.out}")
            self.overwrite = True
        else:
            if self.out.exists() and not overwrite and searches:
                raise MoepruneError(
                    f"output directory {self.out} already exists; pass --resume to continue its search "
                    "or --overwrite to replace it"
                )
            check_output_dir(self.out, overwrite)
            self.overwrite = overwrite
        self.placement = placement(spec.device, spec.dtype)
        self.skeleton = skeleton(self.source)  # unsupported models fail here
        self.num_experts = {layer.index: layer.num_experts for layer in moe_layers(self.skeleton)}
        self.plan_file = ExpertPlan.from_json(spec.plan) if spec.plan is not None else None
        if self.plan_file is not None:
            validate_plan(self.skeleton, self.plan_file)
        self._stats = self._load_stats(spec.stats) if spec.stats is not None else None
        self._check_eep()
        self.tokenizer = load_tokenizer(self.source)

        def tokens(d):
            if d is None:
                return None
            return load_data(
                d.data, self.tokenizer, text_field=d.text_field, seq_len=d.seq_len, num_samples=d.samples,
                per_domain=d.per_domain, seed=spec.seed if d.seed is None else d.seed,
            )  # fmt: skip

        self.calibration = tokens(spec.calibration)
        self.search_tokens = tokens(spec.search.data if spec.search is not None else None)
        self.heldout_tokens = tokens(spec.evaluate.heldout if spec.evaluate is not None else None)
        if spec.evaluate is not None and spec.evaluate.suite not in (None, "testbed"):
            if not Path(spec.evaluate.suite).is_dir():
                raise MoepruneError(f"suite directory {spec.evaluate.suite} does not exist")
        if searches:  # Ray missing or its cluster unreachable: fail before any weight loads
            from ..execute import check_executor

            s = spec.search
            check_executor(s.executor, s.ray_address, s.workers, spec.device)

    def _load_stats(self, path: str):
        from ..criteria import get_criterion
        from ..observe import ExpertStats

        stats = ExpertStats.load(path)
        get_criterion(self.spec.criterion, stats)  # e.g. mop without the dense subsample
        stats.check_fits(self.num_experts)
        return stats

    def _check_eep(self) -> None:
        eep = self.spec.eep
        if eep is not None and eep.active_experts is not None:
            from ..merge.active import reduced_active_experts

            with reduced_active_experts(self.skeleton, eep.active_experts):  # a bad count fails here
                pass

    @cached_property
    def model(self):
        """The model, loaded once (after every check above passed)."""
        from ..surgery import load

        return load(self.source, **self.placement)

    @property
    def model_loaded(self) -> bool:
        return "model" in self.__dict__

    def stats(self):
        """Expert statistics: the saved ones, or one observation pass over the calibration data."""
        if self._stats is None:
            from ..criteria import observe_for

            self._stats = observe_for(
                self.model,
                self.calibration,
                [self.spec.criterion],
                seed=self.spec.seed,
                progress=self.progress,
            )
        return self._stats

    @cached_property
    def teacher(self):
        """The unpruned model run once on the search data (`fitness.TeacherRun`), shared by every
        evaluator of the run."""
        from ..fitness import SearchSet, run_teacher

        s = self.spec.search
        search = SearchSet.from_tokens(self.search_tokens)
        return run_teacher(self.model, search, cache=s.cache, top_k=s.top_k)

    @cached_property
    def executor(self):
        """Where the searches score their candidates (`moeprune.execute`), started once per run."""
        from ..execute import make_executor

        s = self.spec.search
        return make_executor(
            s.executor, model=lambda: self.model, teacher=self.teacher, source=self.source,
            moe_indices=list(self.num_experts), device=self.spec.device, dtype=self.spec.dtype,
            workers=s.workers, address=s.ray_address,
        )  # fmt: skip

    def close(self) -> None:
        """Release the executor's workers (when a pipeline started them)."""
        if "executor" in self.__dict__:
            self.__dict__.pop("executor").close()

    def state_path(self, name: str = STATE_FILE) -> Path:
        """A search checkpoint: in the work directory while the run goes on (a finished run's copy in
        the output directory is where a resume of a finished run starts)."""
        self.work.mkdir(parents=True, exist_ok=True)
        state = self.work / name
        if self.resume and not state.exists() and (self.out / name).exists():
            shutil.copy2(self.out / name, state)
        elif not self.resume and state.exists():
            state.unlink()  # a stale search of an earlier, unfinished run
        return state

    def clean_up(self) -> None:
        """Remove the work directory once the output holds everything."""
        shutil.rmtree(self.work, ignore_errors=True)
