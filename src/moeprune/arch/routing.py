"""Read a router's decision and run single experts, through the family's own modules.

`decode_router_output` turns whatever the family's router returns into (indices, weights, logits);
`expert_outputs` runs expert ``e_n`` on token ``x_n`` for a list of (token, expert) pairs by calling
the family's fused experts module, so every layout (concatenated, interleaved, transposed, biased,
clamped activations) is handled by transformers itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapter import MoELayer


@dataclass
class RouterDecision:
    """What the router chose for T tokens."""

    indices: torch.Tensor  # (T, k) expert ids of each token's top-k
    weights: torch.Tensor  # (T, k) the routing weight g_i(x) exactly as the model applies it
    logits: torch.Tensor  # (T, E) raw router logits (-inf for masked experts)

    def probs(self) -> torch.Tensor:
        """Router softmax over all experts, p_{t,i} (float32). (T, E)"""
        return torch.softmax(self.logits.float(), dim=-1)


def decode_router_output(layer: MoELayer, output: tuple) -> RouterDecision:
    """Normalise a router's return value (family-specific tuple) to a `RouterDecision`."""
    if layer.family.router_output == "topk":
        logits, weights, indices = output
        return RouterDecision(indices=indices, weights=weights, logits=logits)
    if layer.family.router_output == "topk_probs":  # softmax probabilities: log p are logits up to a constant
        probs, weights, indices = output
        return RouterDecision(indices=indices, weights=weights, logits=probs.float().log())
    scores, logits = output  # dense_scores: (T, E) zero except the chosen experts
    k = layer.top_k
    weights, indices = torch.topk(scores, k, dim=-1)  # (T, k)
    return RouterDecision(indices=indices, weights=weights, logits=logits)


def expert_outputs(layer: MoELayer, hidden: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """a_{e_n}(x_n) for every row n: expert output before the gate weight.

    hidden: (N, H) tokens, expert_ids: (N,) expert of each row. Returns (N, H).
    Each expert runs only on its own rows.
    """
    experts = layer.experts
    if layer.family.experts_call == "routed":
        ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)  # (N, 1)
        return experts(hidden, expert_ids[:, None], ones)
    # "stacked": the module wants (E * n, H) rows grouped by expert, the same n for each expert.
    num_experts = layer.num_experts
    counts = torch.bincount(expert_ids, minlength=num_experts)  # (E,)
    width = int(counts.max()) if hidden.shape[0] else 0
    order = torch.argsort(expert_ids, stable=True)
    sorted_ids = expert_ids[order]
    starts = torch.cumsum(counts, 0) - counts  # (E,)
    slot = torch.arange(hidden.shape[0], device=hidden.device) - starts[sorted_ids]  # position within expert
    stacked = hidden.new_zeros(num_experts, width, hidden.shape[-1])  # (E, n, H)
    stacked[sorted_ids, slot] = hidden[order]
    out = experts(stacked.reshape(-1, hidden.shape[-1])).reshape(num_experts, width, -1)  # (E, n, H)
    result = torch.empty_like(hidden)
    result[order] = out[sorted_ids, slot]
    return result
