"""Why an evaluation cost more CPU on a Ray actor than in the driver: the same candidates (those of a
small EvoESAP search on the testbed), replayed on one thread in the driver, in a fresh Python
process without Ray (also two at once, each on its own core) and in a Ray actor, each with glibc's
default malloc or `keep_heap`.

Per configuration and pass (a fresh `Scorer` each pass, so every pass reuses prefixes alike): CPU
seconds of the scoring thread per evaluation, of which system time, and minor page faults per
evaluation; pass 1 is the process's first scoring (first-call costs), the later ones are warm.

    python benchmarks/ray_eval_cost.py [--passes 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time

import torch

from moeprune.allocate import EvoConfig
from moeprune.execute import LocalExecutor
from moeprune.execute.base import Scorer
from moeprune.execute.ray_executor import _tensors_to, keep_heap, portable


class Recording(LocalExecutor):
    """The local executor, remembering what it scored."""

    def __init__(self, model, teacher) -> None:
        super().__init__(model, teacher)
        self.calls: list = []

    def score(self, spec, candidates):
        self.calls.append((spec, list(candidates)))
        return super().score(spec, candidates)


def replay(model, teacher, calls, passes: int) -> list[dict]:
    """Per pass: thread CPU, system time (ms per evaluation), minor faults per evaluation."""
    rows = []
    for _ in range(passes):
        scorer, n = Scorer(model, teacher), 0
        r0, c0 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
        for spec, candidates in calls:
            for c in candidates:
                scorer.score(spec, [c])
                n += 1
        r1, c1 = resource.getrusage(resource.RUSAGE_THREAD), time.thread_time()
        rows.append(
            {"cpu": (c1 - c0) / n, "sys": (r1.ru_stime - r0.ru_stime) / n, "faults": (r1.ru_minflt - r0.ru_minflt) / n}
        )  # fmt: skip
    return rows


def fresh_model(source: str):
    from moeprune.recipe import placement
    from moeprune.surgery import load

    return load(source, **placement("cpu", "float32"))


def with_replay(teacher, model):
    from moeprune.fitness import LayerReplay

    return dataclasses.replace(teacher, replay=LayerReplay(model))


def child(path: str, heap: bool, passes: int) -> None:
    """A fresh process: the model from the checkpoint, the teacher unpickled (as an actor gets them)."""
    if heap:
        keep_heap()
    torch.set_num_threads(1)
    calls, teacher, source = pickle.load(open(path, "rb"))
    model = fresh_model(source)
    print("ROWS", repr(replay(model, with_replay(teacher, model), calls, passes)))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--keep-heap", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.keep_heap, args.passes)

    import ray

    from moeprune.fitness import SearchSet, run_teacher
    from moeprune.pipelines.evoesap import search_allocation
    from moeprune.testbed import load_testbed, removal_order_for, token_split

    torch.set_num_threads(1)
    model, tokenizer, model_dir, data_dir = load_testbed()
    order = removal_order_for(
        model, token_split(tokenizer, data_dir / "calibration.jsonl", 8, 128), "frequency"
    )
    teacher = run_teacher(
        model, SearchSet.from_tokens(token_split(tokenizer, data_dir / "search.jsonl", 2, 128))
    )
    recording = Recording(model, teacher)
    cfg = EvoConfig(population=8, generations=3, seed=0)
    search_allocation(model, order, teacher, sparsity=0.5, config=cfg, progress=False, executor=recording)
    calls = recording.calls
    n = sum(len(c) for _, c in calls)
    results: list[tuple[str, list[dict], str]] = []

    def note(name, rows, before):
        results.append((name, rows, f"{before} -> {os.getloadavg()[0]:.1f}"))

    before = f"{os.getloadavg()[0]:.1f}"
    note(
        "driver (ran calibration + teacher), default malloc",
        replay(model, teacher, calls, args.passes),
        before,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "calls.pkl")
        with open(path, "wb") as f:
            pickle.dump((calls, portable(teacher), str(model_dir)), f)

        def children(heap: bool, count: int) -> list[list[dict]]:
            cmd = [sys.executable, __file__, "--child", path, "--passes", str(args.passes)] + [
                "--keep-heap"
            ] * heap
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(count)]
            outs = [p.communicate()[0] for p in procs]
            return [eval(next(line for line in o.splitlines() if line.startswith("ROWS"))[5:]) for o in outs]

        for heap in (False, True):
            before = f"{os.getloadavg()[0]:.1f}"
            note(
                f"fresh process, no Ray, {'keep_heap' if heap else 'default malloc'}",
                children(heap, 1)[0],
                before,
            )
        before = f"{os.getloadavg()[0]:.1f}"
        both = children(True, 2)
        mean = [{k: (a[k] + b[k]) / 2 for k in a} for a, b in zip(*both, strict=True)]
        note("2 fresh processes at once (mean), keep_heap", mean, before)

    ray.init(num_cpus=1, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Actor:
        def __init__(self, source: str, heap: bool) -> None:
            if heap:
                keep_heap()
            torch.set_num_threads(1)
            self.model = fresh_model(source)

        def run(self, teacher: list, copy: bool, passes: int) -> list[dict]:
            run = _tensors_to(ray.get(teacher[0]), torch.device("cpu"), copy=copy)
            return replay(self.model, with_replay(run, self.model), calls, passes)

    ref = ray.put(portable(teacher))
    for heap, copy in ((False, True), (True, True), (True, False)):
        before = f"{os.getloadavg()[0]:.1f}"
        actor = Actor.remote(str(model_dir), heap)
        rows = ray.get(actor.run.remote([ref], copy, args.passes))
        ray.kill(actor)
        malloc = "keep_heap" if heap else "default malloc"
        note(f"Ray actor, {malloc}, teacher {'copied' if copy else 'zero-copy'}", rows, before)
    ray.shutdown()

    print(
        f"testbed, {n} candidates of an EvoESAP search (population 8, 3 generations), 1 thread, {args.passes} passes"
    )
    print(
        f"{'where':<52} {'pass 1 CPU ms':>13} {'sys':>5} {'faults':>6}   {'later CPU ms':>12} {'sys':>5} {'faults':>6}  load"
    )
    for name, rows, load in results:
        later = {k: sum(r[k] for r in rows[1:]) / max(len(rows) - 1, 1) for k in rows[0]}
        first = rows[0]
        print(
            f"{name:<52} {first['cpu'] * 1e3:13.1f} {first['sys'] * 1e3:5.1f} {first['faults']:6.0f}   "
            f"{later['cpu'] * 1e3:12.1f} {later['sys'] * 1e3:5.1f} {later['faults']:6.0f}  {load}"
        )
    print(
        "CPU ms / sys: the scoring thread's CPU (of which system) time per evaluation; faults: minor page faults per evaluation"
    )


if __name__ == "__main__":
    main()
