"""The same EvoESAP search scored by the local executor and by Ray at 1 and 2 workers, side by side.

Every scorer runs on one thread (the local run sets it here; Ray actors take num_cpus=1 and one torch
thread), the testbed model in float32, the same teacher run (computed once, shipped to the actors
through Ray's object store). Per run: the search's wall time (actor start-up excluded, shown apart:
loading the model, fetching the teacher and one warm-up evaluation per actor), candidates/s, one
evaluation's time on a worker (after the warm-up), its CPU time and minor page faults (heap memory
mapped afresh: see `ray_executor.keep_heap`), the share of a core a scorer got while scoring (CPU
seconds / wall: the other jobs on this machine take the rest), and per candidate

    overhead = (workers x driver wall - actor time scoring - tail) / candidates   (scheduling + transfer)
    tail     = time a worker idles at a generation's end, nothing left for it     (the generation barrier)

both as a fraction of one evaluation. Checks that every run found the same history, plan and
fitness (bit for bit) and records the machine's load (other jobs share its cores).

    python benchmarks/ray_search.py [--population 16 --generations 5 --samples 2 --seq-len 128]
                                    [--driver-keep-heap]   (the same malloc settings in the driver)
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import time

import torch

from moeprune.allocate import EvoConfig
from moeprune.arch import moe_layers
from moeprune.execute import LocalExecutor
from moeprune.execute.ray_executor import RayExecutor, keep_heap
from moeprune.fitness import SearchSet, run_teacher
from moeprune.pipelines.evoesap import search_allocation
from moeprune.testbed import load_testbed, removal_order_for, token_split


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=5)
    p.add_argument("--samples", type=int, default=2, help="search windows per domain")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--driver-keep-heap", action="store_true", help="keep_heap() in this process too")
    args = p.parse_args(argv)

    import ray

    torch.set_num_threads(1)
    if args.driver_keep_heap and not keep_heap():
        raise SystemExit("keep_heap: no glibc mallopt here")
    model, tokenizer, model_dir, data_dir = load_testbed()
    calibration = token_split(tokenizer, data_dir / "calibration.jsonl", 8, 128)
    order = removal_order_for(model, calibration, "frequency")
    search = SearchSet.from_tokens(
        token_split(tokenizer, data_dir / "search.jsonl", args.samples, args.seq_len)
    )
    teacher = run_teacher(model, search)
    cfg = EvoConfig(population=args.population, generations=args.generations, seed=0)
    moe = [layer.index for layer in moe_layers(model)]
    print(
        f"testbed, {search.num_tokens()} search tokens, population {cfg.population}, {cfg.generations} "
        f"generations, sparsity {args.sparsity}; {os.cpu_count()} cores, 1 thread per scorer; driver malloc "
        f"{'keep_heap' if args.driver_keep_heap else 'default'}, actors keep_heap"
    )

    def run(name, executor, startup=0.0):
        before = load()
        t0, c0, f0 = time.perf_counter(), time.process_time(), minor_faults()
        out = search_allocation(
            model, order, teacher, sparsity=args.sparsity, config=cfg, progress=False, executor=executor
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        faults = minor_faults() - f0
        n = out.result.evaluations
        t = getattr(executor, "timing", None)
        row = {
            "name": name,
            "wall": wall,
            "startup": startup,
            "candidates": n,
            "rate": n / wall,
            "driver": cpu / n,
        }
        if t is None:  # the evaluator's own clock; the whole search's CPU time (one thread)
            row |= {
                "eval": out.reuse["eval_seconds"] / n,
                "cpu": cpu / n,
                "process": cpu / n,
                "faults": faults / n,
                "overhead": None,
                "tail": None,
            }
        else:  # per candidate: the actors' clocks; scheduling + transfer; idle at generation ends
            busy = t["worker_seconds"] + t["tail_seconds"]
            row |= {
                "eval": t["worker_seconds"] / t["candidates"], "cpu": t["worker_cpu_seconds"] / t["candidates"],
                "process": t["worker_process_cpu_seconds"] / t["candidates"],
                "faults": t["worker_minor_faults"] / t["candidates"],
                "overhead": (t["wall_seconds"] * executor.workers - busy) / t["candidates"],
                "tail": t["tail_seconds"] / t["candidates"],
            }  # fmt: skip
        workers = getattr(executor, "workers", 1)
        return row | {
            "cores": workers * row["cpu"] / row["eval"], "layers": out.reuse["layers_run_fraction"],
            "load": f"{before} -> {load()}", "key": (out.best, out.result.history, out.best_fitness),
        }  # fmt: skip

    rows = [run("local", LocalExecutor(model, teacher))]
    ray.init(
        num_cpus=max(args.workers), include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False
    )
    for w in args.workers:
        t0 = time.perf_counter()
        executor = RayExecutor(
            source=str(model_dir), teacher=teacher, moe_indices=moe, dtype="float32", workers=w
        )
        startup = time.perf_counter() - t0
        try:
            rows.append(run(f"ray x{w}", executor, startup))
        finally:
            executor.close()
    ray.shutdown()

    local = rows[0]
    print(
        f"{'executor':<9} {'wall s':>7} {'start s':>7} {'cands':>5} {'cands/s':>8} {'vs local':>8} {'eval s':>7} "
        f"{'CPU s':>6} {'proc s':>6} {'faults':>6} {'drv s':>6} {'cores':>5} {'overhead':>16} {'tail':>16} {'layers':>6}  load 1/5 min before -> after"
    )
    for r in rows:

        def per(v, r=r):
            return "-" if v is None else f"{v * 1e3:6.1f} ms {v / r['eval']:5.1%}"

        print(
            f"{r['name']:<9} {r['wall']:7.2f} {r['startup']:7.1f} {r['candidates']:5d} {r['rate']:8.3f} "
            f"{r['rate'] / local['rate']:7.2f}x {r['eval']:7.3f} {r['cpu']:6.3f} {r['process']:6.3f} {r['faults']:6.0f} {r['driver']:6.3f} {r['cores']:5.2f} "
            f"{per(r['overhead']):>16} {per(r['tail']):>16} {r['layers']:6.3f}  {r['load']}"
        )
    print(
        "start s: actor start-up (model load, teacher fetch, one warm-up evaluation); eval s: one evaluation's wall time on a scorer (after the warm-up); CPU s: the CPU time of the scoring thread; proc s: of the whole scorer process (Ray's threads in an actor); faults: minor page faults per evaluation; drv s: the driver process's CPU time per candidate (local: the scoring itself); cores: the cores all "
        "scorers got while scoring (CPU s / eval s x workers); overhead: scheduling + transfer; tail: "
        "workers idle at generation ends; layers: share of decoder layers run (prefix reuse)"
    )
    same = all(r["key"] == local["key"] for r in rows)
    print(f"same history, plan and fitness in every run (bit for bit): {'yes' if same else 'NO'}")
    two = next((r for r in rows if r["name"] == "ray x2"), None)
    if two is not None:
        worst = max(r["overhead"] / r["eval"] for r in rows if r["overhead"] is not None)
        idle = 2 * local["cpu"] / (two["cpu"] * (1 + (two["overhead"] + two["tail"]) / two["eval"]))
        print(
            f"goals: ray x2 {two['rate'] / local['rate']:.2f}x the local candidates/s (goal >= 1.6x) with "
            f"{two['cores']:.2f} cores for its 2 workers vs {local['cores']:.2f} for local; Ray overhead (scheduling "
            f"+ transfer) <= {worst:.1%} of one evaluation (goal <= 5%). With a core per scorer (CPU s as wall "
            f"time, measured overhead and tail): ray x2 ~{idle:.2f}x local"
        )


if __name__ == "__main__":
    main()
