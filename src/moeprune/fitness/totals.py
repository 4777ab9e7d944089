"""A candidate's fitness as sums over the scored tokens, kept so that slices combine exactly.

The fitness is a mean over the scored tokens, summed chunk by chunk (a chunk = the rows the head
scores at once, in batch order):

    s_i = sum of chunk i's per-token values (float64),   total = (((0 + s_1) + s_2) + ... + s_k)
    value = total / n,   score = value (higher is better) or -value

Racing scores a candidate on consecutive slices of the search batches. With ``keep`` the chunk sums
and the per-token values are kept, and `FitnessResult.then` replays the chunk sums of two
consecutive slices in order: the same float additions, in the same order, as one pass over both,
so the combined result is bitwise the one-pass result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .metrics import FITNESS, Fitness

Chunk = tuple[float, float | None, float | None, int]  # value sum, lower sum, upper sum, tokens


@dataclass
class FitnessResult:
    """Mean over the scored tokens; ``lower``/``upper`` bound the exact value on a sparse cache.
    ``totals`` (racing only) keeps what combines it with the next slice's result (`then`)."""

    name: str
    value: float
    score: float  # what the search maximises (value, or -value for losses)
    lower: float | None = None
    upper: float | None = None
    tokens: int = 0
    totals: Totals | None = field(default=None, repr=False, compare=False)

    def then(self, later: FitnessResult) -> FitnessResult:
        """This result followed by `later`'s (the next slice's): bitwise the one-pass result."""
        if self.totals is None or later.totals is None:
            raise ValueError("only results that keep their totals (racing slices) combine")
        return self.totals.then(later.totals).result(FITNESS.get(self.name))

    def token_scores(self) -> np.ndarray:
        """The per-token values in the direction the search maximises. (tokens,) float64"""
        if self.totals is None:
            raise ValueError("this result did not keep its per-token values (score with a racing slice)")
        values = np.concatenate(self.totals.values) if self.totals.values else np.zeros(0)
        return values if FITNESS.get(self.name).higher_is_better else -values

    def as_dict(self) -> dict:
        """The result as JSON: the fields that are set, without the totals."""
        return {k: v for k, v in vars(self).items() if v is not None and k != "totals"}


class Totals:
    """Running sums of per-token fitness values and bounds (module docstring)."""

    def __init__(self, keep: bool = False) -> None:
        self.value, self.lower, self.upper, self.n = 0.0, 0.0, 0.0, 0
        self.has_lower = self.has_upper = False
        self.keep = keep
        self.chunks: list[Chunk] = []
        self.values: list[np.ndarray] = []  # per chunk (c,) float64, when kept

    def add(self, value: torch.Tensor, lower: torch.Tensor | None, upper: torch.Tensor | None) -> None:
        """One chunk's per-token values (c,) and bounds."""
        chunk = (
            float(value.double().sum()),
            None if lower is None else float(lower.double().sum()),
            None if upper is None else float(upper.double().sum()),
            int(value.numel()),
        )
        self._add(chunk)
        if self.keep:
            self.chunks.append(chunk)
            self.values.append(value.detach().double().cpu().numpy())

    def _add(self, chunk: Chunk) -> None:
        value, lower, upper, n = chunk
        self.value += value
        self.n += n
        if lower is not None:
            self.has_lower, self.lower = True, self.lower + lower
        if upper is not None:
            self.has_upper, self.upper = True, self.upper + upper

    def then(self, later: Totals) -> Totals:
        """These totals followed by `later`'s: the chunk sums replayed in order."""
        out = Totals(keep=True)
        for chunk in self.chunks + later.chunks:
            out._add(chunk)
        out.chunks, out.values = self.chunks + later.chunks, self.values + later.values
        return out

    def result(self, fitness: Fitness) -> FitnessResult:
        """Means over the tokens (NaN on none: a racing slice may score no token)."""
        n = self.n or math.nan
        value = self.value / n
        return FitnessResult(
            name=fitness.name,
            value=value,
            score=fitness.score(value),
            lower=self.lower / n if self.has_lower else None,
            upper=self.upper / n if self.has_upper else None,
            tokens=self.n,
            totals=self if self.keep else None,
        )
