"""A pruning run as data: a YAML recipe <-> `Recipe` (pydantic; unknown keys are errors), run by `api.run`.

    model: Qwen/Qwen3-30B-A3B        # hub id or checkpoint directory
    out: pruned/                     # checkpoint, recipe.yaml, run files, evaluation.json
    sparsity: 0.5                    # share of all routed experts removed
    criterion: frequency             # within-layer ranking: observe -> criterion
    calibration: {data: calib.jsonl, samples: 128, seq_len: 512}
    allocation: evoesap              # uniform (default) | evoesap | eep
    search: {data: search.jsonl, samples: 16, seq_len: 256, population: 32, generations: 50}
    eep: {iterations: 100, merge_iterations: 0, active_experts: null}
    evaluate: {suite: testbed, lm_eval: [moeprune_mc], limit: 100}
    seed: 0
    device: cpu

``uniform`` removes the same share in every MoE layer by the criterion; ``evoesap`` searches the
per-layer counts (the criterion fixes the order within a layer); ``eep`` searches which experts
each layer keeps (seeded with the criterion's plan when one is given) and can merge and lower the
active experts. ``evaluate`` runs on the saved checkpoint, reloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import MoepruneError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    data: str  # local file or hub dataset
    text_field: str = "text"
    samples: int = Field(128, ge=1)
    seq_len: int = Field(512, ge=2)


class SearchSpec(_Strict):
    """EvoESAP search (and the data EEP scores its candidates on)."""

    data: DataSpec
    fitness: str = "esap"
    cache: Literal["sparse", "dense"] = "sparse"
    top_k: int = Field(64, ge=1)
    population: int = Field(32, ge=1)
    generations: int = Field(50, ge=1)
    candidate_batch: int = Field(1, ge=1)


class EEPSpec(_Strict):
    population: int = Field(16, ge=2)
    iterations: int = Field(100, ge=1)
    merge_population: int = Field(16, ge=2)
    merge_iterations: int = Field(0, ge=0)
    active_experts: int | None = Field(None, ge=1)


class EvaluateSpec(_Strict):
    suite: str | None = "testbed"  # a suite directory, "testbed" or null
    lm_eval: list[str] = []
    limit: int | None = Field(None, ge=1)
    max_items: int | None = Field(None, ge=1)


class Recipe(_Strict):
    model: str
    out: str
    sparsity: float = Field(ge=0.0, lt=1.0)
    criterion: str | None = None
    calibration: DataSpec | None = None
    allocation: Literal["uniform", "evoesap", "eep"] = "uniform"
    search: SearchSpec | None = None
    eep: EEPSpec | None = None
    evaluate: EvaluateSpec | None = None
    seed: int = 0
    device: str = "cpu"

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.allocation in ("uniform", "evoesap") and self.criterion is None:
            raise ValueError(f"allocation '{self.allocation}' needs a criterion (the within-layer ranking)")
        if self.criterion is not None and self.calibration is None:
            raise ValueError("a criterion needs calibration data (calibration: {data: FILE})")
        if self.calibration is not None and self.criterion is None:
            raise ValueError("calibration data is only used by a criterion: add one, or drop calibration")
        if self.allocation in ("evoesap", "eep") and self.search is None:
            raise ValueError(
                f"allocation '{self.allocation}' needs search data (search: {{data: {{data: FILE}}}})"
            )
        if self.eep is not None and self.allocation != "eep":
            raise ValueError("an eep section needs allocation: eep")
        if self.evaluate is not None and self.evaluate.suite is None and not self.evaluate.lm_eval:
            raise ValueError("evaluate needs a suite or lm_eval tasks")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        """Read and check a recipe; any problem is one `MoepruneError` line naming the key."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as e:
            raise MoepruneError(f"cannot read recipe {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise MoepruneError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(raw, dict):
            raise MoepruneError(f"{path} must hold a mapping of recipe keys (model, out, sparsity, ...)")
        try:
            recipe = cls.model_validate(raw)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(p) for p in err["loc"]) or "recipe"
            msg = err["msg"].removeprefix("Value error, ")
            raise MoepruneError(f"{path}: {where}: {msg}") from None
        if recipe.criterion is not None:
            from .criteria import get_criterion

            get_criterion(recipe.criterion)  # unknown names fail here, with "did you mean"
        return recipe

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(exclude_none=True), sort_keys=False)
