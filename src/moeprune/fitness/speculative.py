"""Measured speculative-decoding acceptance: draft = the masked (pruned) model, target = the full model.

For validating ESAP only (slow: autoregressive, no KV cache). Each round the draft proposes
``gamma`` tokens autoregressively; the target scores prefix + proposals in one forward and accepts

- greedy: proposals while they equal the target's argmax;
- sampled: proposal x with probability min(1, p(x)/q(x)); on rejection resamples from
  norm(max(0, p - q)) (Leviathan et al. 2023), so the output follows the target exactly.

then appends one target token (the correction, or a bonus token when all were accepted).
acceptance rate = accepted proposals / proposed tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..plan import ExpertPlan
from ..surgery import mask_experts


@dataclass
class AcceptanceResult:
    accepted: int
    proposed: int
    generated: list[list[int]]  # the target-distributed continuation of every prompt

    @property
    def rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


def _next_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    return model(input_ids=x, use_cache=False).logits[0].float()  # (L, V)


@torch.inference_mode()
def speculative_acceptance(
    model: nn.Module,
    plan: ExpertPlan | dict,
    prompts: list[list[int]],
    *,
    gamma: int = 4,
    max_new_tokens: int = 32,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
) -> AcceptanceResult:
    """Speculative decoding of every prompt with the pruned draft; the acceptance rate measured."""
    gen = torch.Generator().manual_seed(seed)
    accepted = proposed = 0
    outputs = []
    for prompt in prompts:
        ids = list(prompt)
        while len(ids) - len(prompt) < max_new_tokens:
            k = min(gamma, max_new_tokens - (len(ids) - len(prompt)))
            draft_ids, draft_q = list(ids), []
            with mask_experts(model, plan):
                for _ in range(k):
                    logits = _next_logits(model, draft_ids)[-1] / temperature  # (V,)
                    q = torch.softmax(logits, -1)
                    tok = int(q.argmax()) if greedy else int(torch.multinomial(q, 1, generator=gen))
                    draft_q.append(q)
                    draft_ids.append(tok)
            target = torch.softmax(
                _next_logits(model, draft_ids)[len(ids) - 1 :] / temperature, -1
            )  # (k+1, V)
            n_ok = 0
            for j in range(k):
                tok, p, q = draft_ids[len(ids) + j], target[j], draft_q[j]
                if greedy:
                    ok = tok == int(p.argmax())
                else:
                    ok = float(torch.rand((), generator=gen)) < min(
                        1.0, float(p[tok] / q[tok].clamp_min(1e-30))
                    )
                if not ok:
                    break
                n_ok += 1
            accepted += n_ok
            proposed += k
            ids = draft_ids[: len(ids) + n_ok]
            p = target[n_ok]
            if not greedy and n_ok < k:
                resid = (p - draft_q[n_ok]).clamp_min(0.0)
                p = resid / resid.sum() if resid.sum() > 0 else p
            ids.append(int(p.argmax()) if greedy else int(torch.multinomial(p, 1, generator=gen)))
        outputs.append(ids[len(prompt) : len(prompt) + max_new_tokens])
    return AcceptanceResult(accepted=accepted, proposed=proposed, generated=outputs)
