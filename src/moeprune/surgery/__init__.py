"""Structural surgery: remove experts in place, save uniform/non-uniform checkpoints, load them."""

from ..plan import ExpertPlan, validate_plan  # re-exported for compatibility
from .checkpoint import MANIFEST, load, save_pruned
from .masking import mask_experts, mask_stacked
from .prune import remove_experts_

__all__ = [
    "MANIFEST",
    "ExpertPlan",
    "load",
    "mask_experts",
    "mask_stacked",
    "remove_experts_",
    "save_pruned",
    "validate_plan",
]
