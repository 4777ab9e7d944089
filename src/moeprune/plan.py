"""Expert plans and the one rule set for how many experts a MoE layer may lose.

Everything that decides a per-layer removal count goes through this module: criterion pruning
(`criteria`), the EvoESAP allocation space (`allocate`), EEP's selections (`merge`), plan
validation before surgery and active-expert reduction. The rules, for a layer with E routed
experts, top-k routing and (group-limited routers) G groups of which a token may use G_k:

    step          n must be a multiple of G (every group loses n / G experts); G = 1 otherwise
    max_remove    E - max(top_k, 1)                         without groups
                  G * max(0, E/G - ceil(top_k / G_k))       with groups: the G_k selected groups
                                                            must still hold top_k experts
    uniform       u = G * round_half_up(s * E / G), capped at max_remove      (sparsity s)

`uniform_counts` is the one meaning of "uniform" in moeprune: the plan of ``prune --criterion``,
the EvoESAP budget B = sum_l u_l and its uniform baseline, and EEP's removal per layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict, StrictInt, ValidationError

from .errors import PlanError

__all__ = [
    "ExpertPlan",
    "LayerBounds",
    "LayerShape",
    "layer_bounds",
    "max_active_experts",
    "max_removable",
    "uniform_counts",
    "validate_plan",
]


class LayerShape(Protocol):
    """What the rules need to know of a MoE layer: `arch.MoELayer` and `observe.LayerStats` both fit."""

    index: int
    num_experts: int
    top_k: int
    num_groups: int
    topk_groups: int


@dataclass(frozen=True)
class LayerBounds:
    """How many experts one MoE layer may lose: a multiple of `step` in min_remove..max_remove."""

    index: int  # decoder layer index
    num_experts: int
    step: int  # the router's groups G (1 when not group-limited); n must be a multiple of it
    min_remove: int
    max_remove: int

    def allows(self, n: int) -> bool:
        return self.min_remove <= n <= self.max_remove and n % self.step == 0

    def group_of(self, expert: int) -> int:
        """The router group of `expert` (0 when the router is not group-limited)."""
        return expert // (self.num_experts // self.step)

    def check(self, n: int) -> int:
        """`n` as an int, or a PlanError that says which counts the layer allows."""
        if not self.min_remove <= n <= self.max_remove:
            raise PlanError(
                f"layer {self.index}: cannot remove {n} of {self.num_experts} experts; "
                f"remove {self.min_remove}..{self.max_remove}"
            )
        if n % self.step:
            raise PlanError(
                f"layer {self.index}: the group-limited router has {self.step} groups, so the number "
                f"removed must be a multiple of {self.step}, got {n}"
            )
        return int(n)


def max_removable(layer: LayerShape) -> int:
    """The most experts `layer` can lose (module docstring: max_remove)."""
    e, g = layer.num_experts, max(layer.num_groups, 1)
    if g <= 1:
        return max(0, e - max(layer.top_k, 1))
    per_group = e // g - math.ceil(max(layer.top_k, 1) / max(layer.topk_groups, 1))
    return g * max(0, per_group)


def layer_bounds(
    layer: LayerShape, min_remove: int | None = None, max_remove: int | None = None
) -> LayerBounds:
    """The bounds of `layer`, optionally narrowed by a user's minimum / maximum removal (rounded
    inwards to the layer's step). PlanError when nothing is left between them."""
    g = max(layer.num_groups, 1)
    hi = max_removable(layer)
    lo = 0 if min_remove is None else int(min_remove)
    if max_remove is not None:
        hi = min(hi, int(max_remove))
    lo = -(-lo // g) * g  # round up to a multiple of the step
    hi = hi // g * g
    if lo > hi:
        raise PlanError(
            f"layer {layer.index}: no valid removal count between min {lo} and max {hi} "
            f"({layer.num_experts} experts, top_k={layer.top_k}, step {g})"
        )
    return LayerBounds(int(layer.index), int(layer.num_experts), g, lo, hi)


def max_active_experts(layer: LayerShape) -> int:
    """The most experts a token of `layer` can be routed to: every expert of the selected groups."""
    return layer.num_experts // max(layer.num_groups, 1) * max(layer.topk_groups, 1)


def _layers(layers) -> list[LayerShape]:
    """MoE layers from a sequence, a mapping (its values) or statistics with a `.layers` mapping."""
    layers = getattr(layers, "layers", layers)
    if isinstance(layers, Mapping):
        layers = layers.values()
    return list(layers)


def uniform_counts(
    layers: Iterable[LayerShape] | Mapping[int, LayerShape], sparsity: float
) -> dict[int, int]:
    """u_l per decoder layer index: round(sparsity * E_l) rounded (half up) to a multiple of the
    layer's groups and capped at its `max_removable`. `layers`: `arch.moe_layers(model)`, observe's
    `LayerStats` or an `ExpertStats` (its ``.layers``)."""
    if not 0.0 <= sparsity < 1.0:
        raise PlanError(f"sparsity must be in [0, 1), got {sparsity}")
    counts = {}
    for layer in _layers(layers):
        g = max(layer.num_groups, 1)
        n = g * math.floor(sparsity * layer.num_experts / g + 0.5)
        counts[int(layer.index)] = min(n, max_removable(layer))
    return counts


class _PlanFile(BaseModel):
    model_config = ConfigDict(extra="ignore")  # a search's plan.json adds counts and fitness
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


def validate_plan(model, plan: ExpertPlan, layers: Sequence | None = None) -> dict[int, list[int]]:
    """Check `plan` against `model`; return the kept expert ids (sorted) of every MoE layer.

    Rules: layers must be MoE layers; ids in range and not repeated; the count removed within the
    layer's `LayerBounds` (top_k experts stay; group-limited routers lose the same number of
    experts in every group and keep enough in the selected groups to fill top_k).
    """
    if layers is None:
        from .arch import moe_layers  # arch sits above plan.py; only this convenience needs it

        layers = moe_layers(model)
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
        bounds = layer_bounds(layer)
        left = n - len(removed)
        if left == 0:
            raise PlanError(
                f"layer {index}: the plan removes every expert; keep at least top_k={layer.top_k}"
            )
        if left < layer.top_k:
            raise PlanError(
                f"layer {index}: {left} experts would remain but the router picks top_k={layer.top_k}; "
                f"remove at most {bounds.max_remove} experts there"
            )
        if bounds.step > 1 and removed:
            groups, size = bounds.step, n // bounds.step
            per_group = [sum(1 for e in removed if bounds.group_of(e) == g) for g in range(groups)]
            if len(set(per_group)) != 1:
                raise PlanError(
                    f"layer {index}: the group-limited router ({groups} groups of {size}) needs the same number "
                    f"of experts removed from every group, the plan removes {per_group}"
                )
            if not bounds.allows(len(removed)):
                raise PlanError(
                    f"layer {index}: {layer.topk_groups} selected groups x {size - per_group[0]} experts "
                    f"cannot fill top_k={layer.top_k}; remove at most {bounds.max_remove // groups} per group"
                )
        kept[index] = sorted(set(range(n)) - set(removed))
    return kept


def _ranges(indices: list[int]) -> str:
    if indices and indices == list(range(indices[0], indices[-1] + 1)) and len(indices) > 2:
        return f"{indices[0]}-{indices[-1]}"
    return ", ".join(map(str, indices))
