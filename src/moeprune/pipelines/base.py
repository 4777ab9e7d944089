"""What every pipeline shares: the run context (inputs checked before any weight loads, the model,
statistics and teacher loaded once, on demand) and the `Choice` a pipeline returns.

A pipeline is ``choose(ctx) -> Choice``: which experts go (and, for EEP, how the others are merged
and how many each token uses). `pipelines.run` does the rest the same way for every allocation:
evaluate, apply the choice in place, save, report.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from ..arch import moe_layers
from ..errors import MoepruneError, MoepruneWarning
from ..plan import ExpertPlan
from ..preflight import (
    check_readable_file,
    check_weights,
    folder_fingerprint,
    max_positions,
    model_fingerprint,
    model_source,
)
from ..recipe import PIPELINES  # noqa: F401  (re-exported: the registry of pipelines)

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


Pipeline = Callable[["RunContext"], Choice]  # what `recipe.PIPELINES` names


def work_dir(out: Path) -> Path:
    """Where a search keeps its checkpoint until the run's output is written: ``.OUT.run``."""
    return out.parent / f".{out.name}.run"


class RunContext:
    """The inputs of one run, checked before any weight loads; the model, expert statistics and the
    teacher are built once, when a pipeline first asks for them. Holds the lock on the output from
    the first check to `close` (two runs never write one output)."""

    def __init__(self, spec, *, overwrite: bool, resume: bool, progress: bool) -> None:
        self._stack = ExitStack()
        try:
            self._check(spec, overwrite=overwrite, resume=resume, progress=progress)
        except BaseException:
            self.close()
            raise

    def _check(self, spec, *, overwrite: bool, resume: bool, progress: bool) -> None:
        from ..data import is_prompt_set, load_data, tokenize_rows
        from ..plan import validate_plan
        from ..recipe import placement
        from ..surgery.checkpoint import check_output_dir, load_tokenizer, output_lock, skeleton

        self.spec, self.progress, self.resume = spec, progress, resume
        self.source = spec.model
        self.out = Path(spec.out)
        self.work = work_dir(self.out)
        self.identity: dict | None = None
        inputs = (spec.plan, spec.stats) + tuple(d.data for d in _data_specs(spec).values() if d is not None)
        searches = spec.allocation in ("evoesap", "eep")
        if spec.plan is not None:
            check_readable_file(spec.plan, "plan file")
        # where the output goes (whether it may exist already is decided below, under the lock)
        check_output_dir(self.out, True, inputs=inputs, model=spec.model)
        self._stack.enter_context(output_lock(self.out))
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
        self.placement = placement(spec.device, spec.dtype, offload_folder=self.work / "offload")
        self.skeleton = skeleton(self.source)  # unsupported models fail here
        folder = model_source(self.source)
        if folder is not None:
            check_weights(folder)  # missing, truncated or corrupt weight files fail here
        self.spec, notes = _fit_positions(spec, max_positions(self.skeleton.config))
        spec = self.spec
        self.num_experts = {layer.index: layer.num_experts for layer in moe_layers(self.skeleton)}
        self.plan_file = None
        if spec.plan is not None:
            self.plan_file = ExpertPlan.from_json(check_readable_file(spec.plan, "plan file"))
            validate_plan(self.skeleton, self.plan_file)
        elif spec.uniform_from is not None:
            self.plan_file = self._nearest_uniform(spec.uniform_from)
            validate_plan(self.skeleton, self.plan_file)
        self._stats = self._load_stats(spec.stats) if spec.stats is not None else None
        self._check_eep()
        self._check_space()
        self.tokenizer = load_tokenizer(self.source)

        def tokens(d, rows=None):
            if d is None:
                return None
            seed = spec.seed if d.seed is None else d.seed
            if rows is not None:  # already read: tokenised, not read again
                if self.tokenizer is None:
                    raise MoepruneError("the model has no tokenizer, so text data cannot be tokenised")
                return tokenize_rows(
                    rows, self.tokenizer, seq_len=d.seq_len, num_samples=d.samples, per_domain=d.per_domain, seed=seed
                )  # fmt: skip
            return load_data(
                d.data, self.tokenizer, text_field=d.text_field, seq_len=d.seq_len, num_samples=d.samples,
                per_domain=d.per_domain, seed=seed,
            )  # fmt: skip

        self.calibration = tokens(spec.calibration)
        rows = self._search_rows(spec.search.data) if spec.search is not None else None
        self.search_prompts = rows if rows is not None and is_prompt_set(rows) else None
        on_policy = self.search_prompts is not None
        search = spec.search.data if spec.search is not None and not on_policy else None
        self.search_tokens = tokens(search, rows)
        self.layerwise, self._layers_notice = self._execution(on_policy)
        if self.layerwise and spec.search is not None and spec.search.racing:
            # layer by layer every racing slice would be one more stream of the checkpoint per
            # generation: the exact search, one stream per generation (recipe.yaml says racing: false)
            search = spec.search.model_copy(update={"racing": False})
            self.spec = spec = spec.model_copy(update={"search": search})
        self.heldout_tokens = tokens(spec.evaluate.heldout if spec.evaluate is not None else None)
        if spec.evaluate is not None and spec.evaluate.suite not in (None, "testbed"):
            if not Path(spec.evaluate.suite).is_dir():
                raise MoepruneError(f"suite directory {spec.evaluate.suite} does not exist")
        if searches:  # Ray missing or its cluster unreachable: fail before any weight loads
            from ..execute import check_executor

            s = spec.search
            check_executor(s.executor, s.ray_address, s.workers, spec.device)
            self.identity = self._identity()
            if resume:
                self._check_identity()
        for note in notes:  # once every check passed: a failing run says only what failed
            warnings.warn(note, MoepruneWarning, stacklevel=4)

    def _nearest_uniform(self, run_dir: str) -> ExpertPlan:
        """The uniform plan nearest to the plan a search saved in `run_dir` (`allocate.nearest_uniform`),
        by the removal order the search recorded."""
        from ..allocate.nearest_uniform import ORDER_FILE, check_order, nearest_uniform, run_order, run_plan
        from ..plan import layer_bounds

        searched, order = run_plan(run_dir), run_order(run_dir)
        if order is None:
            raise MoepruneError(
                f"{run_dir} holds no {ORDER_FILE} (a search by an older moeprune); run the search again"
            )
        bounds = {layer.index: layer_bounds(layer) for layer in moe_layers(self.skeleton)}
        groups = {i: b.step for i, b in bounds.items()}
        check_order(searched, order, groups)
        return nearest_uniform(
            searched, order, groups=groups, max_remove={i: b.max_remove for i, b in bounds.items()}
        )

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

            top_k = min(layer.top_k for layer in moe_layers(self.skeleton))
            if eep.active_experts >= top_k:
                raise MoepruneError(
                    f"--active-experts {eep.active_experts} must be below the model's top-k of {top_k} "
                    "(it lowers the experts each token uses)"
                )
            with reduced_active_experts(self.skeleton, eep.active_experts):  # a bad count fails here
                pass

    def _check_space(self) -> None:
        """Refuse early when even the smallest checkpoint this run can write does not fit on the disk
        (the save checks the exact size again)."""
        from ..surgery.checkpoint import check_free_space

        dtype = getattr(self.skeleton.config, "dtype", None)
        itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else 4
        share = self.spec.sparsity or 0.0
        if self.plan_file is not None:
            share = self.plan_file.total_removed() / max(1, sum(self.num_experts.values()))
        total = sum(p.numel() for p in self.skeleton.parameters()) * itemsize
        check_free_space(self.out, int(total * (1.0 - share)))

    def _execution(self, on_policy: bool) -> tuple[bool, str | None]:
        """(whether the run executes layer by layer, the notice to print when that was chosen for it)."""
        from ..execute.budget import layers_notice
        from ..surgery.streaming import local_checkpoint

        spec = self.spec
        if spec.mode == "layers":
            if local_checkpoint(self.source) is None:
                raise MoepruneError(
                    f"mode layers reads a local safetensors checkpoint (a directory or a cached hub id), not "
                    f"'{self.source}'"
                )
            if on_policy:
                raise MoepruneError(
                    "mode layers: on-policy search data (prompt rows) needs the model in memory to write the "
                    "continuations; give text search data, or continue the prompts with a model that fits"
                )
            return True, None
        in_memory_only = on_policy or (spec.evaluate is not None and spec.evaluate.lm_eval)
        if spec.mode != "auto" or in_memory_only:
            return False, None  # needs the model in memory: the load says what does not fit
        notice = layers_notice(self.source, spec.device, spec.dtype)
        return notice is not None, notice

    @cached_property
    def layers(self):
        """The model executed one decoder layer at a time from its checkpoint (`execute.LayerwiseModel`)."""
        import sys

        from ..execute import LayerwiseModel

        if self._layers_notice:
            print(self._layers_notice, file=sys.stderr)
        device = self.placement.get("device_map", "cpu")
        return LayerwiseModel(
            self.source, device=device, dtype=self.spec.dtype, spill_dir=self.work, progress=self.progress
        )

    @property
    def search_model(self):
        """What the searches read the MoE layers from: the model, or layer by layer its skeleton."""
        return self.skeleton if self.layerwise else self.model

    @cached_property
    def model(self):
        """The model, loaded once (after every check above passed)."""
        from ..surgery import load

        if self.layerwise:
            raise MoepruneError("internal: the model is not loaded whole in mode layers")
        return load(self.source, **self.placement)

    @property
    def model_loaded(self) -> bool:
        return "model" in self.__dict__

    def stats(self):
        """Expert statistics: the saved ones, or one observation pass over the calibration data (layer
        by layer: one stream of the checkpoint for the statistics and the teacher together)."""
        if self._stats is None and self.layerwise:
            self._layer_pass()
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
        from ..fitness import run_teacher

        s = self.spec.search
        if self.search_tokens is None:  # on-policy: the model writes what it is scored on
            self.search_tokens = self._continue_prompts()
        search = self._search_set()
        if self.layerwise:
            return self.layers.run_teacher(search, cache=s.cache, top_k=s.top_k, nucleus_p=s.nucleus_p)
        return run_teacher(self.model, search, cache=s.cache, top_k=s.top_k, nucleus_p=s.nucleus_p)

    def _search_set(self):
        from ..fitness import SearchSet

        # racing on or off: the same batches, rows in the data seed's random order (every batch holds
        # every domain, so racing's first slices stand for the whole set)
        s = self.spec.search
        seed = self.spec.seed if s.data.seed is None else s.data.seed
        return SearchSet.from_tokens(self.search_tokens, min_batches=s.racing_slices, shuffle_seed=seed)

    def _layer_pass(self) -> None:
        """Layer by layer: the statistics, and the teacher when the run searches, from ONE stream of
        the checkpoint."""
        from ..criteria import CRITERIA
        from ..criteria.rank import supported_criteria

        s = self.spec.search
        search = self._search_set() if s is not None and "teacher" not in self.__dict__ else None
        dense = self.spec.criterion is not None and CRITERIA.get(self.spec.criterion).needs_dense
        teacher_options = {"cache": s.cache, "top_k": s.top_k, "nucleus_p": s.nucleus_p} if s else {}
        stats, teacher = self.layers.run_pass(
            calibration=self.calibration, dense_tokens=2048 if dense else 0, seed=self.spec.seed,
            search=search, **teacher_options,
        )  # fmt: skip
        stats.meta["criteria_supported"] = supported_criteria(stats)
        self._stats = stats
        if teacher is not None:
            self.__dict__["teacher"] = teacher

    def _search_rows(self, d):
        """The search data's rows, read once (before any weight loads); None for a weighted mixture
        (each source is read by `data.load_data`)."""
        from ..data import read_rows
        from ..data.build import mixture

        if len(mixture(d.data)) > 1:
            return None
        return read_rows(d.data, text_field=d.text_field)

    def _continue_prompts(self):
        """On-policy search data: the unpruned model continues the prompts (greedy, or sampled with
        the seed); kept in the work directory, keyed by everything that decides it, for a resume."""
        import hashlib
        import json

        import torch

        from ..data import TokenSet, continue_prompts

        s, d = self.spec.search, self.spec.search.data
        seed = self.spec.seed if d.seed is None else d.seed
        key = json.dumps([self.source, d.model_dump(), *_generation(s), seed], sort_keys=True, default=str)
        cached = self.work / f"onpolicy-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
        if cached.exists():
            return TokenSet(**torch.load(cached))
        data = continue_prompts(
            self.model, self.tokenizer, self.search_prompts, gen_tokens=s.gen_tokens, num_samples=d.samples,
            sample=s.sample, seed=seed, stop=s.gen_stop,
        )  # fmt: skip
        self.work.mkdir(parents=True, exist_ok=True)
        torch.save(vars(data), cached)
        return data

    @cached_property
    def executor(self):
        """Where the searches score their candidates (`moeprune.execute`), started once per run."""
        from ..execute import make_executor

        s = self.spec.search
        return make_executor(
            s.executor, model=lambda: self.layers if self.layerwise else self.model, teacher=self.teacher,
            source=self.source, moe_indices=list(self.num_experts), device=self.spec.device,
            dtype=self.spec.dtype, workers=s.workers, address=s.ray_address, layers=self.layerwise,
        )  # fmt: skip

    def state_path(self, name: str = STATE_FILE) -> Path:
        """A search checkpoint: in the work directory while the run goes on (a finished run's copy in
        the output directory is where a resume of a finished run starts), with ``identity.json``
        beside it: what the saved search is a search of (`--resume` requires the same)."""
        self.work.mkdir(parents=True, exist_ok=True)
        state = self.work / name
        if self.resume and not state.exists() and (self.out / name).exists():
            shutil.copy2(self.out / name, state)
        elif not self.resume and state.exists():
            state.unlink()  # a stale search of an earlier, unfinished run
        (self.work / IDENTITY_FILE).write_text(self.identity_json())
        return state

    def identity_json(self) -> str:
        return json.dumps(self.identity, indent=1, sort_keys=True) + "\n"

    def _identity(self) -> dict:
        """Everything that decides a search's result (see `IDENTITY_NAMES`); a resume must match it."""
        s, search, eep = self.spec, self.spec.search, self.spec.eep
        statistics = None
        if s.stats is not None:
            statistics = {"stats": folder_fingerprint(s.stats)}
        elif self.calibration is not None:
            statistics = {"calibration": self.calibration.fingerprint}
        out = {
            "allocation": s.allocation,
            "model": model_fingerprint(self.source, self.skeleton.config),
            "dtype": s.dtype,
            "sparsity": s.sparsity,
            "criterion": s.criterion,
            "statistics": statistics,
            "fitness": search.fitness,
            "cache": search.cache,
            "top_k": search.top_k if search.cache in ("sparse", "nucleus") else None,
            "nucleus_p": search.nucleus_p if search.cache == "nucleus" else None,
            "search_data": self._search_fingerprint(),
            "search_rows": "in the data seed's random order",  # `_search_set` (earlier versions: as loaded)
            "min_remove": {str(k): v for k, v in sorted((search.min_remove or {}).items())} or None,
            "max_remove": {str(k): v for k, v in sorted((search.max_remove or {}).items())} or None,
            "racing": f"z {search.racing_z}, {search.racing_slices} slices" if search.racing else "off",
            "seed": s.seed,
        }
        if s.allocation == "eep":
            e = eep.model_dump() if eep is not None else {}
            out |= {f"eep.{k}": v for k, v in sorted(e.items())}
        else:
            out |= {"population": search.population, "generations": search.generations}
        return out

    def _search_fingerprint(self) -> str:
        """The search tokens' fingerprint; for on-policy data, of the prompts and how they are continued."""
        if self.search_tokens is not None:
            return self.search_tokens.fingerprint
        import hashlib

        s = self.spec.search
        rows = [(r.prompt, r.messages) for r in self.search_prompts]
        key = json.dumps([rows, s.data.model_dump(), *_generation(s)], sort_keys=True, default=str)
        return "prompts:" + hashlib.sha256(key.encode()).hexdigest()[:16]

    def _check_identity(self) -> None:
        """Refuse `--resume` when the saved search is of another model, data or setting."""
        where = self.work if any((self.work / n).exists() for n in STATE_FILES) else self.out
        saved_at = where / IDENTITY_FILE
        try:
            saved = json.loads(saved_at.read_text())
        except (OSError, ValueError):
            raise MoepruneError(
                f"--resume: the saved search for {self.out} does not record what it searched "
                "(made by an older moeprune or damaged); start over with --overwrite"
            ) from None
        now = json.loads(self.identity_json())
        order = {k: i for i, k in enumerate(IDENTITY_NAMES)}
        for key in sorted(now.keys() | saved.keys(), key=lambda k: (order.get(k, len(order)), k)):
            if now.get(key) != saved.get(key):
                name, was, asked = IDENTITY_NAMES.get(key, key), saved.get(key), now.get(key)
                if key in _FINGERPRINTS:
                    detail = "it differs from the saved search's"
                else:
                    detail = f"the saved search used {_show(was)}, this run asks for {_show(asked)}"
                raise MoepruneError(
                    f"--resume: {name} changed ({detail}); resume with the same settings, or start over "
                    "with --overwrite"
                )

    def close(self) -> None:
        """Release the executor's workers (when a pipeline started them) and the output (lock)."""
        try:
            if "executor" in self.__dict__:
                self.__dict__.pop("executor").close()
        finally:
            self._stack.close()

    def abandon(self) -> str:
        """After a failure or an interrupt: keep a search's checkpoint for `--resume`, remove the rest
        of the work directory; returns what the user should hear."""
        if any((self.work / n).exists() for n in STATE_FILES):
            return f"the search so far is kept in {self.work}: rerun with --resume to continue it"
        shutil.rmtree(self.work, ignore_errors=True)
        return "nothing was written"

    def clean_up(self) -> None:
        """Remove the work directory once the output holds everything."""
        shutil.rmtree(self.work, ignore_errors=True)


