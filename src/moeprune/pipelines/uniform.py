"""``uniform``: every MoE layer loses the same share, u_l = round(s * E_l) (rounded to the router's
groups, top_k kept), chosen by a criterion from one observation pass; ``plan``: the experts a plan
file names."""

from __future__ import annotations

from ..criteria import choose_removed, uniform_counts
from .base import Choice, RunContext


def _summary(plan, num_experts: dict[int, int]) -> str:
    total = sum(num_experts.values())
    return f"pruned {plan.total_removed()} of {total} routed experts"


def uniform(ctx: RunContext) -> Choice:
    s = ctx.spec
    stats = ctx.stats()
    plan = choose_removed(stats, s.criterion, uniform_counts(stats, s.sparsity), s.seed)
    record = {
        "allocation": "uniform",
        "criterion": s.criterion,
        "sparsity": s.sparsity,
        "plan": plan.to_dict(),
    }
    return Choice(plan, record, _summary(plan, ctx.num_experts), label="uniform", uniform=plan)


def given_plan(ctx: RunContext) -> Choice:
    plan, source = ctx.plan_file, ctx.spec.uniform_from
    record = {"allocation": "plan", "plan": plan.to_dict()} | ({"uniform_from": source} if source else {})
    return Choice(plan, record, _summary(plan, ctx.num_experts), "plan")
