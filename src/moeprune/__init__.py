"""moeprune: make sparse Mixture-of-Experts language models smaller after training."""

__version__ = "0.1.0"

from . import api  # noqa: E402
from .api import prune  # noqa: E402
from .plan import ExpertPlan  # noqa: E402
from .surgery import load, mask_experts  # noqa: E402

__all__ = ["ExpertPlan", "api", "load", "mask_experts", "prune"]