IDENTITY_FILE = "identity.json"
# identity keys -> how the user sets them
IDENTITY_NAMES = {
    "allocation": "the allocation", "model": "the model (its config or weight files)", "dtype": "--dtype",
    "seed": "--seed", "sparsity": "--sparsity", "criterion": "--criterion",
    "statistics": "the criterion's statistics (--data/--num-samples/--seq-len or --stats)",
    "fitness": "--fitness", "cache": "--cache", "top_k": "--top-k", "nucleus_p": "search.nucleus_p",
    "search_data": "the search data (--search-data/--search-samples/--search-seq-len)",
    "search_rows": "the order of the search rows (this version of moeprune)",
    "min_remove": "search.min_remove", "max_remove": "search.max_remove",
    "racing": "racing (--racing/--racing-z/search.racing_slices)",
    "population": "--population", "generations": "--generations", "eep.population": "--population",
    "eep.iterations": "--iterations", "eep.merge_population": "--merge-population",
    "eep.merge_iterations": "--merge-iterations", "eep.active_experts": "--active-experts",
}  # fmt: skip
_FINGERPRINTS = ("model", "statistics", "search_data")


def _generation(search) -> list:
    """How on-policy search data is generated (what its cache file and fingerprint depend on)."""
    return [search.gen_tokens, search.sample] + ([search.gen_stop] if search.gen_stop is not None else [])


