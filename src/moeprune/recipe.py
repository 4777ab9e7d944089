"""A pruning run as data: the pydantic specs every entry point builds (CLI flags, a YAML recipe, the
demo, Python), holding every check once. `api.run` carries a `Recipe` out.

    model: Qwen/Qwen3-30B-A3B        # hub id or checkpoint directory
    out: pruned/                     # checkpoint, recipe.yaml, run files, evaluation.json
    allocation: evoesap              # uniform (default) | evoesap | eep | plan
    sparsity: 0.5                    # share of the routed experts removed (uniform: in every layer)
    criterion: frequency             # within-layer ranking: observe -> criterion
    calibration: {data: calib.jsonl, samples: 128, seq_len: 512}    # or stats: STATS_DIR
    search: {data: {data: search.jsonl, samples: 16, seq_len: 256}, population: 32, generations: 50,
             racing: true, racing_z: 1.0, racing_slices: 4}
    evaluate: {suite: testbed, lm_eval: [moeprune_mc], limit: 100}
    seed: 0
    device: cpu
    threads: 8                       # torch's threads in this process (default: torch's own)

Allocations (registry `PIPELINES`, lazily pointing into `moeprune.pipelines`): ``uniform`` removes the same share in every MoE layer
by the criterion; ``evoesap`` searches the per-layer counts (the criterion fixes the order within a
layer); ``eep`` searches which experts each layer keeps (seeded with the criterion's plan when one is
given) and can merge and lower the active experts (``eep:`` section); ``plan`` removes the experts
a plan file names. Names (allocation, criterion, fitness, teacher cache) are checked against their
registries with "did you mean"; every error is one `MoepruneError` line naming the key.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import MoepruneError, did_you_mean
from .racing import DEFAULT_SLICES, DEFAULT_Z, EEP_Z
from .registry import Registry

# The allocations a run can use: name -> pipeline ``choose(ctx) -> Choice`` (moeprune.pipelines),
# imported when a run asks for it, so that specs check names without importing the pipelines.
PIPELINES: Registry = Registry("allocation")
for _name, _target in {
    "uniform": "moeprune.pipelines.uniform:uniform",
    "plan": "moeprune.pipelines.uniform:given_plan",
    "evoesap": "moeprune.pipelines.evoesap:evoesap",
    "eep": "moeprune.pipelines.eep:eep",
}.items():
    PIPELINES.register_lazy(_name, _target)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @classmethod
    def build(cls, data: dict[str, Any], where: str = "", names: Callable[[str], str] | None = None):
        """Validate `data`; any problem is one `MoepruneError` line naming the key (prefixed by `where`,
        renamed by `names`, e.g. to the CLI flag that set it)."""
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise MoepruneError(one_line(e, where, names)) from None


def _registered(kind: str, name: str) -> str:
    """`name` if the `kind` registry holds it; a ValueError with "did you mean" otherwise."""
    if kind == "criterion":
        from .criteria import CRITERIA as registry
    elif kind == "fitness":
        from .fitness import FITNESS as registry
    elif kind == "allocation":
        registry = PIPELINES
    else:  # teacher cache kinds
        from .fitness.teacher import CACHE_KINDS

        if name not in CACHE_KINDS:
            raise ValueError(f"unknown teacher cache '{name}'{did_you_mean(name, CACHE_KINDS)}")
        return name
    if name not in registry:
        raise ValueError(f"unknown {kind} '{name}'{did_you_mean(name, registry.names())}")
    return name


class DataSpec(_Strict):
    """Token windows drawn from a local file or hub dataset (see `moeprune.data`)."""

    data: str
    text_field: str = "text"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)
    per_domain: bool = False  # `samples` windows from every domain (needs a domain field)
    seed: int | None = Field(None, ge=0)  # of the draw; default: the run's seed


class SearchDataSpec(DataSpec):
    """Search data: fewer, shorter windows than calibration by default (every candidate runs on them)."""

    samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=2)


class SearchSpec(_Strict):
    """The search data and the evolutionary search (EvoESAP; EEP scores on the same data)."""

    data: SearchDataSpec
    fitness: str = "esap"
    cache: str = "hidden"  # teacher cache: hidden (exact, T x H) | sparse (top-K + tail bound) | dense
    # | nucleus (per token the smallest top set of mass nucleus_p, at most top_k, + tail bound)
    top_k: int = Field(64, ge=1)
    nucleus_p: float = 0.95  # the nucleus cache's mass, 0 < p <= 1
    population: int = Field(32, ge=1)
    generations: int = Field(50, ge=1)
    candidate_batch: int = Field(1, ge=1)
    checkpoint_every: int = Field(5, ge=1)
    gen_tokens: int = Field(64, ge=1)  # on-policy data (prompt rows): tokens the model writes per prompt
    gen_stop: str | None = None  # on-policy: end each continuation after this text (e.g. "\n"), else at eos
    sample: bool = False  # on-policy: sample (seeded) instead of greedy
    min_remove: dict[int, int] | None = None  # per decoder layer index
    max_remove: dict[int, int] | None = None
    executor: Literal["local", "ray"] = "local"  # where candidates are scored (`moeprune.execute`)
    ray_address: str | None = None  # HOST:PORT of a Ray cluster (default: start a local one)
    workers: int | None = Field(None, ge=1)  # Ray actors (default: one per GPU, or per CPU)
    # racing (`moeprune.racing`): candidates scored slice by slice, dropped when clearly below the worst elite
    racing: bool = True  # off: every candidate on every token (the exact search)
    # z of the paired bound; inf never drops (= the exact search); default: the allocation's
    # (EvoESAP racing.DEFAULT_Z, EEP racing.EEP_Z), filled in by `Recipe`
    racing_z: float | None = None
    racing_slices: int = DEFAULT_SLICES  # slices of the search batches (off with fewer than 2 batches)

    @field_validator("racing_z")
    @classmethod
    def _racing_z(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError(f"must be > 0 (inf: never drop a candidate), got {v}")
        return v

    @field_validator("nucleus_p")
    @classmethod
    def _nucleus_p(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"must be in (0, 1] (the teacher mass the nucleus cache keeps), got {v}")
        return v

    @field_validator("racing_slices")
    @classmethod
    def _racing_slices(cls, v: int) -> int:
        if v < 1:
            raise ValueError(f"must be at least 1 (1: no racing), got {v}")
        return v

    @field_validator("fitness")
    @classmethod
    def _fitness(cls, v: str) -> str:
        return _registered("fitness", v)

    @field_validator("cache")
    @classmethod
    def _cache(cls, v: str) -> str:
        return _registered("cache", v)

    @field_validator("ray_address", "workers")
    @classmethod
    def _ray_only(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("executor") != "ray":
            raise ValueError("is a setting of the ray executor (executor: ray)")
        return v


EEP_ELITES = 4  # merge.EEPConfig.elites
MERGE_ELITES = 2  # merge.merge_search.MergeConfig.elites


class EEPSpec(_Strict):
    """EEP: selection search (elites 4), optional merge search (elites 2), fewer active experts."""

    population: int = 16  # >= EEP_ELITES
    iterations: int = Field(100, ge=1)
    merge_population: int = 8  # > MERGE_ELITES
    merge_iterations: int = Field(0, ge=0)
    active_experts: int | None = Field(None, ge=1)

    @field_validator("population")
    @classmethod
    def _population(cls, v: int) -> int:
        if v < EEP_ELITES:
            raise ValueError(
                f"must be at least {EEP_ELITES} (the selection search keeps its {EEP_ELITES} best "
                f"selections, the elites), got {v}"
            )
        return v

    @field_validator("merge_population")
    @classmethod
    def _merge_population(cls, v: int) -> int:
        if v <= MERGE_ELITES:
            raise ValueError(
                f"must be at least {MERGE_ELITES + 1} (the merge search keeps its {MERGE_ELITES} best "
                f"candidates, the elites, and needs room for new ones), got {v}"
            )
        return v


class EvaluateSpec(_Strict):
    """Evaluation of the pruned model (in memory, equal to the saved checkpoint), with `baselines`
    the unpruned model and the uniform plan beside it (by exact masking), `heldout` ESAP too."""

    suite: str | None = "testbed"  # a suite directory, "testbed" or null
    lm_eval: list[str] = []
    limit: int | None = Field(None, ge=1)
    max_items: int | None = Field(None, ge=1)
    max_tokens_per_domain: int | None = Field(20_000, ge=1)  # perplexity tokens per domain
    baselines: bool = False
    heldout: DataSpec | None = None  # held-out ESAP of every column (dense teacher)


class Recipe(_Strict):
    model: str
    out: str
    allocation: str = "uniform"
    sparsity: float | None = None  # in [0, 1)
    criterion: str | None = None
    calibration: DataSpec | None = None
    stats: str | None = None  # saved expert statistics (`moeprune observe`) instead of calibration
    plan: str | None = None  # plan JSON, for allocation: plan
    uniform_from: str | None = None  # a search's run directory: its nearest uniform plan (allocation: plan)
    search: SearchSpec | None = None
    eep: EEPSpec | None = None
    evaluate: EvaluateSpec | None = None
    seed: int = Field(0, ge=0)
    device: str = "cpu"
    dtype: str = "auto"  # float32 | bfloat16 | float16 | auto (the checkpoint's)
    threads: int | None = Field(None, ge=1)  # torch's intra-op threads in this process; None: torch's own
    # auto: surgery streamed when the plan is known without the model, and everything run layer by layer
    # when the model does not fit the device's memory; stream | memory: surgery so; layers: observe,
    # teacher, search and evaluation one decoder layer at a time from the checkpoint, surgery streamed
    mode: Literal["auto", "stream", "memory", "layers"] = "auto"
    max_shard_size: str | None = None  # e.g. 5GB; default: the input's largest shard (stream), 5GB (memory)

    @model_validator(mode="before")
    @classmethod
    def _device_layers(cls, data: Any) -> Any:
        """``device: layers`` / ``cpu:layers`` / ``cuda:1:layers`` is ``mode: layers`` on that device."""
        if isinstance(data, dict) and isinstance(data.get("device"), str):
            device, layers = split_device(data["device"])
            if layers:
                if data.get("mode", "auto") not in ("auto", "layers"):
                    raise ValueError(
                        f"device {data['device']} runs layer by layer; it cannot go with mode {data['mode']}"
                    )
                data = {**data, "device": device, "mode": "layers"}
        return data

    @field_validator("allocation")
    @classmethod
    def _allocation(cls, v: str) -> str:
        return _registered("allocation", v)

    @field_validator("criterion")
    @classmethod
    def _criterion(cls, v: str | None) -> str | None:
        return v if v is None else _registered("criterion", v)

    @field_validator("sparsity")
    @classmethod
    def _sparsity(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1), got {v}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got '{v}'")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        a = self.allocation
        ranking = self.calibration is not None or self.stats is not None
        if a == "plan":
            if (self.plan is None) == (self.uniform_from is None):
                raise ValueError(
                    "allocation 'plan' needs a plan file (plan: PLAN.json) or a search run (uniform_from: DIR)"
                )
            if self.criterion is not None or ranking:
                raise ValueError(
                    "allocation 'plan' takes its experts from the plan: drop criterion/calibration"
                )
        elif self.plan is not None or self.uniform_from is not None:
            raise ValueError("a plan file or uniform_from needs allocation: plan")
        elif self.sparsity is None:
            raise ValueError(f"allocation '{a}' needs a sparsity (share of routed experts removed)")
        if a in ("uniform", "evoesap") and self.criterion is None:
            raise ValueError(f"allocation '{a}' needs a criterion (the within-layer ranking)")
        if self.criterion is not None and not ranking:
            raise ValueError("a criterion needs calibration data (calibration: {data: FILE}) or stats: DIR")
        if self.calibration is not None and self.stats is not None:
            raise ValueError("give calibration data or saved stats, not both")
        if ranking and self.criterion is None:
            raise ValueError("calibration data is only used by a criterion: add one, or drop calibration")
        if a in ("evoesap", "eep") and self.search is None:
            raise ValueError(f"allocation '{a}' needs search data (search: {{data: {{data: FILE}}}})")
        if self.eep is not None and a != "eep":
            raise ValueError("an eep section needs allocation: eep")
        if self.mode == "stream" and (
            a not in ("plan", "uniform") or self.calibration is not None or self.evaluate
        ):
            raise ValueError(
                "mode stream needs a plan known without running the model: a plan file, or a criterion with "
                "saved stats, and no evaluation"
            )
        if self.mode == "layers":
            self._layers_can_run()
        ev = self.evaluate
        if ev is not None and ev.suite is None and not ev.lm_eval and ev.heldout is None:
            raise ValueError("evaluate needs a suite, lm_eval tasks or heldout data")
        if self.search is not None and self.search.racing_z is None:
            self.search.racing_z = EEP_Z if a == "eep" else DEFAULT_Z
        return self

    def _layers_can_run(self) -> None:
        """What mode layers cannot do: it runs on one device, and lm-eval needs the model in memory
        (on-policy search data is refused by the run, which reads the rows)."""
        if self.device.startswith("auto"):
            raise ValueError("mode layers runs on one device (cpu, cuda, ...), not an accelerate device map")
        if self.evaluate is not None and self.evaluate.lm_eval:
            raise ValueError("mode layers: lm-eval tasks need the model in memory; evaluate the suite only")

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and check a recipe file."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError) as e:
            raise MoepruneError(f"cannot read recipe {path}: {getattr(e, 'strerror', None) or e}") from None
        except yaml.YAMLError as e:
            raise MoepruneError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise MoepruneError(f"{path} must hold a mapping of recipe keys (model, out, sparsity, ...)")
        return cls.build(raw, f"{path}: ")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)


def one_line(error: ValidationError, where: str = "", names: Callable[[str], str] | None = None) -> str:
    """The first validation error as ``WHERE KEY: message``; `names` renames keys (e.g. to CLI flags)."""
    err = error.errors()[0]
    key = ".".join(str(p) for p in err["loc"]) or "recipe"
    key = names(key) if names is not None else key
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}{key}: {msg}"


DTYPES = ("auto", "float32", "bfloat16", "float16")


def cpu_dtype() -> str:
    """The faster dtype for a bfloat16 checkpoint on this CPU: ``auto`` (its bfloat16) where the CPU
    computes bfloat16 natively (AVX512-BF16 or AMX-BF16; on the testbed the default search's scoring
    then takes 0.69-0.72x its float32 time: benchmarks/results/search_testbed_bf16.txt), else
    ``float32`` (emulated bfloat16 is slower than float32)."""
    import torch

    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return "auto" if caps.get("avx512_bf16") or caps.get("amx_bf16") else "float32"


def split_device(device: str) -> tuple[str, bool]:
    """``cuda:1:layers`` -> ("cuda:1", True): the device, and whether the model runs layer by layer
    from its checkpoint (``layers`` alone: on the CPU)."""
    if device == "layers":
        return "cpu", True
    if device.endswith(":layers"):
        return device.removesuffix(":layers"), True
    return device, False


def placement(device: str = "cpu", dtype: str = "auto", offload_folder: str | Path | None = None) -> dict:
    """``from_pretrained`` keywords for `device` and `dtype` (the one device/dtype resolver of every
    entry point); one `MoepruneError` line for a device this machine lacks.

    `device`: ``cpu``, ``cuda``, ``cuda:1``, ``mps``, or ``auto[:LIMITS]`` for an accelerate device map
    over every device, the CPU and disk (`offload_folder`), with optional per-device memory limits,
    e.g. ``auto:0=70GiB,1=70GiB,cpu=200GiB`` (what does not fit is offloaded to disk)."""
    import torch

    if dtype not in DTYPES:
        raise MoepruneError(f"dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    kwargs: dict = {"dtype": dtype}
    if device == "auto" or device.startswith("auto:"):
        limits = {}
        for item in filter(None, device.removeprefix("auto").removeprefix(":").split(",")):
            key, _, size = item.partition("=")
            if not size:
                raise MoepruneError(f"device {device}: '{item}' is not DEVICE=SIZE (e.g. cpu=20GiB, 0=70GiB)")
            limits[int(key) if key.isdigit() else key] = size
        kwargs |= {"device_map": "auto", "offload_folder": str(offload_folder) if offload_folder else None}
        return kwargs | ({"max_memory": limits} if limits else {})
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise MoepruneError(
            f"device '{device}' is not a device name (cpu, cuda, cuda:1, mps, auto)"
        ) from None
    if dev.type == "cpu":
        return kwargs
    backend = getattr(torch, dev.type, None)
    count = backend.device_count() if backend is not None and backend.is_available() else 0
    if count == 0 or (dev.index or 0) >= count:
        raise MoepruneError(
            f"device {device}: no such {dev.type} device on this machine ({count} found); use cpu"
        )
    return kwargs | {"device_map": str(dev)}
