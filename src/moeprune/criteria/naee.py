"""NAEE: remove the expert set R that least changes the layer output on calibration tokens.

    minimise  L(R) = sum_x || z(x) - z_kept(x) ||^2  over |R| = n

Our choice of z_kept (SPEC leaves it open): the tokens keep their routing; the contributions of the
removed experts are dropped, z(x) - z_kept(x) = sum_{i in R} c_i(x) with c_i(x) = 0 when x is not
routed to i. Then L(R) = sum_{i, j in R} gram[i, j] with gram[i, j] = sum_x c_i(x) . c_j(x), which
the observer accumulates over every calibration token (no subsample needed).

- exact: every admissible R (for G expert groups, n/G from each group) when there are at most
  ``naee_max_sets`` (default 100,000) of them;
- greedy otherwise: add to R the expert with the smallest increase L(R + i) - L(R) =
  gram[i, i] + 2 sum_{j in R} gram[i, j], taking from the groups with the fewest removals first.

The removal order (consumed by EvoESAP) is the greedy sequence, so its prefixes nest;
``choose_removed`` with a count uses the exact set when it is small enough to enumerate.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..observe import LayerStats
from .base import Criterion, group_of, register

MAX_SETS = 100_000


def naee_loss(gram: np.ndarray, removed: list[int]) -> float:
    """L(R) = sum_{i, j in R} gram[i, j]."""
    r = np.asarray(removed, dtype=np.int64)
    return float(gram[np.ix_(r, r)].sum()) if len(r) else 0.0


def greedy_order(gram: np.ndarray, num_groups: int = 1, candidates: list[int] | None = None) -> list[int]:
    """Greedy removal sequence over `candidates` (default all experts), balanced across groups."""
    e = gram.shape[0]
    left = list(range(e)) if candidates is None else list(candidates)
    removed: list[int] = []
    per_group = [0] * num_groups
    cross = np.zeros(e)  # sum_{j in R} gram[i, j]
    while left:
        low = min(per_group[group_of(i, e, num_groups)] for i in left)
        allowed = [i for i in left if per_group[group_of(i, e, num_groups)] == low]
        best = min(allowed, key=lambda i: (gram[i, i] + 2 * cross[i], i))
        removed.append(best)
        left.remove(best)
        per_group[group_of(best, e, num_groups)] += 1
        cross += gram[:, best]
    return removed


def exact_set(gram: np.ndarray, n: int, num_groups: int = 1, max_sets: int = MAX_SETS) -> list[int] | None:
    """The admissible R of size n with the smallest L(R), or None when there are more than `max_sets`."""
    e = gram.shape[0]
    if n == 0:
        return []
    if n % num_groups:
        return None
    size, per = e // num_groups, n // num_groups
    if math.comb(size, per) ** num_groups > max_sets:
        return None
    groups = [range(g * size, (g + 1) * size) for g in range(num_groups)]
    sets = itertools.product(*(itertools.combinations(g, per) for g in groups))
    best, best_loss = None, math.inf
    while chunk := list(itertools.islice(sets, 4096)):
        r = np.array([sum(s, ()) for s in chunk], dtype=np.int64)  # (M, n)
        loss = gram[r[:, :, None], r[:, None, :]].sum(axis=(1, 2))  # (M,)
        j = int(np.argmin(loss))
        if loss[j] < best_loss - 1e-12 * max(1.0, abs(best_loss)):
            best, best_loss = sorted(r[j].tolist()), float(loss[j])
    return best


def _order(ls: LayerStats, seed: int, options: dict) -> list[int]:
    return greedy_order(ls.gram.numpy(), ls.num_groups)


def _choose(ls: LayerStats, n: int, seed: int, options: dict) -> list[int]:
    gram = ls.gram.numpy()
    exact = exact_set(gram, n, ls.num_groups, int(options.get("naee_max_sets", MAX_SETS)))
    return exact if exact is not None else greedy_order(gram, ls.num_groups)[:n]


register(
    Criterion(
        name="naee",
        order=_order,
        choose=_choose,
        summary="removed set minimising the layer-output reconstruction error (exact or greedy)",
    )
)
