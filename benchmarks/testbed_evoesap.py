"""Uniform vs EvoESAP on the testbed: which search data and budget make EvoESAP pay off on generation.

For every sparsity x criterion: one within-layer order (frequency / reap, from one calibration pass),
the uniform plan, and EvoESAP searches under three configurations, each with several search seeds:

    text      the search split's text windows (2 per domain x 256 tokens), every token scored, exact
              scoring (racing off), population P x G generations        -- the earlier default
    onpolicy  on-policy data: the unpruned model answers the search split's arithmetic questions
              (search_prompts.jsonl, one line, at most 8 tokens), only its answers scored; exact, P x G
    racing    the same on-policy data, racing on (the default: z = 1), a larger budget P2 x G2 chosen
              to cost about the wall time of `text`                       -- the default configuration

Every configuration's search rows are in the seed's random order, as the pipeline builds them.

Every plan is evaluated by exact masking: ESAP on held-out text (dense teacher), per-domain perplexity,
generation exact match, multiple-choice accuracy, and greedy agreement with the unpruned model (share
of generation items whose answer equals the unpruned model's). Prints one table per sparsity x criterion
and a summary (mean and worst exact-match gain over uniform per configuration) and writes JSON.

    python benchmarks/testbed_evoesap.py --sparsities 0.25,0.5 --criteria frequency,reap --seeds 0,1,2 \
        --json benchmarks/results/evoesap_testbed.json | tee benchmarks/results/evoesap_testbed.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from moeprune import api
from moeprune.allocate import EvoConfig
from moeprune.criteria import removal_order
from moeprune.data import continue_prompts, read_rows
from moeprune.evaluate.generation import generation_exact_match
from moeprune.evaluate.multiple_choice import multiple_choice_accuracy
from moeprune.evaluate.perplexity import perplexity_by_domain
from moeprune.evaluate.suite import read_jsonl
from moeprune.fitness import CandidateEvaluator, SearchSet, run_teacher
from moeprune.pipelines.evoesap import search_allocation
from moeprune.surgery import mask_experts
from moeprune.testbed import load_testbed, token_split


def evaluate(model, tok, plan, suite: dict, heldout: CandidateEvaluator, reference: list[str] | None) -> dict:
    """The suite on `model` masked by `plan` (None: unpruned), plus held-out ESAP and agreement."""
    esap = heldout.evaluate(plan or {}).value  # masks the model itself
    with mask_experts(model, plan or {}):
        gen = generation_exact_match(
            model, tok, suite["generation"], max_new_tokens=6, return_predictions=True
        )
        out = {
            "heldout_esap": esap,
            "ppl": {
                d: r["ppl"]
                for d, r in perplexity_by_domain(model, tok, suite["text"], suite["tokens"]).items()
            },
            "em": gen["exact_match"],
            "mc": multiple_choice_accuracy(model, tok, suite["mc"])["accuracy"],
            "predictions": gen["predictions"],
        }
    ref = reference if reference is not None else out["predictions"]
    out["agree"] = sum(a == b for a, b in zip(out["predictions"], ref, strict=True)) / len(ref)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sparsities", default="0.25,0.5")
    p.add_argument("--criteria", default="frequency,reap")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--configs", default="text,onpolicy,racing")
    p.add_argument("--population", type=int, default=16, help="P (text, onpolicy)")
    p.add_argument("--generations", type=int, default=10, help="G (text, onpolicy)")
    p.add_argument("--racing-population", type=int, default=20, help="P2 (racing)")
    p.add_argument("--racing-generations", type=int, default=12, help="G2 (racing)")
    p.add_argument("--prompts", type=int, default=256, help="on-policy questions")
    p.add_argument("--calib-samples", type=int, default=8, help="calibration windows per domain")
    p.add_argument("--heldout-samples", type=int, default=2, help="held-out windows per domain")
    p.add_argument("--eval-tokens", type=int, default=2000, help="perplexity tokens per domain")
    p.add_argument("--eval-items", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    criteria, configs = args.criteria.split(","), args.configs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    load0 = os.getloadavg()

    model, tok, _, data_dir = load_testbed()
    calib = token_split(tok, data_dir / "calibration.jsonl", args.calib_samples, 256, 0)
    stats = api.observe(model, calib, criteria=criteria, seed=0, progress=False)
    heldout = CandidateEvaluator(
        model, api.search_set(token_split(tok, data_dir / "test.jsonl", args.heldout_samples, 256, 1)),
        cache="dense", reuse=False,
    )  # fmt: skip
    suite = {
        "text": read_jsonl(data_dir / "test.jsonl"),
        "tokens": args.eval_tokens,
        "generation": read_jsonl(data_dir / "generation.jsonl")[: args.eval_items],
        "mc": read_jsonl(data_dir / "multiple_choice.jsonl")[: args.eval_items],
    }
    prompts = read_rows(data_dir / "search_prompts.jsonl")

    def search_data(config: str, seed: int) -> SearchSet:
        if config == "text":
            data = token_split(tok, data_dir / "search.jsonl", 2, 256, seed)
        else:
            data = continue_prompts(
                model, tok, prompts, gen_tokens=8, num_samples=args.prompts, seed=seed, stop="\n"
            )
        # as the pipeline builds it: rows in the seed's random order, racing's 4 slices
        return SearchSet.from_tokens(data, min_batches=4, shuffle_seed=seed)

    unpruned = evaluate(model, tok, None, suite, heldout, None)
    reference = unpruned["predictions"]
    report: dict = {"settings": vars(args), "unpruned": unpruned, "runs": []}
    print(
        f"testbed; unpruned: EM {unpruned['em']:.1%}, MC {unpruned['mc']:.1%}; {os.cpu_count()} cores, "
        f"{args.threads} thread(s); load average before {load0[0]:.1f} {load0[1]:.1f}",
        flush=True,
    )
    budgets = {
        "text": (args.population, args.generations, False),
        "onpolicy": (args.population, args.generations, False),
        "racing": (args.racing_population, args.racing_generations, True),
    }
    for sparsity in sparsities:
        for criterion in criteria:
            order = removal_order(stats, criterion, 0)
            rows = []
            for config in configs:
                population, generations, racing = budgets[config]
                for seed in seeds:
                    t0 = time.perf_counter()
                    teacher = run_teacher(model, search_data(config, seed), cache="hidden")
                    out = search_allocation(
                        model, order, teacher, sparsity=sparsity, progress=False, racing=racing,
                        config=EvoConfig(population=population, generations=generations, seed=seed),
                    )  # fmt: skip
                    wall = time.perf_counter() - t0
                    if not rows:  # the uniform plan: the same for every configuration and seed
                        uni = evaluate(model, tok, out.uniform_plan, suite, heldout, reference)
                        rows.append({"config": "uniform", "seed": None, **uni})
                    res = evaluate(model, tok, out.plan, suite, heldout, reference)
                    tokens = sum(out.result.tokens.values()) if getattr(out.result, "tokens", None) else None
                    per = teacher.search.num_scored()
                    rows.append({
                        "config": config, "seed": seed, **res, "candidates": out.result.evaluations,
                        "tokens": tokens if tokens is not None else per * out.result.evaluations,
                        "search_tokens": per, "wall": wall, "removed": list(out.best),
                        "racing": out.racing if hasattr(out, "racing") else None,
                    })  # fmt: skip
                    r = rows[-1]
                    print(
                        f"  {sparsity:.2f} {criterion} {config} seed {seed}: EM {r['em']:.1%} (uniform "
                        f"{rows[0]['em']:.1%}), MC {r['mc']:.1%} ({rows[0]['mc']:.1%}), {r['candidates']} "
                        f"candidates, {wall:.0f} s, removed {r['removed']}",
                        flush=True,
                    )
            report["runs"].append({"sparsity": sparsity, "criterion": criterion, "rows": rows})
            print(table(sparsity, criterion, rows, unpruned), flush=True)
    print(summary(report["runs"], configs))
    load1 = os.getloadavg()
    print(f"load average after: {load1[0]:.1f} {load1[1]:.1f}")
    if args.json:
        for run in report["runs"]:
            for r in run["rows"]:
                r.pop("predictions", None)
        unpruned.pop("predictions", None)
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


def table(sparsity: float, criterion: str, rows: list[dict], unpruned: dict) -> str:
    domains = list(unpruned["ppl"])
    head = (
        f"\n### {criterion}, sparsity {sparsity}\n\n| plan | seed | ESAP held-out | "
        + " | ".join(f"ppl {d}" for d in domains)
        + " | EM | MC | agree | candidates | tokens scored | wall s |\n|"
        + "---|" * (len(domains) + 9)
    )
    lines = [head]
    for name, r in [("unpruned", unpruned | {"config": "unpruned", "seed": None})] + [
        (r["config"], r) for r in rows
    ]:
        ppl = " | ".join(f"{r['ppl'][d]:.2f}" for d in domains)
        cost = f"{r['candidates']} | {r['tokens']:,} | {r['wall']:.0f}" if "candidates" in r else "- | - | -"
        seed = "-" if r.get("seed") is None else r["seed"]
        lines.append(
            f"| {name} | {seed} | {r['heldout_esap']:.4f} | {ppl} | {r['em']:.1%} | {r['mc']:.1%} | "
            f"{r['agree']:.1%} | {cost} |"
        )
    return "\n".join(lines)


def summary(runs: list[dict], configs: list[str]) -> str:
    lines = [
        "\n### Summary: EvoESAP minus uniform (points), mean over seeds [worst seed]\n",
        "| sparsity | criterion | config | EM gain | MC gain | agree gain | candidates | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        uni = run["rows"][0]
        for config in configs:
            rs = [r for r in run["rows"] if r["config"] == config]
            if not rs:
                continue
            em = [100 * (r["em"] - uni["em"]) for r in rs]
            mc = [100 * (r["mc"] - uni["mc"]) for r in rs]
            ag = [100 * (r["agree"] - uni["agree"]) for r in rs]
            lines.append(
                f"| {run['sparsity']} | {run['criterion']} | {config} | {statistics.mean(em):+.1f} [{min(em):+.1f}] | "
                f"{statistics.mean(mc):+.1f} [{min(mc):+.1f}] | {statistics.mean(ag):+.1f} | "
                f"{statistics.mean(r['candidates'] for r in rs):.0f} | {statistics.mean(r['wall'] for r in rs):.0f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
