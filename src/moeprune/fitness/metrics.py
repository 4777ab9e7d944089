"""Fitness functions: compare the draft (a pruned candidate) with the cached teacher, token by token.

Each function takes the draft's log-probabilities on the scored tokens ``logq`` (n, V), the teacher
slice and the next-token labels (n,), and returns per-token values (n,) plus, where the sparse
cache only bounds the exact value, per-token lower/upper bounds. The fitness is the mean over all
scored tokens of the search set.

- ``esap``: sum_v min(p_v, q_v) = 1 - TV(p, q) (maximise; 1 = identical)
- ``kl_teacher_draft``: KL(p || q) = sum_v p_v (log p_v - log q_v) (minimise)
- ``kl_draft_teacher``: KL(q || p) = sum_v q_v (log q_v - log p_v) (minimise)
- ``nll``: -log q(y_t) of the text (minimise; does not use the teacher)

On a sparse cache, KL is computed on the K + 1 outcomes (top-K + tail), a lower bound of the exact
KL by the log-sum inequality.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..registry import Registry
from .teacher import TeacherSlice

_EPS = 1e-30

Terms = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]  # value, lower, upper (n,)


@dataclass(frozen=True)
class Fitness:
    name: str
    fn: Callable[[torch.Tensor, TeacherSlice, torch.Tensor], Terms]
    higher_is_better: bool
    needs_teacher: bool = True

    def score(self, value: float) -> float:
        """The search maximises this: the value itself or its negation."""
        return value if self.higher_is_better else -value


FITNESS: Registry[Fitness] = Registry("fitness function")


def _register(name: str, higher_is_better: bool, needs_teacher: bool = True):
    def decorator(fn):
        FITNESS.register(name)(Fitness(name, fn, higher_is_better, needs_teacher))
        return fn

    return decorator


def _sparse_parts(
    logq: torch.Tensor, t: TeacherSlice
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draft on the K+1 outcomes: logq_K (n, K), q_K (n, K), q_tail (n,), log q_tail (n,). On a
    nucleus slice the entries past a token's nucleus (teacher probability 0) belong to the tail: their
    q_K is 0 and their mass is in q_tail, as the teacher's is in its tail."""
    logq_k = logq.gather(-1, t.top_ids.long())  # (n, K)
    q_k = logq_k.exp()
    if t.nucleus:
        q_k = torch.where(t.top_probs > 0, q_k, 0.0)
    q_tail = (1.0 - q_k.sum(-1)).clamp_min(0.0)  # (n,)
    return logq_k, q_k, q_tail, q_tail.clamp_min(_EPS).log()


@_register("esap", higher_is_better=True)
def esap(logq: torch.Tensor, t: TeacherSlice, labels: torch.Tensor) -> Terms:
    """ESAP_t = sum_v min(p_v, q_v) = 1 - TV(p_t, q_t); sparse: [lower, upper] as in `teacher`, the
    value is upper; nucleus: the same bounds, the value is their midpoint."""
    if t.dense:
        value = torch.minimum(t.probs, logq.exp()).sum(-1)  # (n,)
        return value, None, None
    _, q_k, q_tail, _ = _sparse_parts(logq, t)
    lower = torch.minimum(t.top_probs, q_k).sum(-1)  # (n,)
    upper = lower + torch.minimum(t.tail, q_tail)
    return ((lower + upper) / 2 if t.nucleus else upper), lower, upper


@_register("kl_teacher_draft", higher_is_better=False)
def kl_teacher_draft(logq: torch.Tensor, t: TeacherSlice, labels: torch.Tensor) -> Terms:
    """KL(p || q) = sum_v p_v (log p_v - log q_v)."""
    if t.dense:
        p = t.probs
        return (p * (p.clamp_min(_EPS).log() - logq)).sum(-1), None, None
    logq_k, _, _, log_q_tail = _sparse_parts(logq, t)
    p = t.top_probs
    value = (p * (p.clamp_min(_EPS).log() - logq_k)).sum(-1) + t.tail * (
        t.tail.clamp_min(_EPS).log() - log_q_tail
    )
    return value, value, None


@_register("kl_draft_teacher", higher_is_better=False)
def kl_draft_teacher(logq: torch.Tensor, t: TeacherSlice, labels: torch.Tensor) -> Terms:
    """KL(q || p) = sum_v q_v (log q_v - log p_v)."""
    if t.dense:
        q = logq.exp()
        return (q * (logq - t.probs.clamp_min(_EPS).log())).sum(-1), None, None
    logq_k, q_k, q_tail, log_q_tail = _sparse_parts(logq, t)
    value = (q_k * (logq_k - t.top_probs.clamp_min(_EPS).log())).sum(-1) + q_tail * (
        log_q_tail - t.tail.clamp_min(_EPS).log()
    )
    return value, value, None


@_register("nll", higher_is_better=False, needs_teacher=False)
def nll(logq: torch.Tensor, t: TeacherSlice, labels: torch.Tensor) -> Terms:
    """NLL_t = -log q(y_{t+1} | y<=t)."""
    return -logq.gather(-1, labels[:, None]).squeeze(1), None, None
