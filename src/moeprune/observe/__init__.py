"""One calibration pass with hooks -> `ExpertStats` per MoE layer (saved, reloaded, reused).

    from moeprune.observe import observe, ExpertStats
    stats = observe(model, data, batch_size=8, dense_tokens=0)   # data: moeprune.data.TokenSet
    stats.save("stats/"); stats = ExpertStats.load("stats/")

Formulas of every recorded quantity: `moeprune.observe.stats`.
"""

from .observer import Observer, dense_subsample, observe, observing
from .stats import ExpertStats, LayerStats

__all__ = ["ExpertStats", "LayerStats", "Observer", "dense_subsample", "observe", "observing"]
