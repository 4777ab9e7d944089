"""MoP, Mosaic Pruning (cluster-then-select), per layer, from the observer's dense token subsample.

1. Optionally keep m general experts (``mop_general``, default 0; per group m // G): the kept set of
   size m with the smallest NAEE loss (see naee.py).
2. Domains of the subsample tokens: the data's domain labels when there are at least two
   (``mop_domains="labels"``/``"auto"``), else K-means (``mop_kmeans``, default 4 clusters,
   sklearn, seeded) on the layer's input hidden states.
3. Profile v[i, d] = mean_{x in domain d} ||z(x) - a_i(x)||^2 (expert i alone, unit weight, against
   the layer's routed output z(x); our choice for "expert i alone").
4. Similarity s_ij = (1 + rho_ij) / 2 with rho the Spearman correlation of v_i and v_j over domains
   (0 for constant profiles); distance 1 - s_ij; hierarchical clustering with ``mop_linkage``
   ("average", default, valid for any distance; or "ward") via scipy.
5. Activation Variability Score S_var(i) = sum_t P_i(t) log2(P_i(t) N), P_i(t) = p_{t,i} / sum_t p_{t,i}
   over all N calibration tokens, computed from the observer's sums as
   S_var(i) = plogp_sum[i] / prob_sum[i] - log2(prob_sum[i]) + log2(N).

Keeping r experts = cutting the dendrogram into r - m clusters and keeping each cluster's highest-S_var
expert. Because cuts of one dendrogram nest, so do the kept sets: walking the merges in order, each
merge of two clusters removes the representative with the lower S_var. That sequence (then the last
representative, then the general experts by ascending S_var) is the removal order, and its prefix of
length n is exactly the set removed when keeping E - n. Group-limited routers: clustering within
each group, the groups' orders interleaved in rounds.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform
from scipy.stats import rankdata

from ..errors import MoepruneError
from ..observe import LayerStats
from .base import Criterion, interleave_groups, register
from .naee import exact_set, greedy_order

LINKAGES = ("average", "ward", "complete", "single")


def avs(ls: LayerStats) -> np.ndarray:
    """S_var per expert (E,)."""
    a, b = ls.prob_sum.numpy(), ls.plogp_sum.numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        s = b / a - np.log2(a) + math.log2(max(ls.tokens, 1))
    return np.where(a > 0, s, -np.inf)


def spearman_matrix(v: np.ndarray) -> np.ndarray:
    """rho (E, E) between the rows of v (E, D): Pearson correlation of average ranks; 0 when a row is
    constant (1 on the diagonal)."""
    r = np.apply_along_axis(rankdata, 1, v) if v.shape[1] else np.zeros_like(v)
    r = r - r.mean(axis=1, keepdims=True)
    norm = np.sqrt((r * r).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = (r @ r.T) / np.outer(norm, norm)
    rho = np.nan_to_num(rho, nan=0.0, posinf=0.0, neginf=0.0)
    np.fill_diagonal(rho, 1.0)
    return np.clip(rho, -1.0, 1.0)


def token_domains(ls: LayerStats, seed: int, options: dict) -> np.ndarray:
    """Domain id of each subsample token (n,): data labels, or K-means on the hidden states."""
    mode = options.get("mop_domains", "auto")
    if mode not in ("auto", "labels", "kmeans"):
        raise MoepruneError(f"mop_domains must be auto, labels or kmeans, not '{mode}'")
    labels = ls.dense_domain.numpy()
    if mode == "labels" or (mode == "auto" and len(np.unique(labels)) >= 2):
        return labels
    from sklearn.cluster import KMeans

    x = ls.dense_hidden.numpy().astype(np.float64)
    k = max(1, min(int(options.get("mop_kmeans", 4)), len(x)))
    return KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)


def domain_profiles(ls: LayerStats, domains: np.ndarray) -> np.ndarray:
    """v (E, D): mean over each (non-empty) domain of the subsample errors ||z - a_i||^2."""
    err = ls.dense_err.numpy()  # (n, E)
    return np.stack([err[domains == d].mean(axis=0) for d in np.unique(domains)], axis=1)


def dendrogram_order(members: list[int], rho: np.ndarray, score: np.ndarray, method: str) -> list[int]:
    """Removal order of `members` from one dendrogram: each merge removes the lower-score representative
    (ties: the higher id); the final representative comes last."""
    if len(members) == 1:
        return list(members)
    sub = rho[np.ix_(members, members)]
    dist = (1.0 - (1.0 + sub) / 2.0).clip(min=0.0)
    np.fill_diagonal(dist, 0.0)
    z = linkage(squareform(dist, checks=False), method=method)  # (m-1, 4)
    rep = {c: members[c] for c in range(len(members))}  # cluster id -> representative expert
    order = []
    for step, (a, b) in enumerate(z[:, :2].astype(int)):
        ra, rb = rep.pop(a), rep.pop(b)
        keep, drop = sorted((ra, rb), key=lambda i: (-score[i], i))
        order.append(drop)
        rep[len(members) + step] = keep
    return order + list(rep.values())


def _order(ls: LayerStats, seed: int, options: dict) -> list[int]:
    if ls.dense_tokens == 0:
        raise MoepruneError(
            "criterion 'mop' needs the dense token subsample: observe again with mop among the criteria"
        )
    method = options.get("mop_linkage", "average")
    if method not in LINKAGES:
        raise MoepruneError(f"mop_linkage must be one of {', '.join(LINKAGES)}, not '{method}'")
    e, g = ls.num_experts, ls.num_groups
    score = avs(ls)
    rho = spearman_matrix(domain_profiles(ls, token_domains(ls, seed, options)))
    m_total = int(options.get("mop_general", 0))
    if not 0 <= m_total < e:
        raise MoepruneError(f"mop_general must be in 0..{e - 1}, got {m_total}")
    gram = ls.gram.numpy()
    size = e // g
    per_group = []
    for grp in range(g):
        members = list(range(grp * size, (grp + 1) * size))
        m = m_total // g
        general: list[int] = []
        if m:
            sub = gram[np.ix_(members, members)]
            removed = exact_set(sub, size - m)
            removed = greedy_order(sub)[: size - m] if removed is None else removed
            general = sorted(set(members) - {members[i] for i in removed})
        rest = [i for i in members if i not in general]
        general_order = sorted(general, key=lambda i: (score[i], i))
        per_group.append(dendrogram_order(rest, rho, score, method) + general_order)
    return per_group[0] if g == 1 else interleave_groups(per_group, key=lambda i: (score[i], i))


register(
    Criterion(
        name="mop",
        order=_order,
        needs_dense=True,
        summary="Mosaic Pruning: cluster experts by domain profiles, keep the highest-AVS expert per cluster",
    )
)
