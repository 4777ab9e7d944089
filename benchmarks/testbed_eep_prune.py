"""EEP's prune phase on the testbed: which experts to keep, searched by ESAP, vs a criterion's choice.

Same counts for every plan (uniform sparsity); the criterion's plan seeds the EEP population
(together with random selections), so the search starts from it and can only improve the search-set
ESAP. Every plan is evaluated by exact masking: ESAP on held-out text (dense teacher), per-domain
perplexity, generation exact match and multiple-choice accuracy.

    python benchmarks/testbed_eep_prune.py [--criterion frequency] [--sparsity 0.5] \
        [--population 16] [--iterations 30] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from moeprune import api
from moeprune.criteria import choose_removed, uniform_counts
from moeprune.demo import comparison_table, evaluate_plans, heldout_esap, load_testbed, token_split


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--calib-samples", type=int, default=8, help="windows per domain")
    p.add_argument("--search-samples", type=int, default=2, help="windows per domain")
    p.add_argument("--heldout-samples", type=int, default=2, help="windows per domain")
    p.add_argument("--eval-tokens", type=int, default=2000, help="perplexity tokens per domain")
    p.add_argument("--eval-items", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Console(width=120)

    model, tok, _, data_dir = load_testbed(args.model, args.data)
    calib = token_split(tok, data_dir / "calibration.jsonl", args.calib_samples, 256, args.seed)
    stats = api.observe(model, calib, criteria=[args.criterion], progress=False)
    criterion_plan = choose_removed(stats, args.criterion, uniform_counts(stats, args.sparsity), args.seed)
    search = api.search_set(token_split(tok, data_dir / "search.jsonl", args.search_samples, 256, args.seed))
    t0 = time.perf_counter()
    result = api.eep_prune(
        model, search, sparsity=args.sparsity, population=args.population, iterations=args.iterations,
        seed=args.seed, seeds=(criterion_plan,),
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    plans = {
        "unpruned": None,
        args.criterion: criterion_plan,
        f"EEP prune ({args.criterion} seed)": result.best,
    }
    heldout = api.search_set(
        token_split(tok, data_dir / "test.jsonl", args.heldout_samples, 256, args.seed + 1)
    )
    esap = heldout_esap(model, heldout, plans)
    results = evaluate_plans(
        model,
        tok,
        plans,
        suite_dir=data_dir,
        max_tokens_per_domain=args.eval_tokens,
        max_items=args.eval_items,
    )
    title = f"{args.criterion} vs EEP prune phase at {args.sparsity:.0%} sparsity (uniform counts, testbed)"
    out.print(comparison_table(results, esap, title))
    first = result.history[0]["best"]
    out.print(
        f"search ESAP: best of the initial population {first:.5f} -> {result.best_score:.5f}; "
        f"{result.evaluations} candidates, {seconds:.0f}s"
    )
    changed = {
        i: len(set(result.best.removed[i]) - set(criterion_plan.removed[i])) for i in result.best.removed
    }
    out.print(f"experts swapped relative to {args.criterion}, per layer: {changed}")
    if args.json:
        report = {
            "settings": vars(args),
            "search": {
                "evaluations": result.evaluations,
                "seconds": round(seconds, 1),
                "history": result.history,
            },
            "plans": {k: (v.to_dict() if v is not None else None) for k, v in plans.items()},
            "heldout_esap": esap,
            "evaluation": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
