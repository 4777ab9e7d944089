"""A leaner CPU execution of transformers' fused experts modules, for replaying candidates.

Families whose experts module uses transformers' experts interface (``@use_experts_implementation``:
3D ``gate_up_proj`` / ``up_proj`` and ``down_proj`` tensors, flags ``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``, the gating in ``_apply_gate``) run ``grouped_mm`` by
default. On a CPU that is a loop of one matmul per expert too, plus an advanced-index gather of the
token rows, a histogram, an inverse-permutation gather and a (T, k, H) sum. `sorted_forward` computes
the same function with the slots sorted by expert (stable), ``index_select`` for the gather, one
matmul pair per expert that has tokens, and ``index_add_`` (in float32) for the weighted sum:

    out_t = sum_{j < k} w_tj * down_e(gate(up_e(x_t))),   e = top_k_index[t, j]

Equal to ``grouped_mm`` up to float rounding (the k terms are summed in another order); on the
testbed, one CPU thread, 4.5-5% less CPU time per candidate evaluation
(benchmarks/results/replay_profile.txt). In bfloat16/float16 each expert's rows are zero-padded to
a multiple of `ROW_BUCKET`: oneDNN builds a primitive per matmul shape, and a search meets hundreds
of token counts (a layer-by-layer search caps oneDNN's cache, `execute.native`): a 48-layer bf16
search layer by layer took 19% less CPU with 64-row buckets, in memory about the same
(benchmarks/results/row_bucket.txt).
Anything else (other implementations, expert parallelism, another device, offloaded weights) keeps
its own forward (`sorted_forward` returns None).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

# bfloat16/float16 matmuls on a CPU run in oneDNN, which builds (and caches, a bounded number) one
# primitive per shape: expert row counts are rounded up to a multiple of this (zero rows, dropped
# after), so that a search's many token counts share a few shapes. float32 goes to BLAS: no rounding.
ROW_BUCKET = 64
_FLAGS = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel")


def sorted_forward(experts: nn.Module | None) -> Callable | None:
    """The sorted forward of `experts` (module docstring), or None where it does not apply."""
    config = getattr(experts, "config", None)
    if config is None or getattr(config, "_experts_implementation", None) != "grouped_mm":
        return None
    if not all(hasattr(experts, f) for f in _FLAGS) or experts._is_expert_parallel:
        return None
    down = getattr(experts, "down_proj", None)
    if not isinstance(down, torch.Tensor) or down.device.type != "cpu" or down.is_meta or down.dim() != 3:
        return None
    return partial(_forward, experts)


def _linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool
) -> torch.Tensor:
    """x (n, in) -> (n, out); weight (in, out) when `transposed`, else (out, in)."""
    out = x @ weight if transposed else F.linear(x, weight)
    return out if bias is None else out + bias


def _forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k) -> (T, H)."""
    k = top_k_index.shape[-1]
    flat = top_k_index.reshape(-1)  # (S,) S = T * k slots
    order = torch.argsort(flat, stable=True)  # (S,) slots grouped by expert
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # slots per expert
    tokens = order // k  # (S,) the token of each sorted slot
    x = hidden_states.index_select(0, tokens)  # (S, H)
    up = self.gate_up_proj if self.has_gate else self.up_proj  # (E, 2I or I, H), or (E, H, .) transposed
    up_bias = (self.gate_up_proj_bias if self.has_gate else self.up_proj_bias) if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None
    bucket = ROW_BUCKET if x.dtype in (torch.bfloat16, torch.float16) else 1
    parts = []
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = x[start : start + n]  # (n, H), zero-padded to (n', H): n' = n rounded up to `bucket`
        rows = rows if n % bucket == 0 else F.pad(rows, (0, 0, 0, bucket - n % bucket))
        h = _linear(rows, up[e], None if up_bias is None else up_bias[e], self.is_transposed)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (n', I)
        h = _linear(h, self.down_proj[e], None if down_bias is None else down_bias[e], self.is_transposed)
        if self.has_post_expert_norm:
            h = self.post_expert_norm(h)
        parts.append(h[:n])  # (n, H)
        start += n
    out = (
        torch.cat(parts).float() if parts else x.new_zeros((0, hidden_states.shape[-1]), dtype=torch.float32)
    )
    out.mul_(top_k_weights.reshape(-1).index_select(0, order).float().unsqueeze(-1))  # (S, H) weighted
    total = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    total.index_add_(0, tokens, out)  # (T, H)
    return total.to(hidden_states.dtype)