def _show(value) -> str:
    return "none" if value is None else str(value)


def _data_specs(spec) -> dict:
    """The run's data sections by the flag that sets their length."""
    return {
        "--seq-len": spec.calibration,
        "--search-seq-len": spec.search.data if spec.search is not None else None,
        "evaluate.heldout.seq_len": spec.evaluate.heldout if spec.evaluate is not None else None,
    }


def _fit_positions(spec, positions: int | None):
    """`spec` with every data length cut to the model's positions, and the notes that say so."""
    notes: list[str] = []
    if positions is None:
        return spec, notes

    def fit(d, flag):
        if d is None or d.seq_len <= positions:
            return d
        notes.append(
            f"{flag} {d.seq_len} is longer than the model's {positions} positions "
            f"(max_position_embeddings); using {positions}"
        )
        return d.model_copy(update={"seq_len": positions})

    data = _data_specs(spec)
    update = {}
    if data["--seq-len"] is not None:
        update["calibration"] = fit(data["--seq-len"], "--seq-len")
    if spec.search is not None:
        update["search"] = spec.search.model_copy(update={"data": fit(spec.search.data, "--search-seq-len")})
    if spec.evaluate is not None and spec.evaluate.heldout is not None:
        update["evaluate"] = spec.evaluate.model_copy(
            update={"heldout": fit(spec.evaluate.heldout, "evaluate.heldout.seq_len")}
        )
    return spec.model_copy(update=update), notes
