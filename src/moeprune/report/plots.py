"""Plots of a run (matplotlib, Agg) as PNG bytes: experts kept per layer, fitness per generation."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def _figure(width: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, 3.2))


def allocation_png(kept: Mapping[str, Mapping[int, int]]) -> bytes:
    """Bars: experts kept per MoE layer, one bar per plan ({plan name: {layer: experts kept}})."""
    names = list(kept)
    layers = sorted({i for k in kept.values() for i in k})
    fig, ax = _figure(max(5, 0.5 * len(layers) + 2))
    width = 0.8 / len(names)
    colors = ["#999999", "#1f77b4", "#ff7f0e", "#2ca02c"]
    for j, name in enumerate(names):
        xs = [x - 0.4 + width * (j + 0.5) for x in range(len(layers))]
        ax.bar(xs, [kept[name].get(i, 0) for i in layers], width=width, label=name, color=colors[j % 4])
    ax.set_xticks(list(range(len(layers))), [str(i) for i in layers])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("experts kept")
    ax.legend()
    return _png(fig)


def history_png(history: Sequence[Mapping], label: str = "fitness") -> bytes:
    """Lines: best-ever and population median fitness per generation."""
    fig, ax = _figure(5)
    gens = [h["generation"] for h in history]
    ax.plot(gens, [h["best"] for h in history], marker="o", label="best")
    ax.plot(gens, [h["median"] for h in history], marker=".", label="median")
    ax.set_xlabel("generation")
    ax.set_ylabel(label)
    ax.legend()
    return _png(fig)
