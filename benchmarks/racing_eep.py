"""Racing vs the exact search for EEP on the testbed: the selection search (`pipelines.eep.select_experts`,
seeded with the criterion's plan as a run seeds it) and, optionally, the merge search
(`pipelines.eep.merge_into_anchors`, from the exact selection of the seed), for several search seeds
and z values, through the local executor and one teacher run per kind of search data.

The search sets are built as a run builds them (`RunContext._search_set`: at least `--slices`
batches, rows in the data seed's random order, ``shuffle_seed=0``): the demo's on-policy data
(``onpolicy``: the unpruned model answers the search split's 256 arithmetic prompts, 8 tokens, as
benchmarks/racing.py --onpolicy) and text windows of the search split (``text``).

As in benchmarks/racing.py every search is deterministic and a slice's result for a candidate is
remembered (its `Memo`), so each raced search is what a cold run gives. For each kind of data:

1. the exact search of every seed, cold and timed, scored through the slices with z = inf (bit for
   bit the exact search), which fills the memo;
2. the raced searches for every z (largest first) on the memo: token evaluations saved,
   1 - tokens scored / (candidates x tokens per candidate), and against the exact searches' tokens;
   in how many seeds the final selection (merge) differs from the exact one; the best score's change.

    python benchmarks/racing_eep.py --seeds 10 --z 0.5,1,1.5,2,3 --out benchmarks/results/racing_eep.txt
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import time

import torch
from racing import Memo, Report, load  # benchmarks/racing.py (this script's folder is on sys.path)

from moeprune.criteria import choose_removed, observe_for
from moeprune.data import continue_prompts, read_rows
from moeprune.execute import LocalExecutor
from moeprune.fitness import SearchSet, run_teacher
from moeprune.pipelines.eep import merge_into_anchors, select_experts
from moeprune.plan import uniform_counts
from moeprune.testbed import load_testbed, token_split


class MergeMemo(Memo):
    """`Memo` for merge candidates (``{layer: LayerMerge}``): keyed by anchors and M's bytes."""

    def key(self, candidate) -> tuple:
        return tuple((i, m.anchors, m.weights.numpy().tobytes()) for i, m in sorted(candidate.items()))


def merge_key(best) -> tuple:
    return MergeMemo.key(None, best)


