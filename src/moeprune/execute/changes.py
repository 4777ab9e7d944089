"""What a candidate does to one decoder layer when the model runs layer by layer.

A candidate is an `ExpertPlan` (or ``{layer: removed ids}``): the removed experts of each layer are
masked; or an EEP merge plan ``{layer: merge.merging.LayerMerge}``: in each merged layer the
anchors' slots of every fused expert tensor hold Σ_i M[j, i] W_i, computed from the loaded layer's
weights while the layer runs (the originals are back after it, before the layer is freed), and
every non-anchor is masked. Layer by layer this is what the in-memory `Scorer` computes with
`merged_weights` and `mask_experts` on the whole model, one layer at a time.

`LayerChange.key` names what a layer computes for a candidate: the masked ids, and for a merge a
SHA-256 of its anchors and M (float64 bytes). Candidates whose keys agree in layers 0..j-1 give
layer j the same input (the lockstep prefix tree shares it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import numpy as np
from torch import nn

from ..arch import MoELayer
from ..merge.merging import LayerMerge, merged_weights
from ..plan import ExpertPlan
from ..surgery import mask_experts

__all__ = ["NO_CHANGE", "Candidate", "LayerChange", "applied", "as_candidate", "layer_changes"]

Candidate = ExpertPlan | Mapping[int, LayerMerge]


@dataclass(frozen=True)
class LayerChange:
    removed: tuple[int, ...] = ()  # masked expert ids, sorted
    merge: LayerMerge | None = None
    key: tuple = ()  # () for a layer the candidate leaves as it is

    @classmethod
    def masking(cls, removed) -> LayerChange:
        removed = tuple(sorted(int(e) for e in removed))
        return cls(removed, None, removed)

    @classmethod
    def merging(cls, merge: LayerMerge) -> LayerChange:
        num_experts = merge.weights.shape[1]
        anchors = set(merge.anchors)
        removed = tuple(e for e in range(num_experts) if e not in anchors)
        h = hashlib.sha256(repr(tuple(merge.anchors)).encode())
        h.update(np.ascontiguousarray(merge.weights.detach().double().cpu().numpy(), dtype="<f8").tobytes())
        return cls(removed, merge, (removed, h.hexdigest()))


NO_CHANGE = LayerChange()


def is_merge_plan(candidate) -> bool:
    return (
        isinstance(candidate, Mapping)
        and bool(candidate)
        and all(isinstance(m, LayerMerge) for m in candidate.values())
    )


def as_candidate(candidate) -> Candidate:
    """An `ExpertPlan`, or the merge plan as it is (``{layer: removed ids}`` becomes a plan)."""
    if isinstance(candidate, ExpertPlan) or is_merge_plan(candidate):
        return candidate
    return ExpertPlan.from_removed(candidate)


def layer_changes(candidate) -> dict[int, LayerChange]:
    """{decoder layer index: its `LayerChange`} for every layer the candidate changes."""
    candidate = as_candidate(candidate)
    if isinstance(candidate, ExpertPlan):
        return {int(j): LayerChange.masking(r) for j, r in candidate.removed.items() if r}
    return {int(j): LayerChange.merging(m) for j, m in candidate.items()}


@contextmanager
def applied(model: nn.Module, layer: int, change: LayerChange, moe: MoELayer | None = None) -> Iterator[None]:
    """Within the block, decoder layer `layer` of `model` (its weights loaded) computes what it
    computes in the candidate: merged anchors, the others masked. `moe`: that layer's `MoELayer`
    (the mask is then checked against it alone, not against every layer of the model)."""
    with ExitStack() as stack:
        if change.merge is not None:
            stack.enter_context(merged_weights(model, {layer: change.merge}))
        if change.removed:
            only = None if moe is None else [moe]
            stack.enter_context(mask_experts(model, ExpertPlan.from_removed({layer: change.removed}), only))
        yield
