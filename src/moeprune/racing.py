"""Racing (multi-fidelity evaluation): score candidates on consecutive slices of the search tokens
and stop scoring one as soon as it is clearly worse than a reference (the search's worst elite).

After every slice but the last, with a_t the candidate's per-token values on the n tokens scored so
far and e_t the reference's on the same tokens (both in the direction the search maximises):

    d_t = a_t - e_t,    se = std(d, ddof=1) / sqrt(n),    mean(d) + z * se < 0   ->  dropped

A dropped ("raced out") candidate keeps the mean over its tokens as its score; the others are scored
on every slice. The slices' results combine (`SliceResult.then`) into exactly the one-pass result
(`fitness.totals`), so with z = inf, when nothing is ever dropped, a raced search is the exact
search bit for bit. `evolve.evolve` takes a `Racing` in place of its score function.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from .errors import MoepruneError

if TYPE_CHECKING:  # arrays come in; the CLI imports the defaults without numpy
    import numpy as np

__all__ = ["DEFAULT_SLICES", "DEFAULT_Z", "EEP_Z", "Racing", "SliceResult", "beaten"]

C = TypeVar("C")  # a candidate

# EvoESAP's default: on search rows in a random order (`fitness.SearchSet.from_tokens`), z = 1 keeps
# the exact search's plan in 10 of 10 testbed seeds on the on-policy answers at 16 x 10 (31.1% of the
# token evaluations saved with generation 1 raced, 26.6% without) and in 9 of 10 on 64-token text
# windows at 12 x 6; on 256-token text windows no z from 1 to 2 keeps 9 of 10 (near-tie plans; best
# ESAP -0.0003 on average at z = 1, with or without generation 1 raced)
# (benchmarks/results/racing.txt); on rows grouped by domain it took z = 2.
DEFAULT_Z = 1.0
# EEP's default (its selection and merge searches): z = 3 is the only z that keeps the exact selection
# search's plan in >= 9 of 10 testbed seeds from random starts on on-policy data and on text (20 seeds);
# seeded with a criterion's plan, or in the merge search, every z down to 0.5 keeps it
# (benchmarks/results/racing_eep.txt).
EEP_Z = 3.0
DEFAULT_SLICES = 4


class SliceResult(Protocol):
    """A candidate's result on the first slices of the search tokens (e.g. `fitness.FitnessResult`)."""

    score: float  # the mean over its tokens, in the direction the search maximises
    tokens: int  # how many tokens it was scored on

    def token_scores(self) -> np.ndarray:
        """Per-token values, maximised direction. (tokens,)"""
        ...

    def then(self, later: Any) -> Any:
        """This result followed by the next slice's (a `SliceResult`)."""
        ...


def beaten(values: np.ndarray, reference: np.ndarray, z: float) -> bool:
    """True when the paired bound says the candidate is below the reference (module docstring):
    `values` (n,) the candidate's per-token values so far, `reference` (>= n,) the reference's on the
    same tokens first. Never with fewer than 2 tokens or z = inf."""
    n = len(values)
    if n < 2 or math.isinf(z):
        return False
    d = values - reference[:n]  # (n,)
    se = float(d.std(ddof=1)) / math.sqrt(n)
    return float(d.mean()) + z * se < 0


@dataclass(frozen=True)
class Racing(Generic[C]):
    """How a search races its candidates: ``score_slice(candidates, s)`` scores them on slice s
    (s = 0..slices-1, consecutive parts of the search tokens, in that order); `z` as in the module
    docstring (inf: never drop)."""

    score_slice: Callable[[list[C], int], Sequence[SliceResult]]
    slices: int
    z: float = DEFAULT_Z

    def __post_init__(self) -> None:
        if self.slices < 1:
            raise MoepruneError(f"racing needs at least 1 slice, got {self.slices}")
        if not self.z > 0:
            raise MoepruneError(f"racing z must be > 0 (inf: never drop a candidate), got {self.z}")

    def describe(self) -> dict:
        """The settings as JSON (a search state's header)."""
        return {"z": self.z if math.isfinite(self.z) else "inf", "slices": self.slices}

    def mapped(self, convert: Callable[[Any], C]) -> Racing:
        """The same racing for candidates that `convert` turns into this one's."""
        return Racing(lambda cs, s: self.score_slice([convert(c) for c in cs], s), self.slices, self.z)

    def race(
        self, candidates: list[C], reference: np.ndarray | None, keep: int = 0
    ) -> tuple[list[SliceResult], list[bool]]:
        """Every candidate's result and whether it was dropped. `reference`: the per-token values of
        a fully scored candidate (the worst elite). Without one (a search's first generation) and
        with 0 < `keep` < len(candidates), the `keep` candidates best on the first slice are scored on
        every slice and the worst of them by its full score is the others' reference: each of a
        generation's elites scores at least that, so the bar is never above the one later
        generations face. It was chosen for its first slice, where its values are biased upward (on
        the testbed's text, comparing there changed the plan of 10 of 10 seeds instead of 9, best ESAP
        -0.0008 instead of -0.0003 on average), so the others are compared on the later slices only
        (benchmarks/results/racing.txt, session 8). Without either (or z = inf), every candidate is
        scored on every slice."""
        n = len(candidates)
        if reference is not None or not 0 < keep < n or math.isinf(self.z) or self.slices < 2:
            return self._race(candidates, [None] * n, 0, reference)
        first = self._scored(candidates, 0)
        ahead = sorted(range(n), key=lambda i: -first[i].score)[:keep]  # stable: ties in given order
        rest = [i for i in range(n) if i not in ahead]
        top, _ = self._race([candidates[i] for i in ahead], [first[i] for i in ahead], 1, None)
        bar = min(top, key=lambda r: r.score).token_scores()
        skip = first[0].tokens  # the first slice's tokens: not compared (the module docstring's n)
        others, out = self._race([candidates[i] for i in rest], [first[i] for i in rest], 1, bar, skip)
        results: list[Any] = [None] * n
        dropped = [False] * n
        for i, r in zip(ahead, top, strict=True):
            results[i] = r
        for i, r, o in zip(rest, others, out, strict=True):
            results[i], dropped[i] = r, o
        return results, dropped

    def _scored(self, candidates: list[C], s: int) -> list[Any]:
        scored = list(self.score_slice(candidates, s))
        if len(scored) != len(candidates):
            raise MoepruneError(
                f"score_slice returned {len(scored)} results for {len(candidates)} candidates"
            )
        return scored

    def _race(
        self,
        candidates: list[C],
        results: list[Any],
        start: int,
        reference: np.ndarray | None,
        skip: int = 0,
    ) -> tuple[list[SliceResult], list[bool]]:
        """Race from slice `start` on (`results`: each candidate's on slices 0..start-1, or None),
        comparing the tokens after the first `skip` only."""
        results = list(results)
        alive = list(range(len(candidates)))

        def survivors() -> list[int]:
            if reference is None:
                return alive
            return [
                i for i in alive if not beaten(results[i].token_scores()[skip:], reference[skip:], self.z)
            ]

        if start > 0:
            alive = survivors()
        for s in range(start, self.slices):
            if not alive:
                break
            scored = self._scored([candidates[i] for i in alive], s)
            for i, r in zip(alive, scored, strict=True):
                results[i] = r if results[i] is None else results[i].then(r)
            if s < self.slices - 1:
                alive = survivors()
        done = set(alive)
        return results, [i not in done for i in range(len(candidates))]
