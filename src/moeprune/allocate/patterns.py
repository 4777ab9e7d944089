"""Initial allocation patterns: weights w_l (how much of the budget layer l loses), l = 0..L-1.

| name | w_l |
|---|---|
| uniform | 1 |
| random | U(0, 1) |
| up | l + 1 (prune deep layers more) |
| down | L - l |
| mid | 1 + min(l, L-1-l) (prune the middle more) |
| mid-neg | 1 + abs(l - (L-1)/2) (prune the ends more) |
| front-heavy | 0.7^l |
| back-heavy | 1.3^l |
| block-early | 1 in the first half, 0.25 after |
| block-late | 0.25 in the first half, 1 after |
| alt | 1 on even layers, 0.5 on odd |
| deep-flat | min(1, (l+1) / ceil(L/3)) (ramp over the first third, then flat) |
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from ..registry import Registry

Pattern = Callable[[int, np.random.Generator], list[float]]
INIT_PATTERNS: Registry[Pattern] = Registry("init pattern")


def _pattern(name: str):
    return INIT_PATTERNS.register(name)


@_pattern("uniform")
def uniform(n: int, rng: np.random.Generator) -> list[float]:
    return [1.0] * n


@_pattern("random")
def random(n: int, rng: np.random.Generator) -> list[float]:
    return [float(x) for x in rng.random(n)]


@_pattern("up")
def up(n: int, rng: np.random.Generator) -> list[float]:
    return [float(i + 1) for i in range(n)]


@_pattern("down")
def down(n: int, rng: np.random.Generator) -> list[float]:
    return [float(n - i) for i in range(n)]


@_pattern("mid")
def mid(n: int, rng: np.random.Generator) -> list[float]:
    return [1.0 + min(i, n - 1 - i) for i in range(n)]


@_pattern("mid-neg")
def mid_neg(n: int, rng: np.random.Generator) -> list[float]:
    return [1.0 + abs(i - (n - 1) / 2) for i in range(n)]


@_pattern("front-heavy")
def front_heavy(n: int, rng: np.random.Generator) -> list[float]:
    return [0.7**i for i in range(n)]


@_pattern("back-heavy")
def back_heavy(n: int, rng: np.random.Generator) -> list[float]:
    return [1.3**i for i in range(n)]


@_pattern("block-early")
def block_early(n: int, rng: np.random.Generator) -> list[float]:
    return [1.0 if i < n / 2 else 0.25 for i in range(n)]


@_pattern("block-late")
def block_late(n: int, rng: np.random.Generator) -> list[float]:
    return [0.25 if i < n / 2 else 1.0 for i in range(n)]


@_pattern("alt")
def alt(n: int, rng: np.random.Generator) -> list[float]:
    return [1.0 if i % 2 == 0 else 0.5 for i in range(n)]


@_pattern("deep-flat")
def deep_flat(n: int, rng: np.random.Generator) -> list[float]:
    third = max(1, math.ceil(n / 3))
    return [min(1.0, (i + 1) / third) for i in range(n)]


# the SPEC's order: one initial plan per pattern, in this order
SPEC_ORDER = (
    "uniform", "random", "up", "down", "mid", "mid-neg", "front-heavy", "back-heavy",
    "block-early", "block-late", "alt", "deep-flat",
)  # fmt: skip
