"""Racing vs the exact search: EvoESAP on the testbed for several search seeds and z values, through
the pipeline's search (`pipelines.evoesap.search_allocation`, local executor, one teacher run).

Every search is deterministic, so the sweep is cheap: a slice's result for a plan is computed once
and then remembered (`Memo`), which leaves every raced search's decisions, plan, history and token
counts exactly what a cold run gives (tests/test_racing.py: slice results are bitwise reproducible).
Three phases:

1. the exact search of every seed, cold and timed, scored through the slices with z = inf (bit for
   bit the exact search: same candidates, scores and tokens) so that its slice results fill the memo;
   seed 0 also runs the plain exact path (``racing=False``) to show the slices cost nothing extra;
2. the raced searches for every z (largest first) on the memo: token evaluations saved,
   1 - tokens scored / (candidates x tokens per candidate), and against the exact searches' tokens;
   in how many seeds the final plan differs from the exact one; the best ESAP's change;
3. at the chosen z (the smallest z whose plan is unchanged in >= 90% of the seeds), the exact search
   (racing off) and the raced one of every seed, cold and timed, in alternating order: wall time.

    python benchmarks/racing.py --seeds 10 --z 0.5,1,1.5,2,3 --out benchmarks/results/racing.txt
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from moeprune.allocate import EvoConfig
from moeprune.data import continue_prompts, read_rows
from moeprune.execute import Executor, LocalExecutor
from moeprune.fitness import SearchSet, run_teacher
from moeprune.pipelines.evoesap import search_allocation
from moeprune.testbed import load_testbed, removal_order_for, token_split


class Report:
    """The lines a benchmark prints, kept for its --out file; the first is the command that ran."""

    def __init__(self, argv: list[str] | None) -> None:
        self.lines: list[str] = []
        self.say(f"$ python {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}")

    def say(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def write(self, path: str | None) -> None:
        if path:
            Path(path).write_text("\n".join(self.lines) + "\n")


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


class Memo(Executor):
    """An executor that scores a (spec, plan) once and remembers the result; counts what it scored."""

    kind = "memo"

    def __init__(self, inner: Executor) -> None:
        self.inner, self.seen, self.scored_tokens = inner, {}, 0

    def key(self, candidate) -> str:
        """What identifies a candidate (an `ExpertPlan`) in the memo."""
        return json.dumps(candidate.to_dict(), sort_keys=True)

    def score(self, spec, candidates):
        keys = [(spec, self.key(c)) for c in candidates]
        todo = {k: c for k, c in zip(keys, candidates, strict=True) if k not in self.seen}
        for k, r in zip(todo, self.inner.score(spec, list(todo.values())), strict=True):
            self.seen[k] = r
            self.scored_tokens += r.tokens
        return [self.seen[k] for k in keys]

    def reuse(self, spec) -> dict:
        return self.inner.reuse(spec)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--population", type=int, default=12)
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--search-samples", type=int, default=6, help="windows per domain (5 domains)")
    p.add_argument("--seq-len", type=int, default=48)
    p.add_argument(
        "--mix", action="store_true", help="shuffle the search rows (domains mixed in batches), as a run does"
    )
    p.add_argument(
        "--onpolicy", action="store_true",
        help="search on the demo's on-policy data instead (the unpruned model answers the search split's 256 "
        "arithmetic prompts, 8 tokens, answers scored), as benchmarks/search.py does",
    )  # fmt: skip
    p.add_argument("--slices", type=int, default=4)
    p.add_argument("--z", default="0.5,1,1.5,2,3", help="comma-separated z values to race with")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="also write the report here")
    p.add_argument("--no-timing", action="store_true", help="skip phase 3 (the timed exact/raced pairs)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    zs = sorted((float(z) for z in args.z.split(",")), reverse=True)
    report = Report(argv)
    say = report.say
    say(f"load average (1/5/15 min) at start: {load()}; torch threads {args.threads}, {os.cpu_count()} CPUs")
    cpu0 = time.process_time()
    model, tok, model_dir, data_dir = load_testbed(args.model, args.data)
    calib = token_split(tok, data_dir / "calibration.jsonl", 8, 256, 0)
    order = removal_order_for(model, calib, args.criterion, 0)
    if args.onpolicy:
        prompts = read_rows(data_dir / "search_prompts.jsonl")
        tokens = continue_prompts(model, tok, prompts, gen_tokens=8, num_samples=256, seed=0, stop="\n")
    else:
        tokens = token_split(tok, data_dir / "search.jsonl", args.search_samples, args.seq_len, 0)
    # as a run builds it (`RunContext._search_set`): with --mix the rows in a seeded random order
    # (every batch holds several domains / prompt kinds), else as loaded
    search = SearchSet.from_tokens(tokens, min_batches=args.slices, shuffle_seed=0 if args.mix else None)
    teacher = run_teacher(model, search, cache="hidden")  # the default cache (exact)
    full = search.num_scored()
    say(
        f"testbed {model_dir.name}: {args.criterion} order, sparsity {args.sparsity}, population "
        f"{args.population} x {args.generations} generations, search set {len(search.batches)} batches of "
        f"{'/'.join(str(b.input_ids.shape[0]) for b in search.batches)} "
        + (
            f"on-policy answers x {search.batches[0].input_ids.shape[1]} tokens ({'shuffled; ' if args.mix else ''}"
            if args.onpolicy
            else f"windows x {args.seq_len} tokens ({'shuffled' if args.mix else 'grouped by domain, as loaded'}; "
        )
        + f"{full} scored tokens), {args.slices} slices, search seeds 0..{args.seeds - 1}"
    )

    def run(seed: int, executor: Executor, racing: bool, z: float = math.inf):
        config = EvoConfig(population=args.population, generations=args.generations, seed=seed)
        t0, c0 = time.perf_counter(), time.process_time()
        out = search_allocation(
            model, order, teacher, sparsity=args.sparsity, config=config, progress=False, executor=executor,
            racing=racing, racing_z=z, racing_slices=args.slices,
        )  # fmt: skip
        return out, (time.perf_counter() - t0, time.process_time() - c0)

    say("\nphase 1: exact searches (z = inf through the slices), cold")
    memo = Memo(LocalExecutor(model, teacher))
    exact, exact_wall = {}, {}
    for seed in range(args.seeds):
        cold = Memo(LocalExecutor(model, teacher))
        exact[seed], exact_wall[seed] = run(seed, cold, racing=True)
        memo.seen.update(cold.seen)
        o = exact[seed]
        say(
            f"seed {seed}: best {o.best_fitness['value']:.5f} {list(o.best)}, {o.result.evaluations} "
            f"candidates, {exact_wall[seed][0]:.1f}s (CPU {exact_wall[seed][1]:.1f}s)"
        )
        if seed == 0:
            plain, wall = run(seed, LocalExecutor(model, teacher), racing=False)
            same = plain.best == o.best and plain.result.history == o.result.history
            say(
                f"seed 0, plain exact path (racing off): {'the same search' if same else 'DIFFERENT'}, "
                f"{wall[0]:.1f}s (CPU {wall[1]:.1f}s)"
            )
    exact_tokens = sum(sum(o.result.tokens.values()) for o in exact.values())

    say("\nphase 2: raced searches, every z (slice results remembered)")
    rows = []
    for z in zs:
        changed, scored, possible, deltas, dropped, candidates = 0, 0, 0, [], 0, 0
        for seed in range(args.seeds):
            o, _ = run(seed, memo, racing=True, z=z)
            e = exact[seed]
            changed += o.best != e.best
            scored += sum(o.result.tokens.values())
            possible += full * len(o.result.tokens)
            candidates += len(o.result.tokens)
            dropped += len(o.result.raced_out)
            deltas.append(o.best_fitness["value"] - e.best_fitness["value"])
            if o.best != e.best:
                say(
                    f"z {z:g} seed {seed}: plan {list(o.best)} instead of {list(e.best)}, best ESAP {deltas[-1]:+.5f}"
                )
        rows.append(
            (z, 1 - scored / possible, 1 - scored / exact_tokens, changed, deltas, dropped, candidates)
        )
        say(f"z {z:g}: saved {rows[-1][1]:.1%}, plan changed in {changed} of {args.seeds} seeds")

    say()
    say(f"exact searches: {exact_tokens} token evaluations")
    say("| z | token evaluations saved (per candidate) | vs the exact searches' | raced out | "
        "plan changed (of seeds) | best ESAP change: mean, worst |")  # fmt: skip
    say("|---|---|---|---|---|---|")
    for z, saved, vs_exact, changed, deltas, dropped, candidates in rows:
        say(
            f"| {z:g} | {saved:.1%} | {vs_exact:.1%} | {dropped}/{candidates} | {changed} of {args.seeds} | "
            f"{statistics.mean(deltas):+.5f}, {min(deltas):+.5f} |"
        )
    keep = [r for r in rows if r[3] * 10 <= args.seeds]
    if keep:
        chosen = max(keep, key=lambda r: r[1])[0]
        say(f"largest saving with the plan unchanged in >= 90% of the seeds: z = {chosen:g}")
    if keep and not args.no_timing:
        say(
            f"\nphase 3: at z = {chosen:g}, the exact (racing off) and the raced search of each seed, cold, alternating"
        )
        walls = {"exact": np.zeros(2), "raced": np.zeros(2)}
        for seed in range(args.seeds):
            kinds = ["exact", "raced"] if seed % 2 == 0 else ["raced", "exact"]
            for kind in kinds:
                o, wall = run(seed, LocalExecutor(model, teacher), racing=kind == "raced", z=chosen)
                walls[kind] += wall
                what = (
                    f"{o.racing['raced_out']} raced out, saved {o.racing['saved']:.1%}"
                    if o.racing
                    else "exact"
                )
                say(f"seed {seed}: {what}, {wall[0]:.1f}s (CPU {wall[1]:.1f}s)")
        (rw, rc), (ew, ec) = walls["raced"], walls["exact"]
        say(
            f"{args.seeds} searches: wall raced {rw:.1f}s, exact {ew:.1f}s ({rw / ew:.2f}x); CPU raced {rc:.1f}s, "
            f"exact {ec:.1f}s ({rc / ec:.2f}x) (the machine is shared: see the load averages)"
        )
    say(f"load average at the end: {load()}; CPU time of this process {time.process_time() - cpu0:.0f}s")
    report.write(args.out)


if __name__ == "__main__":
    main()
