"""EEP on the testbed: a criterion's choice vs EEP's prune phase vs prune + merge phases.

Same counts for every plan (uniform sparsity). The criterion's plan seeds the EEP prune population
(with random selections), so the search starts from it and can only improve the search-set ESAP;
the merge phase starts from the prune phase's selection (one-hot M) and folds every expert into the
kept ones. Pruned plans are evaluated by exact masking, the merged model structurally (merged, then
non-anchors removed): ESAP on held-out text (dense teacher), per-domain perplexity, generation exact
match and multiple-choice accuracy.

    python benchmarks/testbed_eep_prune.py [--criterion frequency] [--sparsity 0.5] \
        [--population 16] [--iterations 30] [--merge-iterations 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from rich.console import Console

from moeprune import api
from moeprune.criteria import choose_removed, uniform_counts
from moeprune.demo import comparison_table, evaluate_plans, heldout_esap, load_testbed, token_split
from moeprune.evaluate import evaluate_suite
from moeprune.fitness import CandidateEvaluator
from moeprune.merge.merging import merge_experts_


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--iterations", type=int, default=30)
    p.add_argument("--merge-population", type=int, default=8)
    p.add_argument("--merge-iterations", type=int, default=40)
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
    t1 = time.perf_counter()
    merged_result = api.eep_merge(
        model, search, result.best, population=args.merge_population, iterations=args.merge_iterations,
        seed=args.seed,
    )  # fmt: skip
    merge_seconds = time.perf_counter() - t1
    plans = {
        "unpruned": None,
        args.criterion: criterion_plan,
        f"EEP prune ({args.criterion} seed)": result.best,
    }
    heldout = api.search_set(
        token_split(tok, data_dir / "test.jsonl", args.heldout_samples, 256, args.seed + 1)
    )
    esap = heldout_esap(model, heldout, plans)
    suite = dict(suite_dir=data_dir, max_tokens_per_domain=args.eval_tokens, max_items=args.eval_items)
    results = evaluate_plans(model, tok, plans, **suite)
    merged = copy.deepcopy(model)
    merge_experts_(merged, merged_result.best)
    teacher = CandidateEvaluator(model, heldout, cache="dense", reuse=False)
    with torch.inference_mode():
        logits = [
            merged(input_ids=b.input_ids, attention_mask=b.attention_mask).logits for b in heldout.batches
        ]
    esap["EEP prune + merge"] = teacher.score_logits(logits).value
    results["EEP prune + merge"] = evaluate_suite(merged, tok, **suite)
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
    out.print(
        f"merge phase: search ESAP {merged_result.start_score:.5f} (pruned) -> {merged_result.best_score:.5f}; "
        f"{merged_result.evaluations} candidates, {merge_seconds:.0f}s"
    )
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