def sweep(say, name: str, run, make_memo, seeds: list[int], zs: list[float], full: int, final) -> list[tuple]:
    """Phases 1 and 2 (module docstring) of one search kind. `run(seed, executor, z)` -> the search's
    result (best_score, tokens, raced_out, evaluations); `final(result)` -> what must not change."""
    say(f"\n{name}, phase 1: exact searches (z = inf through the slices), cold")
    memo, exact = make_memo(), {}
    for seed in seeds:
        cold = make_memo()
        t0, c0 = time.perf_counter(), time.process_time()
        exact[seed] = o = run(seed, cold, math.inf)
        memo.seen.update(cold.seen)
        say(
            f"seed {seed}: best {o.best_score:.5f}, {o.evaluations} candidates, "
            f"{time.perf_counter() - t0:.1f}s (CPU {time.process_time() - c0:.1f}s)"
        )
    exact_tokens = sum(sum(o.tokens.values()) for o in exact.values())
    say(f"\n{name}, phase 2: raced searches, every z (slice results remembered)")
    rows = []
    for z in zs:
        changed, scored, possible, deltas, dropped, candidates = 0, 0, 0, [], 0, 0
        c0 = time.process_time()
        for seed in seeds:
            o, e = run(seed, memo, z), exact[seed]
            differs = final(o) != final(e)
            changed += differs
            scored += sum(o.tokens.values())
            possible += full * len(o.tokens)
            candidates += len(o.tokens)
            dropped += len(o.raced_out)
            deltas.append(o.best_score - e.best_score)
            if differs:
                say(f"z {z:g} seed {seed}: a different best, score {deltas[-1]:+.5f}")
        rows.append(
            (z, 1 - scored / possible, 1 - scored / exact_tokens, changed, deltas, dropped, candidates)
        )
        say(
            f"z {z:g}: saved {rows[-1][1]:.1%}, best changed in {changed} of {len(seeds)} seeds "
            f"(CPU {time.process_time() - c0:.1f}s)"
        )
    say(f"\n{name}: exact searches {exact_tokens} token evaluations")
    say("| z | token evaluations saved (per candidate) | vs the exact searches' | raced out | "
        "best changed (of seeds) | best score change: mean, worst |")  # fmt: skip
    say("|---|---|---|---|---|---|")
    for z, saved, vs_exact, changed, deltas, dropped, candidates in rows:
        say(
            f"| {z:g} | {saved:.1%} | {vs_exact:.1%} | {dropped}/{candidates} | {changed} of {len(seeds)} | "
            f"{statistics.mean(deltas):+.5f}, {min(deltas):+.5f} |"
        )
    keep = [r for r in rows if r[3] * 10 <= len(seeds)]
    if keep:
        say(
            f"{name}: largest saving with the best unchanged in >= 90% of the seeds: z = {max(keep, key=lambda r: r[1])[0]:g}"
        )
    else:
        say(f"{name}: no z keeps the best in >= 90% of the seeds")
    return exact


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--kinds", default="onpolicy,text", help="search data: onpolicy, text (comma-separated)")
    p.add_argument(
        "--random-start", action="store_true",
        help="no seed plan: the selection search starts from random selections only",
    )  # fmt: skip
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--iterations", type=int, default=12)
    p.add_argument("--search-samples", type=int, default=6, help="text windows per domain (5 domains)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--z", default="0.5,1,1.5,2,3", help="comma-separated z values to race with")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--first-seed", type=int, default=0, help="search seeds first-seed..first-seed+seeds-1")
    p.add_argument("--merge-seeds", type=int, default=0, help="also the merge search for seeds 0..N-1")
    p.add_argument("--merge-population", type=int, default=8)
    p.add_argument("--merge-iterations", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the report here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    zs = sorted((float(z) for z in args.z.split(",")), reverse=True)
    report = Report(argv)
    say = report.say
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    say(f"commit {commit or '?'}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}")
    say(f"load average (1/5/15 min) at start: {load()}; torch threads {args.threads}, {os.cpu_count()} CPUs")
    cpu0 = time.process_time()
    model, tok, model_dir, data_dir = load_testbed(args.model, args.data)
    calib = token_split(tok, data_dir / "calibration.jsonl", 8, 256, 0)
    stats = observe_for(model, calib, [args.criterion], seed=0, progress=False)
    seed_plan = choose_removed(stats, args.criterion, uniform_counts(stats, args.sparsity), 0)
    starts = () if args.random_start else (seed_plan,)
    start = "random selections only start" if args.random_start else f"{args.criterion} plan seeds"
    say(
        f"testbed {model_dir.name}: {start} the selection search, sparsity {args.sparsity}; "
        f"selection population {args.population} x {args.iterations} iterations, search seeds "
        f"{args.first_seed}..{args.first_seed + args.seeds - 1}; merge population {args.merge_population} x {args.merge_iterations} iterations, "
        f"seeds 0..{args.merge_seeds - 1}; {args.slices} slices"
    )
    for kind in args.kinds.split(","):
        if kind == "onpolicy":
            prompts = read_rows(data_dir / "search_prompts.jsonl")
            tokens = continue_prompts(model, tok, prompts, gen_tokens=8, num_samples=256, seed=0, stop="\n")
        elif kind == "text":
            tokens = token_split(tok, data_dir / "search.jsonl", args.search_samples, args.seq_len, 0)
        else:
            raise SystemExit(f"unknown kind {kind!r}: onpolicy or text")
        search = SearchSet.from_tokens(tokens, min_batches=args.slices, shuffle_seed=0)  # as a run does
        teacher = run_teacher(model, search, cache="hidden")
        full = search.num_scored()
        say(
            f"\n## {kind}: {len(search.batches)} batches of "
            f"{'/'.join(str(b.input_ids.shape[0]) for b in search.batches)} rows x "
            f"{search.batches[0].input_ids.shape[1]} tokens, rows shuffled (seed 0), {full} scored tokens"
        )

        def select(seed, executor, z, teacher=teacher):
            return select_experts(
                model, teacher, sparsity=args.sparsity, population=args.population, iterations=args.iterations,
                seed=seed, seeds=starts, progress=False, executor=executor, racing=True, racing_z=z,
                racing_slices=args.slices,
            )  # fmt: skip

        exact = sweep(
            say, f"{kind} selection", select, lambda teacher=teacher: Memo(LocalExecutor(model, teacher)),
            list(range(args.first_seed, args.first_seed + args.seeds)), zs, full, lambda o: o.best_selection,
        )  # fmt: skip
        if args.merge_seeds > 0:

            def merge(seed, executor, z, teacher=teacher, exact=exact):
                return merge_into_anchors(
                    model, teacher, exact[seed].best, population=args.merge_population,
                    iterations=args.merge_iterations, seed=seed, progress=False, executor=executor,
                    racing=True, racing_z=z, racing_slices=args.slices,
                )  # fmt: skip

            sweep(
                say, f"{kind} merge", merge, lambda teacher=teacher: MergeMemo(LocalExecutor(model, teacher)),
                list(range(args.merge_seeds)), zs, full, lambda o: merge_key(o.best),
            )  # fmt: skip
    say(f"\nload average at the end: {load()}; CPU time of this process {time.process_time() - cpu0:.0f}s")
    report.write(args.out)


if __name__ == "__main__":
    main()
