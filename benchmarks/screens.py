"""How far could screening EvoESAP's candidates go? Replays the reference (exact) searches recorded
by `benchmarks/search.py`: their JSON holds every candidate's exact ESAP in the order the search
scored them. The searches are deterministic, so each one is replayed (`search_counts` with the same
config, scores looked up) to learn which candidates each generation scored; a plan the file lacks
would stop the replay.

Racing's floor (an oracle that knows every candidate's full score): a candidate below its
generation's bar (the E-th best score so far; in generation 1 the E-th best of generation 1) is
dropped after the first slice, every other one is scored in full. The work it leaves,

    share = (full + dropped x first slice's share of the rows) / candidates,

bounds what any racing rule can leave on the same searches (racing's measured share is in the same
JSON: `default.work_share`).

Surrogate (a screen before any token is scored): ESAP as a sum of per-layer terms, each smooth in the layer's kept count k_l of E experts,

    ESAP(k) ~ w_0 + sum_l (a_l k_l / E + b_l (k_l / E)^2 + c_l log(1 + k_l))        (ridge, lambda 1e-3)

fitted on every candidate of the generations before and tested on the next generation's. Per
generation: the held-out residual's standard deviation against the spread of the true values (a screen
needs the first well below the second), Kendall's tau of predicted vs true, and a screen: skip the
candidates predicted below the worst elite so far (the E-th best true value, the bar racing uses)
by more than 2 training residual SDs; "wrong" counts skipped candidates whose true ESAP reached the
bar (they would have entered the elites).

    python benchmarks/screens.py [--json benchmarks/results/search_testbed_{text,onpolicy}.json] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from moeprune.allocate import AllocationSpace, EvoConfig, search_counts
from moeprune.arch.adapter import moe_layers
from moeprune.evolve import score_each
from moeprune.testbed import load_testbed


def features(counts: np.ndarray, experts: np.ndarray) -> np.ndarray:
    """(n, L) kept counts, (L,) experts per layer -> (n, 1 + 3L) additive per-layer features."""
    k = counts / experts
    return np.hstack([np.ones((len(counts), 1)), k, k**2, np.log1p(counts)])


def fit(x: np.ndarray, y: np.ndarray, lam: float = 1e-3) -> np.ndarray:
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def screened(counts: np.ndarray, y: np.ndarray, sizes: list[int], experts: np.ndarray, elites: int):
    """One row per generation after the first: (held-out SD, true SD, tau, skipped, wrong)."""
    for n, window in zip(np.cumsum(sizes[:-1]), sizes[1:], strict=True):
        x = features(counts[:n], experts)
        w = fit(x, y[:n])
        train_sd = float((y[:n] - x @ w).std())
        pred = features(counts[n : n + window], experts) @ w
        true = y[n : n + window]
        bar = float(np.sort(y[:n])[-elites])
        skipped = pred < bar - 2 * train_sd
        yield (
            float((true - pred).std()),
            float(true.std()),
            float(kendalltau(pred, true).statistic),
            int(skipped.sum()),
            int((skipped & (true >= bar)).sum()),
        )


def generation_sizes(space: AllocationSpace, values: dict, settings: dict, seed: int) -> list[int]:
    """The candidates each generation of a recorded reference search scored (its replay)."""
    scores = {tuple(int(c) for c in key.split(",")): v["dense"] for key, v in values.items()}
    cfg = EvoConfig(population=settings["population"], generations=settings["generations"], seed=seed)
    result = search_counts(space, score_each(lambda counts: scores[tuple(counts)]), cfg)
    return [h["new_evaluations"] for h in result.history]


def oracle_share(y: np.ndarray, sizes: list[int], elites: int, first: float) -> tuple[float, int]:
    """(racing's floor, candidates scored in full) for scores `y` (n,) in evaluation order, `sizes`
    the candidates of each generation."""
    cost, full, start = 0.0, 0, 0
    for size in sizes:
        gen = y[start : start + size]
        bar = np.sort(gen if start == 0 else y[:start])[-elites]
        above = gen >= bar
        cost += above.sum() + (~above).sum() * first
        full += int(above.sum())
        start += size
    return cost / len(y), full


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--json",
        nargs="+",
        default=[
            "benchmarks/results/search_testbed_text.json",
            "benchmarks/results/search_testbed_onpolicy.json",
        ],
        help="one or more (their kinds)",
    )
    p.add_argument("--elites", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    try:
        files = [json.loads(Path(f).read_text()) for f in args.json]
    except (OSError, ValueError) as e:
        p.error(f"cannot read the search results: {e} (write them with benchmarks/search.py --json FILE)")
    s = files[0]["settings"]
    same = ("criterion", "sparsity", "population", "generations")
    if any(f["settings"][k] != s[k] for f in files for k in same):
        p.error(f"the files' searches differ in {', '.join(same)}")
    kinds = {kind: runs for f in files for kind, runs in f["kinds"].items()}
    model = load_testbed(s["model"], s["data"])[0]
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=s["sparsity"])
    experts = np.array([b.num_experts for b in space.layers])  # E_l per MoE layer (L,)
    lines = [
        f"# python benchmarks/screens.py --json {' '.join(args.json)}",
        f"# the reference searches there: {s['criterion']} order, sparsity {s['sparsity']}, population "
        f"{s['population']} x {s['generations']}, seeds {s['seeds']}; E = {args.elites}",
    ]
    racing, surrogate = [], []
    for kind, runs in kinds.items():
        ref_wall = def_wall = floor_wall = 0.0
        for run in runs:
            values = run["reference"]["values"]
            counts = np.array([[int(c) for c in key.split(",")] for key in values])  # (n, L)
            y = np.array([v["dense"] for v in values.values()])  # (n,)
            sizes = generation_sizes(space, values, s, run["seed"])
            rows = [b[0] for b in run["batches"]]
            share, full = oracle_share(y, sizes, args.elites, rows[0] / sum(rows))
            d = run["default"]
            measured = d["work_share"]
            # the default's scoring time scaled to the floor's share (the rest of its wall unchanged)
            ref_wall, def_wall = ref_wall + run["reference"]["wall"], def_wall + d["wall"]
            floor_wall += d["wall"] - d["eval_s"] * (1 - share / measured)
            racing.append(f"{kind:9} {run['seed']:4} {measured:25.3f} {share:6.3f}  ({full}/{len(y)})")
            gens = list(screened(counts, y, sizes, experts, args.elites))
            held, true = statistics.mean(g[0] for g in gens), statistics.mean(g[1] for g in gens)
            surrogate.append(
                f"{kind:9} {run['seed']:4} {len(gens):11} {held:12.4f} {true:8.4f} {held / true:6.2f} "
                f"{statistics.mean(g[2] for g in gens):12.2f} {sum(g[3] for g in gens):4}/{sum(sizes[1:]):<4}"
                f"{sum(g[4] for g in gens):5}"
            )
        racing.append(
            f"{kind:9}  all: speed-up {ref_wall / def_wall:.2f}x measured; at the floor ~{ref_wall / floor_wall:.2f}x"
        )
    lines += [
        "kind      seed  racing's share: measured  floor  (candidates in full)",
        *racing,
        "(measured: in plain forwards; floor: every candidate below its generation's bar dropped after the first slice, "
        "the rest in full, in rows; at the floor: the default's scoring time scaled by floor / measured)",
        "",
        "kind      seed  generations  held-out SD  true SD  ratio  Kendall tau  skipped  wrong",
        *surrogate,
        "(ratio: held-out SD / true SD, means over the generations; a screen that skips without moving plans needs it "
        "well below 1; skipped: candidates predicted > 2 training SDs below the bar; wrong: of those, true >= bar)",
    ]
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
