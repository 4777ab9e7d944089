"""`ExpertPlan`: which routed experts to remove in each MoE layer, and its validation against a model."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from ..arch import MoELayer, moe_layers
from ..errors import PlanError


class _PlanFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    removed: dict[int, list[StrictInt]]  # expert ids: integers, not true/false or "3"


@dataclass(frozen=True)
class ExpertPlan:
    """Removed expert ids (original numbering) per decoder layer index. Layers not named lose nothing."""

    removed: Mapping[int, tuple[int, ...]]

    @classmethod
    def from_removed(cls, removed: Mapping[int, Sequence[int]]) -> ExpertPlan:
        return cls({int(k): tuple(int(e) for e in v) for k, v in removed.items()})

    @classmethod
    def from_kept(cls, kept: Mapping[int, Sequence[int]], num_experts: Mapping[int, int]) -> ExpertPlan:
        return cls.from_removed({k: sorted(set(range(num_experts[k])) - set(v)) for k, v in kept.items()})

    @classmethod
    def from_json(cls, path: str | Path) -> ExpertPlan:
        """Read ``{"removed": {"<decoder layer index>": [expert ids]}}``."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise PlanError(f"plan file {path} does not exist") from None
        except IsADirectoryError:
            raise PlanError(f"plan file {path} is a directory; give the plan's JSON file") from None
        except OSError as e:
            raise PlanError(f"plan file {path} cannot be read ({e.strerror or e})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(
                f'plan file {path} is not valid JSON ({e}); expected {{"removed": {{"0": [3, 5]}}}}'
            ) from None
        try:
            parsed = _PlanFile.model_validate(raw)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise PlanError(
                f"plan file {path} is malformed at '{where}': {first['msg']}; "
                'expected {"removed": {"<layer index>": [expert ids]}}'
            ) from None
        return cls.from_removed(parsed.removed)

    def to_dict(self) -> dict:
        return {"removed": {str(k): list(v) for k, v in sorted(self.removed.items())}}

    def total_removed(self) -> int:
        return sum(len(v) for v in self.removed.values())


def validate_plan(model, plan: ExpertPlan, layers: list[MoELayer] | None = None) -> dict[int, list[int]]:
    """Check `plan` against `model`; return the kept expert ids (sorted) of every MoE layer.

    Rules: layers must be MoE layers; ids in range and not repeated; at least top_k experts stay in
    each layer; group-limited routers lose the same number of experts in every group and keep enough
    experts in the selected groups to fill top_k.
    """
    layers = layers if layers is not None else moe_layers(model)
    by_index = {layer.index: layer for layer in layers}
    for index in plan.removed:
        if index not in by_index:
            raise PlanError(f"layer {index} is not an MoE layer; MoE layers are {_ranges(sorted(by_index))}")
    kept: dict[int, list[int]] = {}
    for index, layer in by_index.items():
        removed = list(plan.removed.get(index, ()))
        n = layer.num_experts
        bad = [e for e in removed if not 0 <= e < n]
        if bad:
            raise PlanError(
                f"layer {index}: expert id {bad[0]} is out of range (the layer has experts 0..{n - 1})"
            )
        if len(set(removed)) != len(removed):
            dup = next(e for e in removed if removed.count(e) > 1)
            raise PlanError(f"layer {index}: expert {dup} is listed twice")
        left = n - len(removed)
        if left == 0:
            raise PlanError(
                f"layer {index}: the plan removes every expert; keep at least top_k={layer.top_k}"
            )
        if left < layer.top_k:
            raise PlanError(
                f"layer {index}: {left} experts would remain but the router picks top_k={layer.top_k}; "
                f"remove at most {n - layer.top_k} experts there"
            )
        groups = layer.num_groups
        if groups > 1 and removed:
            size = n // groups
            per_group = [sum(1 for e in removed if e // size == g) for g in range(groups)]
            if len(set(per_group)) != 1:
                raise PlanError(
                    f"layer {index}: the group-limited router ({groups} groups of {size}) needs the same number "
                    f"of experts removed from every group, the plan removes {per_group}"
                )
            if (size - per_group[0]) * layer.topk_groups < layer.top_k:
                raise PlanError(
                    f"layer {index}: {layer.topk_groups} selected groups x {size - per_group[0]} experts "
                    f"cannot fill top_k={layer.top_k}; remove fewer experts per group"
                )
        kept[index] = sorted(set(range(n)) - set(removed))
    return kept


def _ranges(indices: list[int]) -> str:
    if indices and indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 2:
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(map(str, indices))
