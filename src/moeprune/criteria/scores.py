"""Score criteria (SPEC's table): one number per expert, the lowest removed first.

With ``S_i`` the tokens routed to expert i, ``g_i(x)`` its routing weight as the model applies it and
``a_i(x)`` its output before the gate weight (all accumulated in float64 by ``moeprune.observe``):

    random          seeded permutation: U(0,1) scores from numpy default_rng([seed, layer index])
    frequency       |S_i|                                   (SEER, hard count)
    soft_frequency  sum_{x in S_i} g_i(x)                   (SEER, soft count)
    ean             sum_{x in S_i} ||a_i(x)||_2             (expert activation norm)
    ean_mean        mean_{x in S_i} ||a_i(x)||_2            (0 if S_i is empty)
    weighted_ean    sum_{x in S_i} g_i(x) ||a_i(x)||_2
    reap            mean_{x in S_i} g_i(x) ||a_i(x)||_2     (0 if S_i is empty)
"""

from __future__ import annotations

import numpy as np
import torch

from ..observe import LayerStats
from .base import score_criterion


def _mean(total: torch.Tensor, count: torch.Tensor) -> np.ndarray:
    t, c = total.numpy(), count.numpy()
    return np.divide(t, c, out=np.zeros_like(t), where=c > 0)


@score_criterion("random", "seeded random order")
def random_score(ls: LayerStats, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, ls.index]).random(ls.num_experts)


@score_criterion("frequency", "|S_i|: tokens routed to the expert")
def frequency(ls: LayerStats, seed: int) -> np.ndarray:
    return ls.count.numpy()


@score_criterion("soft_frequency", "sum of routing weights over routed tokens")
def soft_frequency(ls: LayerStats, seed: int) -> np.ndarray:
    return ls.gate_sum.numpy()


@score_criterion("ean", "sum of expert output norms over routed tokens")
def ean(ls: LayerStats, seed: int) -> np.ndarray:
    return ls.norm_sum.numpy()


@score_criterion("ean_mean", "mean expert output norm over routed tokens")
def ean_mean(ls: LayerStats, seed: int) -> np.ndarray:
    return _mean(ls.norm_sum, ls.count)


@score_criterion("weighted_ean", "sum of gate x output norm over routed tokens")
def weighted_ean(ls: LayerStats, seed: int) -> np.ndarray:
    return ls.gnorm_sum.numpy()


@score_criterion("reap", "mean of gate x output norm over routed tokens (REAP)")
def reap(ls: LayerStats, seed: int) -> np.ndarray:
    return _mean(ls.gnorm_sum, ls.count)
