"""Plots of a search run (matplotlib, Agg): kept experts per layer, fitness per generation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .space import AllocationSpace


def plot_allocation(space: AllocationSpace, best: Sequence[int], uniform: Sequence[int], path: Path) -> Path:
    """Bars: experts kept per MoE layer, best plan vs uniform."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = [r.index for r in space.layers]
    kept_best = [r.num_experts - n for r, n in zip(space.layers, best, strict=True)]
    kept_uni = [r.num_experts - n for r, n in zip(space.layers, uniform, strict=True)]
    x = range(len(idx))
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(idx) + 2), 3.2))
    ax.bar([i - 0.2 for i in x], kept_uni, width=0.4, label="uniform", color="#999999")
    ax.bar([i + 0.2 for i in x], kept_best, width=0.4, label="EvoESAP", color="#1f77b4")
    ax.set_xticks(list(x), [str(i) for i in idx])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts kept")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path, label: str = "fitness") -> Path:
    """Lines: best-ever and population median fitness per generation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gens = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(gens, [h["best"] for h in history], marker="o", label="best")
    ax.plot(gens, [h["median"] for h in history], marker=".", label="median")
    ax.set_xlabel("generation")
    ax.set_ylabel(label)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
