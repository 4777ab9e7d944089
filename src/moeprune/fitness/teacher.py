"""Teacher outputs on the search set, computed once: dense probabilities or a top-K sparse cache.

Dense keeps p_teacher(v | y<t) for every scored token t and vocabulary entry v: T x V floats.
Sparse keeps, per scored token, the K largest teacher probabilities, their token ids and the tail
mass p_tail = 1 - sum_{v in K} p_v. Comparing a draft q against it treats the tail as one outcome
(K + 1 outcomes), which bounds the exact ESAP:

    lower_t = sum_{v in K} min(p_v, q_v)  <=  ESAP_t  <=  lower_t + min(p_tail, q_tail) = upper_t

The sparse ESAP value is ``upper`` (the K+1-outcome ESAP, exact when the two tails are proportional);
``lower`` is reported with it.

Nucleus keeps, per scored token, the smallest set of the teacher's most probable tokens whose mass
reaches ``nucleus_p`` (default 0.95), at most K_max = ``top_k`` of them, and the tail mass
1 - (kept mass). It is stored as a top-K_max sparse slice whose entries beyond each token's nucleus
have probability 0 (their ids kept) and whose tail holds everything not kept; the draft's mass on
those entries goes to its tail too (`metrics`), so the outcomes are the nucleus + one tail and the
sparse bounds above hold unchanged (same bytes as sparse at the same K_max: stored padded). Its ESAP value is the
midpoint (lower + upper) / 2 of the bound, with ``lower`` and ``upper`` reported beside it.

Hidden keeps, per scored token, the teacher's final hidden state after the final norm, h_t (T x H
instead of T x V: 1.3% of dense at H = 2048, V = 151,936 in float32), and recomputes
p_t = softmax(lm_head(h_t)) on the scored rows while a candidate is scored: exact (the same
computation as the teacher's own head), for one LM-head matmul per candidate. Where the teacher's
probabilities of the whole search set fit a memory budget (T x V float32 <= ``KEEP_PROBS_BYTES``, e.g.
61 MB for the testbed's 2,550 text tokens at V = 6,000), they are computed once, by that same head
and softmax, and kept beside the cache (`TeacherSlice.kept_probs`, `keep_teacher_probs`): a candidate
then costs no teacher recompute, with bitwise the same values; otherwise (any V ~ 150k search set of
more than a few hundred tokens) they are recomputed per candidate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

CacheKind = Literal["dense", "sparse", "hidden", "nucleus"]
CACHE_KINDS: tuple[str, ...] = ("sparse", "dense", "hidden", "nucleus")  # what `--cache` accepts
# the hidden cache keeps the teacher's probabilities in memory when T x V float32 fit in this
KEEP_PROBS_BYTES = 256 * 2**20


@dataclass
class TeacherSlice:
    """The teacher on the scored tokens of one batch."""

    probs: torch.Tensor | None = None  # dense: (n, V) float32
    top_probs: torch.Tensor | None = None  # sparse: (n, K) float32
    top_ids: torch.Tensor | None = None  # sparse: (n, K) int16/int32
    tail: torch.Tensor | None = None  # sparse: (n,) float32
    hidden: torch.Tensor | None = None  # hidden: (n, H) after the final norm, the model's dtype
    nucleus: bool = False  # a nucleus slice (sparse layout, zeros past each nucleus): ESAP = midpoint
    kept_probs: torch.Tensor | None = None  # hidden: (n, V) float32 p, computed once (not counted)

    @property
    def dense(self) -> bool:
        return self.probs is not None

    def nbytes(self) -> int:
        """Bytes of the cache itself (kept probabilities apart: `kept_nbytes`)."""
        return sum(
            t.numel() * t.element_size()
            for t in (self.probs, self.top_probs, self.top_ids, self.tail, self.hidden)
            if t is not None
        )

    def kept_nbytes(self) -> int:
        t = self.kept_probs
        return 0 if t is None else t.numel() * t.element_size()

    def rows(self, start: int, stop: int) -> TeacherSlice:
        """The scored tokens start..stop-1 (views, no copy)."""

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return TeacherSlice(
            cut(self.probs),
            cut(self.top_probs),
            cut(self.top_ids),
            cut(self.tail),
            cut(self.hidden),
            self.nucleus,
            cut(self.kept_probs),
        )


def nucleus_mask(top_probs: torch.Tensor, p: float) -> torch.Tensor:
    """(n, K) descending probabilities -> (n, K) bool: the smallest prefix whose mass reaches `p`
    (all K when even they do not; all K for p >= 1, whatever the float sums)."""
    if p >= 1.0:
        return torch.ones_like(top_probs, dtype=torch.bool)
    before = top_probs.cumsum(-1) - top_probs  # (n, K) mass of the entries ranked above each
    return before < p  # an entry is kept while the mass before it is still short of p


def teacher_slice(
    logits: torch.Tensor | None,
    kind: CacheKind,
    top_k: int,
    hidden: torch.Tensor | None = None,
    nucleus_p: float = 0.95,
) -> TeacherSlice:
    """logits (n, V) of the scored tokens (for the hidden cache: their normed final hidden states
    (n, H) instead; the logits are not read and may be None) -> what the cache keeps of them.
    `nucleus_p`: the nucleus cache's mass."""
    if kind == "hidden":
        if hidden is None:
            raise ValueError("the hidden teacher cache needs the final hidden states")
        return TeacherSlice(hidden=hidden.contiguous())
    probs = torch.softmax(logits.float(), dim=-1)  # (n, V)
    if kind == "dense":
        return TeacherSlice(probs=probs)
    k = min(top_k, probs.shape[-1])
    top_probs, top_ids = torch.topk(probs, k, dim=-1)  # (n, K)
    id_dtype = torch.int16 if probs.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
    if kind == "nucleus":
        top_probs = torch.where(nucleus_mask(top_probs, nucleus_p), top_probs, 0.0)
    tail = (1.0 - top_probs.sum(-1)).clamp_min(0.0)  # (n,)
    return TeacherSlice(
        top_probs=top_probs.contiguous(),
        top_ids=top_ids.to(id_dtype),
        tail=tail,
        nucleus=kind == "nucleus",
    )


