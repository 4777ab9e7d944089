"""moeprune: make sparse Mixture-of-Experts language models smaller after training."""

import importlib

__version__ = "0.1.0"

__all__ = ["ExpertPlan", "api", "load", "mask_experts", "prune"]
_LAZY = {"api": ("api", None), "prune": ("api", "prune"), "ExpertPlan": ("plan", "ExpertPlan")} | {
    n: ("surgery", n) for n in ("load", "mask_experts")
}


def __getattr__(name: str):
    # imported on first use, so that `moeprune --help` and usage errors answer without loading torch
    if name not in _LAZY:
        raise AttributeError(f"module 'moeprune' has no attribute '{name}'")
    module, attr = _LAZY[name]
    value = importlib.import_module(f"{__name__}.{module}")
    return value if attr is None else getattr(value, attr)
