"""Is ESAP a valid proxy? Across >= 20 candidate plans of one criterion's order, Spearman correlation
of ESAP (teacher-forced, held-out text, dense teacher) with

- measured speculative-decoding acceptance (draft = the pruned model by masking, target = the full
  model, greedy, gamma = 4, autoregressive), and
- generation exact match on the testbed's arithmetic items (and agreement with the unpruned
  model's greedy answers).

Plans: uniform, one per init pattern, then seeded mutants and random allocations, at one or more
sparsities (so that the plans span a range of quality).

    python benchmarks/proxy_validity.py [--model DIR --data DIR] [--plans 24]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from scipy.stats import spearmanr

from moeprune import api
from moeprune.allocate import (
    INIT_PATTERNS,
    AllocationSpace,
    EvoConfig,
    counts_from_weights,
    mutate,
    plan_from_counts,
    uniform_allocation,
)
from moeprune.allocate.patterns import SPEC_ORDER
from moeprune.arch import moe_layers
from moeprune.evaluate import generation_exact_match, read_jsonl
from moeprune.fitness import CandidateEvaluator, speculative_acceptance
from moeprune.surgery import mask_experts
from moeprune.testbed import load_testbed, removal_order_for, token_split


def candidate_counts(space: AllocationSpace, n: int, seed: int) -> list[tuple[int, ...]]:
    rng = np.random.Generator(np.random.PCG64(seed))
    plans = [uniform_allocation(space)]
    plans += [counts_from_weights(space, INIT_PATTERNS.get(p)(len(space.layers), rng)) for p in SPEC_ORDER]
    cfg = EvoConfig()
    while len(dict.fromkeys(plans)) < n:
        base = plans[int(rng.integers(len(plans)))]
        plans.append(mutate(space, base, cfg, rng))
    return list(dict.fromkeys(plans))[:n]


def plot_rows(rows: list[dict], sparsities: list[float], unpruned_em: float, path: str) -> None:
    """ESAP (x) against measured acceptance and exact match (y), one colour per sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "acceptance", "measured speculative acceptance"),
        (axes[1], "exact_match", "generation exact match"),
    ):
        for sparsity in sparsities:
            sub = [r for r in rows if r["sparsity"] == sparsity]
            ax.scatter([r["esap"] for r in sub], [r[key] for r in sub], label=f"sparsity {sparsity}", s=18)
        rho, _ = spearmanr([r["esap"] for r in rows], [r[key] for r in rows])
        ax.set(xlabel="ESAP (held-out, teacher-forced)", ylabel=label, title=f"{label}: Spearman {rho:.3f}")
        ax.grid(alpha=0.3)
    axes[1].axhline(unpruned_em, color="grey", ls="--", lw=0.8, label="unpruned")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsities", default="0.375,0.5,0.625")
    p.add_argument("--plans", type=int, default=24)
    p.add_argument("--heldout-samples", type=int, default=2, help="windows per domain")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the per-plan measurements here")
    p.add_argument("--plot", default=None, help="write the scatter plots (PNG) here")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    out = Console()
    t0 = time.perf_counter()

    model, tok, model_dir, data_dir = load_testbed(args.model, args.data)
    order = removal_order_for(
        model, token_split(tok, data_dir / "calibration.jsonl", 4, 256, args.seed), args.criterion
    )
    heldout = api.search_set(
        token_split(tok, data_dir / "test.jsonl", args.heldout_samples, 256, args.seed + 1)
    )
    ev = CandidateEvaluator(model, heldout, cache="dense")
    items = read_jsonl(data_dir / "generation.jsonl")[: args.items]
    test_rows = read_jsonl(data_dir / "test.jsonl")
    text_prompts = [
        tok(r["text"])["input_ids"][:24] for r in test_rows[:: max(1, len(test_rows) // args.prompts)]
    ]
    arith_prompts = [tok(it["prompt"])["input_ids"] for it in items[: args.prompts // 2]]
    prompts = [x for x in text_prompts[: args.prompts - len(arith_prompts)] + arith_prompts if len(x) > 1]
    with torch.inference_mode():
        reference = generation_exact_match(model, tok, items, max_new_tokens=6, return_predictions=True)

    sparsities = [float(s) for s in args.sparsities.split(",")]
    per = -(-args.plans // len(sparsities))
    rows = []
    for sparsity in sparsities:
        space = AllocationSpace.from_layers(moe_layers(model), sparsity=sparsity)
        for counts in candidate_counts(space, per, args.seed):
            plan = plan_from_counts(space, order, counts)
            esap = ev.evaluate(plan).value
            acc = speculative_acceptance(model, plan, prompts, gamma=4, max_new_tokens=args.new_tokens)
            with mask_experts(model, plan), torch.inference_mode():
                gen = generation_exact_match(model, tok, items, max_new_tokens=6, return_predictions=True)
            agree = np.mean(
                [a == b for a, b in zip(gen["predictions"], reference["predictions"], strict=True)]
            )
            rows.append(
                {
                    "sparsity": sparsity,
                    "counts_removed": list(counts),
                    "esap": esap,
                    "acceptance": acc.rate,
                    "exact_match": gen["exact_match"],
                    "agreement_with_unpruned": float(agree),
                }
            )
            out.print(
                f"s={sparsity} {list(counts)} ESAP {esap:.4f} acceptance {acc.rate:.3f} "
                f"EM {gen['exact_match']:.3f} agree {agree:.3f}",
                highlight=False,
            )

    esap = [r["esap"] for r in rows]
    t = Table(
        title=f"ESAP as a proxy: {len(rows)} plans ({args.criterion} order, sparsities {args.sparsities})"
    )
    t.add_column("ESAP vs")
    t.add_column("Spearman rho", justify="right")
    t.add_column("p-value", justify="right")
    for key, label in [
        ("acceptance", "measured speculative acceptance (greedy, gamma 4)"),
        ("exact_match", "generation exact match (arithmetic)"),
        ("agreement_with_unpruned", "greedy answers equal to the unpruned model's"),
    ]:
        rho, pv = spearmanr(esap, [r[key] for r in rows])
        t.add_row(label, f"{rho:.3f}", f"{pv:.2g}")
        for sparsity in sparsities:
            sub = [r for r in rows if r["sparsity"] == sparsity]
            rho_s, _ = spearmanr([r["esap"] for r in sub], [r[key] for r in sub])
            t.add_row(f"  within sparsity {sparsity}", f"{rho_s:.3f}", "")
    out.print(t)
    out.print(f"unpruned exact match {reference['exact_match']:.3f}; {time.perf_counter() - t0:.0f}s")
    if args.plot:
        plot_rows(rows, sparsities, reference["exact_match"], args.plot)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "unpruned_exact_match": reference["exact_match"]}, f, indent=1)


if __name__ == "__main__":
    main()