@dataclass
class TeacherCache:
    """One `TeacherSlice` per search batch, plus how it was built."""

    kind: CacheKind
    top_k: int
    slices: list[TeacherSlice]
    nucleus_p: float | None = None  # the nucleus cache's mass (None for the other kinds)

    def __post_init__(self) -> None:
        if self.kind != "nucleus":
            self.nucleus_p = None

    def nbytes(self) -> int:
        """Bytes of the cache (without the hidden cache's kept probabilities)."""
        return sum(s.nbytes() for s in self.slices)

    def kept_nbytes(self) -> int:
        """Bytes of the teacher probabilities the hidden cache keeps in memory (0: recomputed)."""
        return sum(s.kept_nbytes() for s in self.slices)

    @property
    def probs_kept(self) -> bool:
        return self.kind == "hidden" and all(s.kept_probs is not None for s in self.slices)


def keep_teacher_probs(
    cache: TeacherCache,
    probs_of: Callable[[torch.Tensor], torch.Tensor],
    rows_per_call: int,
    vocab: int,
    budget: int = KEEP_PROBS_BYTES,
) -> bool:
    """A hidden cache: compute p = probs_of(h) for every scored token once and keep it in its slices,
    when T x V float32 fit in `budget` bytes; True when kept. `probs_of` maps normed final states
    (c, H) to probabilities (c, V) and is called on the chunks of `rows_per_call` rows an evaluator
    scores, so the kept values are bitwise the ones it would recompute."""
    if cache.kind != "hidden":
        return False
    total = sum(s.hidden.shape[0] for s in cache.slices) * vocab * 4
    if total > budget:
        return False
    for s in cache.slices:
        n = s.hidden.shape[0]
        step = rows_per_call or n
        parts = [probs_of(s.hidden[i : i + step]) for i in range(0, n, step)]  # (c, V) each
        s.kept_probs = torch.cat(parts) if parts else s.hidden.new_zeros((0, vocab), dtype=torch.float32)
    return True
