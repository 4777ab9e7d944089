"""Within-layer criteria on the testbed at 50% sparsity (uniform: the same count in every MoE layer).

One calibration pass (moeprune.observe on the testbed's calibration split, with the dense subsample
for MoP), then for each criterion the plan at 50% sparsity is applied with exact masking
(`mask_experts`, equal to the structurally pruned model) and the testbed evaluation suite runs:
per-domain perplexity, generation exact match, multiple-choice accuracy. `random` is run with
``--random-seeds`` seeds (3). Writes benchmarks/results/criteria_table.md and .json.

    python benchmarks/criteria_table.py [--sparsity 0.5] [--samples-per-domain 16] [--max-tokens-per-domain 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune import api
from moeprune.criteria import choose_removed
from moeprune.data import load_data
from moeprune.evaluate import evaluate_suite
from moeprune.plan import uniform_counts
from moeprune.surgery import mask_experts

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "src" / "moeprune" / "assets" / "testbed"
CRITERIA = ["random", "frequency", "soft_frequency", "ean", "reap", "naee", "mop"]


def row(name: str, res: dict, domains: list[str]) -> dict:
    ppl = {d: res["perplexity"][d]["ppl"] for d in domains}
    return {
        "criterion": name,
        "ppl": ppl,
        "worst_ppl": max(ppl.values()),
        "gen_em": res["generation"]["exact_match"],
        "mc_acc": res["multiple_choice"]["accuracy"],
    }


def markdown(rows: list[dict], domains: list[str], header: str) -> str:
    cols = ["criterion", *[f"ppl {d}" for d in domains], "worst ppl", "gen EM", "MC acc"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["criterion"], *[f"{r['ppl'][d]:.2f}" for d in domains], f"{r['worst_ppl']:.2f}"]
        cells += [f"{100 * r['gen_em']:.1f}%", f"{100 * r['mc_acc']:.1f}%"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ASSETS / "model"))
    p.add_argument("--data", default=str(ASSETS / "data" / "calibration.jsonl"))
    p.add_argument("--suite", default=str(ASSETS / "data"))
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--samples-per-domain", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dense-tokens", type=int, default=4096)
    p.add_argument("--max-tokens-per-domain", type=int, default=10_000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--only", default=None, help="comma-separated criteria to run (no baseline, no random)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "criteria_table"))
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    data = load_data(
        args.data, tok, seq_len=args.seq_len, num_samples=args.samples_per_domain, per_domain=True
    )
    t = time.perf_counter()
    stats = api.observe(model, data, dense_tokens=args.dense_tokens, progress=True)
    observe_s = time.perf_counter() - t
    counts = uniform_counts(stats, args.sparsity)

    def evaluate() -> dict:
        return evaluate_suite(model, tok, args.suite, max_tokens_per_domain=args.max_tokens_per_domain)

    runs = [("none (unpruned)", None)]
    runs += [(f"random (seed {s})", ("random", s)) for s in range(args.random_seeds)]
    runs += [(c, (c, 0)) for c in CRITERIA if c != "random"]
    if args.only:
        runs = [(c, (c, 0)) for c in args.only.split(",")]
    rows, plans = [], {}
    for name, spec in runs:
        t = time.perf_counter()
        if spec is None:
            res = evaluate()
        else:
            plan = choose_removed(stats, spec[0], counts, seed=spec[1])
            plans[name] = plan.to_dict()["removed"]
            with mask_experts(model, plan):
                res = evaluate()
        domains = sorted(res["perplexity"])
        rows.append(row(name, res, domains))
        print(
            f"{name:<20} {json.dumps(rows[-1])}  ({time.perf_counter() - t:.0f}s: {res['seconds']})",
            flush=True,
        )

    n = next(iter(counts.values()))
    e = next(iter(stats.layers.values())).num_experts
    header = (
        f"Testbed ({len(stats.layers)} MoE layers x {e} experts, top-{next(iter(stats.layers.values())).top_k}), {n} of {e} "
        f"experts removed in every MoE layer ({args.sparsity:.0%}); calibration: {data.num_tokens} tokens "
        f"({args.samples_per_domain} x {args.seq_len}-token samples per domain) of the calibration split, one "
        f"observer pass ({observe_s:.0f}s); perplexity on <= {args.max_tokens_per_domain} held-out tokens per "
        f"domain; generation = greedy exact match; MC = log-likelihood multiple choice."
    )
    text = markdown(rows, domains, header)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(
        json.dumps({"args": vars(args), "rows": rows, "plans": plans, "meta": stats.meta}, indent=1) + "\n"
    )
    print(text)


if __name__ == "__main__":
    main()
