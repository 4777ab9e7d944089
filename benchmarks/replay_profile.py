"""Where one candidate's replayed decoder layers spend their time on the testbed, and what the
evaluator's exact shortcuts save; CPU time (time.process_time), one torch thread.

1. The layers' time by module (forward wrappers timing every attention block, MoE block and experts
   module while one candidate's layers are replayed; the rest is norms, residuals and the replay's
   own overhead), and the experts' matmul work against a single dense matmul of the same FLOPs.
2. One evaluation (`CandidateEvaluator.evaluate`, no prefix reuse) with and without the slot-sorted
   CPU experts (`arch.experts`) and with and without the last MoE block on the scored rows only,
   interleaved, medians.
3. Finer-than-prefix reuse: for mutants of the uniform plan (EvoESAP's mutation), the share of search
   rows whose input to each layer after the first changed one is bitwise the parent's.

    python benchmarks/replay_profile.py [--kinds text,onpolicy] [--repeats 7] [--mutants 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from search import search_data  # noqa: E402  (the benchmark's search sets, as the pipeline builds them)

import moeprune.fitness.replay as replay_module  # noqa: E402
from moeprune.allocate import AllocationSpace, EvoConfig, mutate, plan_from_counts, uniform_allocation  # noqa: E402
from moeprune.arch import moe_layers  # noqa: E402
from moeprune.data import read_rows  # noqa: E402
from moeprune.fitness import CandidateEvaluator, run_teacher  # noqa: E402
from moeprune.surgery import mask_experts  # noqa: E402
from moeprune.testbed import load_testbed, removal_order_for, token_split  # noqa: E402


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def cpu(f) -> float:
    t = time.process_time()
    f()
    return time.process_time() - t


@torch.inference_mode()
def by_module(model, ev, plan, repeats: int) -> dict[str, float]:
    """Share of the replayed layers' CPU time in each module kind (median over `repeats`)."""
    spent: dict[str, float] = defaultdict(float)
    undo = []
    for layer in model.model.layers:
        for name, module in (
            ("attention", layer.self_attn),
            ("MoE block", layer.mlp),
            ("experts", layer.mlp.experts),
        ):
            inner = module.forward

            def timed(*a, _inner=inner, _name=name, **k):
                t = time.process_time()
                out = _inner(*a, **k)
                spent[_name] += time.process_time() - t
                return out

            module.forward = timed
            undo.append(module)
    real = replay_module.sorted_forward

    def timed_sorted(experts):  # the replay runs the slot-sorted experts (`arch.experts`): time those
        fast = real(experts)
        if fast is None:
            return None

        def run(*a, **k):
            t = time.process_time()
            out = fast(*a, **k)
            spent["experts"] += time.process_time() - t
            return out

        return run

    replay_module.sorted_forward = timed_sorted
    try:
        totals = []
        for _ in range(repeats):
            spent.clear()
            with mask_experts(model, plan):
                total = cpu(lambda: ev._run_layers(plan, []))
            totals.append((total, dict(spent)))
        total, parts = sorted(totals, key=lambda x: x[0])[len(totals) // 2]
    finally:
        replay_module.sorted_forward = real
        for module in undo:
            del module.forward
    return {"layers_s": total} | {k: v / total for k, v in parts.items()}


def matmul_floor(model, search, repeats: int) -> tuple[float, float]:
    """(GFLOP/s of one dense (S, H) x (H, 2I) + (S, I) x (I, H) matmul pair, S = T * k slots of the
    first batch) -> the experts' matmul floor per layer call."""
    cfg = model.config.get_text_config()
    s = search.batches[0].input_ids.numel() * cfg.num_experts_per_tok
    x, w1 = torch.randn(s, cfg.hidden_size), torch.randn(cfg.hidden_size, 2 * cfg.moe_intermediate_size)
    h, w2 = torch.randn(s, cfg.moe_intermediate_size), torch.randn(cfg.moe_intermediate_size, cfg.hidden_size)
    secs = statistics.median(cpu(lambda: (x @ w1, h @ w2)) for _ in range(repeats))
    flops = 2 * s * cfg.hidden_size * 3 * cfg.moe_intermediate_size
    return flops / secs / 1e9, secs


@torch.inference_mode()
def shortcuts(model, teacher, plan, repeats: int) -> dict[str, float]:
    """Median CPU seconds of one evaluation (no reuse) with each shortcut on/off, interleaved."""
    ev = CandidateEvaluator(model, teacher, reuse=False)
    real = replay_module.sorted_forward
    run_layers = ev._run_layers
    variants = {
        "both (default)": (True, True),
        "without sorted experts": (False, True),
        "without the last block on scored rows": (True, False),
        "without either": (False, False),
    }
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    values: dict[str, float] = {}
    try:
        for _ in range(repeats):
            for name, (sorted_on, rows_on) in variants.items():
                replay_module.sorted_forward = real if sorted_on else (lambda experts: None)
                ev._run_layers = (
                    run_layers if rows_on else (lambda p, t, scored_only=False: run_layers(p, t, False))
                )
                t = time.process_time()
                values[name] = ev.evaluate(plan).value
                seconds[name].append(time.process_time() - t)
    finally:
        replay_module.sorted_forward = real
        ev._run_layers = run_layers
    base = values["without either"]
    return {k: (statistics.median(v), values[k] - base) for k, v in seconds.items()}


@torch.inference_mode()
def finer_reuse(model, teacher, space, order, mutants: int) -> list[tuple[tuple, list[int], list[float]]]:
    """Per mutant of the uniform plan: its counts, changed layers and, per decoder layer, the share
    of search rows whose layer input equals the parent's bitwise."""
    ev = CandidateEvaluator(model, teacher, reuse=False)
    n = ev.replay.num_layers

    def inputs(counts) -> list[list[torch.Tensor]]:  # [layer][batch] (B, L, H)
        plan = plan_from_counts(space, order, counts)
        got: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_pre_hook(
                lambda m, a, k: got.append((a[0] if a else k["hidden_states"]).clone()), with_kwargs=True
            )
            for layer in ev.replay.layers
        ]
        try:
            with mask_experts(model, plan):
                ev._run_layers(plan, [])
        finally:
            for h in hooks:
                h.remove()
        nb = len(ev.records)
        return [got[i * nb : (i + 1) * nb] for i in range(n)]

    base = uniform_allocation(space)
    parent = inputs(base)
    rng = np.random.Generator(np.random.PCG64(0))
    out = []
    for _ in range(mutants):
        child = mutate(space, base, EvoConfig(), rng)
        got = inputs(child)
        shares = []
        for i in range(n):
            same = sum(int((p == c).flatten(1).all(1).sum()) for p, c in zip(parent[i], got[i], strict=True))
            rows = sum(p.shape[0] for p in parent[i])
            shares.append(same / rows)
        changed = [space.layers[j].index for j in range(len(base)) if child[j] != base[j]]
        out.append((child, changed, shares))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", default="text,onpolicy")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--mutants", type=int, default=8)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    say(f"$ python benchmarks/replay_profile.py {' '.join(argv or sys.argv[1:])}")
    say(f"load average (1/5/15 min) at start: {load()}; 1 torch thread, CPU time")
    model, tok, _, data_dir = load_testbed(None, None)
    calib = token_split(tok, data_dir / "calibration.jsonl", 4, 256, 0)
    order = removal_order_for(model, calib, "frequency", 0)
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=0.5)
    plan = plan_from_counts(space, order, uniform_allocation(space))
    prompts = read_rows(data_dir / "search_prompts.jsonl")
    for kind in args.kinds.split(","):
        search, _ = search_data(kind, 0, tok, model, data_dir, prompts, 2, 256)
        teacher = run_teacher(model, search, cache="hidden")
        shapes = ", ".join("x".join(map(str, b.input_ids.shape)) for b in search.batches)
        say(f"\n## {kind} (seed 0's search set: batches {shapes}; uniform 50% plan, frequency order)")
        ev = CandidateEvaluator(model, teacher, reuse=False)
        parts = by_module(model, ev, plan, args.repeats)
        say(
            f"1. replayed layers {parts['layers_s']:.3f} s: attention {parts.get('attention', 0):.0%}, MoE block "
            f"{parts.get('MoE block', 0):.0%} (of which experts {parts.get('experts', 0):.0%}, router and masking the "
            f"rest), norms/residuals/replay {1 - parts.get('attention', 0) - parts.get('MoE block', 0):.0%} "
            f"(median of {args.repeats}, load {load()})"
        )
        gflops, floor = matmul_floor(model, search, args.repeats)
        calls = len(search.batches) * len(ev.replay.layers)
        say(
            f"   experts' matmul floor: one dense matmul pair of the same FLOPs runs {gflops:.0f} GFLOP/s, "
            f"{floor * calls:.3f} s for the {calls} layer calls ({floor * calls / parts['layers_s']:.0%} of the layers)"
        )
        say(f"2. one evaluation (no prefix reuse), median of {args.repeats}, load {load()}:")
        for name, (secs, delta) in shortcuts(model, teacher, plan, args.repeats).items():
            say(f"   {name:<40} {secs:.3f} s   ESAP - ESAP without either {delta:+.1e}")
        say(f"   (load {load()})")
        say("3. mutants of the uniform plan: share of search rows whose layer input is bitwise the parent's")
        for child, changed, shares in finer_reuse(model, teacher, space, order, args.mutants):
            say(f"   {list(child)} changes MoE layers {changed}: " + " ".join(f"{s:.2f}" for s in shares))
    say(f"\nload average at the end: {load()}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
