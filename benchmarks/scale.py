"""Pruning a checkpoint from a plan at scale: in-memory surgery vs streaming surgery.

Builds a synthetic Qwen3-MoE checkpoint (random bf16 weights, 48 layers x 128 experts, top-8, hidden
512, expert intermediate 160: ~3.2 GB in 200 MB shards, per-expert tensors as on the hub) in a
temporary directory, then prunes it, each run in a fresh process, and prints wall time, peak RSS
(VmHWM of /proc/self/status) and output size of:

  import    a process that only imports moeprune (the baseline)
  memory    moeprune.load -> prune -> save (uniform plan; run once: it needs ~2x the checkpoint in RAM)
  stream    moeprune.api.stream_prune, uniform plan (50% of every layer)
  stream    the same, non-uniform plan (25% / 75% of the experts in alternate layers)

Goal: streaming peak RSS - import baseline <= 2x the largest input shard, and faster than in memory.

With ``--passes`` it measures what runs the model instead (issue 13), in memory vs layer by layer
(`execute.LayerwiseModel`), each in a fresh process with ``--threads`` torch threads (default 1):
observe (calibration 16 x 128 tokens), the teacher cache (search 8 x 128 tokens, batch 8), and
observe + teacher + a search (population 8, 2 generations; layer by layer one stream for observe +
teacher, one per generation); wall and CPU time, peak RSS, bytes read (/proc/self/io read_bytes +
rchar) and the load average. Writes
benchmarks/results/scale_layers.txt. Goals: layer-by-layer peak RSS - import baseline <= 15% of the
checkpoint; layer-by-layer search wall time <= 1.5x in memory.

    python benchmarks/scale.py                                  # writes benchmarks/results/scale.txt
    python benchmarks/scale.py --layers 8 --experts 32 --no-memory   # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale.txt"


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _io() -> dict[str, int]:
    out = {}
    for line in open("/proc/self/io"):
        key, value = line.split(":")
        out[key] = int(value)
    return out


CACHE = "hidden"  # the teacher cache of a run (`search.cache`'s default)


def passes(mode: str, src: str) -> dict:
    """observe / teacher / search, in memory or layer by layer (mode e.g. 'search-layers')."""
    import torch

    from moeprune.allocate import EvoConfig
    from moeprune.criteria import removal_order
    from moeprune.data import TokenSet
    from moeprune.execute import LayerwiseModel, LocalExecutor, layerwise_evaluator
    from moeprune.fitness import SearchSet, run_teacher
    from moeprune.observe import observe
    from moeprune.pipelines.evoesap import search_allocation
    from moeprune.surgery import load

    what, where = mode.split("-")
    gen = torch.Generator().manual_seed(0)
    cal_ids = torch.randint(3, 1000, (16, 128), generator=gen)
    calibration = TokenSet(cal_ids, torch.ones_like(cal_ids), torch.ones_like(cal_ids).bool(), ["en"] * 16)
    search = SearchSet.from_tensors(torch.randint(3, 1000, (8, 128), generator=gen), batch_size=8)
    model = LayerwiseModel(src) if where == "layers" else load(src)
    info: dict = {}
    if what == "observe":
        observe(model, calibration, progress=False)
    elif what == "teacher":
        model.run_teacher(search, cache=CACHE) if where == "layers" else run_teacher(
            model, search, cache=CACHE
        )
    else:
        if where == "layers":  # as a run in mode layers: one stream for both, the lockstep evaluator
            stats, teacher = model.run_pass(calibration=calibration, search=search, cache=CACHE)
            executor, skeleton = LocalExecutor(model, teacher, layerwise_evaluator), model.model
        else:
            stats, teacher = (
                observe(model, calibration, progress=False),
                run_teacher(model, search, cache=CACHE),
            )
            executor, skeleton = LocalExecutor(model, teacher), model
        t, cpu = time.perf_counter(), time.process_time()
        outcome = search_allocation(
            skeleton, removal_order(stats, "frequency", 0), teacher, sparsity=0.5,
            config=EvoConfig(population=8, generations=2, seed=0), progress=False, executor=executor,
        )  # fmt: skip
        info = {
            "search_s": time.perf_counter() - t,
            "search_cpu_s": time.process_time() - cpu,
            "best": outcome.best_fitness["value"],
        }
    if where == "layers":
        info["layer_bytes"] = max(model.unit_bytes(j) for j in range(model.replay.num_layers))
        info["head_bytes"] = model.unit_bytes("head") + model.unit_bytes("embed")
        info["read_by_loader"] = model.bytes_read
    return info


def child(mode: str, src: str, out: str, plan_file: str, shard: str) -> None:
    """One measured run (in a fresh process): prints a JSON line."""
    t0 = time.perf_counter()
    import moeprune  # noqa: F401
    from moeprune import api

    imported, cpu = time.perf_counter(), time.process_time()
    rss_import = _status("VmRSS")
    io0 = _io()
    extra: dict = {}
    if "-" in mode:
        extra = passes(mode, src)
    elif mode != "import":
        plan = {int(k): v for k, v in json.loads(Path(plan_file).read_text()).items()}
        if mode == "memory":
            model = api.load(src)
            counts = api.expert_counts(model)
            kept = api.prune(model, plan)
            api.save(model, out, source=src, kept=kept, num_experts=counts, max_shard_size=shard)
        else:
            api.stream_prune(src, plan, out, max_shard_size=shard)
    done = time.perf_counter()
    files = list(Path(out).glob("*.safetensors")) if mode != "import" and "-" not in mode else []
    print(
        json.dumps(
            {
                "work_s": done - imported,
                "cpu_s": time.process_time() - cpu,
                "process_s": done - t0,
                "peak_rss": _status("VmHWM"),
                "rss_after_import": rss_import,
                "out_bytes": sum(f.stat().st_size for f in files),
                "shards": len(files),
                "read_bytes": _io()["read_bytes"] - io0["read_bytes"],
                "rchar": _io()["rchar"] - io0["rchar"],
                **extra,
            }
        )
    )


def measure(mode: str, src: Path, out: Path, plan_file: Path, shard: str) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(src), str(out), str(plan_file), shard],
        capture_output=True,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def plans(layers: int, experts: int, seed: int = 0) -> dict[str, dict[int, list[int]]]:
    rng = random.Random(seed)
    uniform = {i: sorted(rng.sample(range(experts), experts // 2)) for i in range(layers)}
    nonuniform = {
        i: sorted(rng.sample(range(experts), experts // 4 if i % 2 else 3 * experts // 4))
        for i in range(layers)
    }
    return {"uniform": uniform, "non-uniform": nonuniform}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--child", nargs=5, metavar=("MODE", "SRC", "OUT", "PLAN", "SHARD"), help=argparse.SUPPRESS
    )
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=160)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=200)
    parser.add_argument(
        "--dir", type=Path, default=None, help="Where to build (default: a temp dir in /tmp)."
    )
    parser.add_argument("--no-memory", action="store_true", help="Skip the in-memory run (it needs ~2x RAM).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--passes", action="store_true", help="observe/teacher/search in memory vs layer by layer."
    )
    parser.add_argument("--src", type=Path, default=None, help="An existing synthetic checkpoint to reuse.")
    parser.add_argument(
        "--threads", type=int, default=1, help="--passes: torch threads per run (OMP_NUM_THREADS; default 1)."
    )
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic import qwen3_moe_config, write_synthetic_checkpoint

    work = Path(tempfile.mkdtemp(prefix="moeprune-scale-", dir=args.dir))
    if args.passes:
        try:
            return layer_passes(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    try:
        config = qwen3_moe_config(args.layers, args.experts, args.hidden, args.intermediate, args.top_k)
        t0 = time.perf_counter()
        src = write_synthetic_checkpoint(work / "src", config, shard_bytes=args.shard_mb * 10**6)
        built = time.perf_counter() - t0
        shards = sorted(src.glob("*.safetensors"))
        size, largest = sum(f.stat().st_size for f in shards), max(f.stat().st_size for f in shards)
        shard = f"{args.shard_mb}MB"
        runs: list[tuple[str, str, dict]] = []
        base = measure("import", src, work / "none", work / "none", shard)
        runs.append(("import moeprune", "-", base))
        for name, plan in plans(args.layers, args.experts).items():
            plan_file = work / f"{name}.json"
            plan_file.write_text(json.dumps(plan))
            todo = ["stream"] + (["memory"] if name == "uniform" and not args.no_memory else [])
            for mode in todo:
                out = work / f"out-{mode}-{name}"
                runs.append((mode, name, measure(mode, src, out, plan_file, shard)))
                shutil.rmtree(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    mb = 1e6
    lines = [
        "moeprune prune from a plan: in memory vs streaming (benchmarks/scale.py), each run a fresh process",
        f"checkpoint: synthetic qwen3_moe, {args.layers} layers x {args.experts} experts, top-{args.top_k}, "
        f"hidden {args.hidden}, expert intermediate {args.intermediate}, bf16, per-expert tensors; "
        f"{size / 1e9:.2f} GB in {len(shards)} shards (largest {largest / mb:.0f} MB), built in {built:.0f} s",
        f"output shards: {shard}; peak RSS = VmHWM; 'over import' = peak RSS - the import-only process's peak",
        "",
        f"{'run':<16} {'plan':<12} {'wall s':>8} {'work s':>8} {'peak RSS MB':>12} {'over import MB':>15} "
        f"{'output GB':>10} {'shards':>7}",
    ]
    for mode, name, r in runs:
        over = r["peak_rss"] - base["peak_rss"]
        lines.append(
            f"{mode:<16} {name:<12} {r['wall_s']:>8.1f} {r['work_s']:>8.1f} {r['peak_rss'] / mb:>12.0f} "
            f"{over / mb:>15.0f} {r['out_bytes'] / 1e9:>10.2f} {r['shards']:>7}"
        )
    streams = [r for mode, _, r in runs if mode == "stream"]
    worst = max(r["peak_rss"] - base["peak_rss"] for r in streams)
    lines += [
        "",
        f"goal 1: streaming peak RSS - import baseline <= 2 x largest shard: {worst / mb:.0f} MB <= "
        f"{2 * largest / mb:.0f} MB: {'met' if worst <= 2 * largest else 'NOT met'}",
    ]
    memory = [r for mode, _, r in runs if mode == "memory"]
    if memory:
        uniform_stream = next(r for mode, name, r in runs if mode == "stream" and name == "uniform")
        ratio = memory[0]["wall_s"] / uniform_stream["wall_s"]
        lines.append(
            f"goal 2: streaming faster than in memory (uniform plan, process wall time): "
            f"{uniform_stream['wall_s']:.1f} s vs {memory[0]['wall_s']:.1f} s = {ratio:.1f}x: "
            f"{'met' if ratio > 1 else 'NOT met'}"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or RESULTS
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


def layer_passes(args, work: Path) -> None:
    """observe / teacher / search in memory vs layer by layer (module docstring)."""
    import os

    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic import qwen3_moe_config, write_synthetic_checkpoint

    t0 = time.perf_counter()
    if args.src is not None:
        src = args.src
    else:
        config = qwen3_moe_config(args.layers, args.experts, args.hidden, args.intermediate, args.top_k)
        src = write_synthetic_checkpoint(work / "src", config, shard_bytes=args.shard_mb * 10**6)
    built = time.perf_counter() - t0
    shards = sorted(src.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in shards)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the runs' torch threads
    load_before = os.getloadavg()
    runs = [("import", measure("import", src, work / "none", work / "none", "1GB"))]
    for what in ("observe", "teacher", "search"):
        for where in ("memory", "layers"):
            runs.append(
                (f"{what}-{where}", measure(f"{what}-{where}", src, work / "none", work / "none", "1GB"))
            )
            print(runs[-1], flush=True)
    load_after = os.getloadavg()
    base = runs[0][1]["peak_rss"]
    mb = 1e6
    lines = [
        "moeprune observe / teacher / search: in memory vs layer by layer (benchmarks/scale.py --passes), each run a fresh process",
        f"checkpoint: synthetic qwen3_moe, {args.layers} layers x {args.experts} experts, top-{args.top_k}, hidden "
        f"{args.hidden}, expert intermediate {args.intermediate}, bf16, per-expert tensors; {size / 1e9:.2f} GB in "
        f"{len(shards)} shards ({'reused: --src' if args.src is not None else f'built in {built:.0f} s'}); CPU, "
        "float (bf16) as stored",
        f"data: calibration 16 x 128 tokens (observe), search 8 x 128 tokens, batch 8 (teacher, {CACHE} cache); search = "
        "observe + teacher + EvoESAP population 8, 2 generations (layer by layer: one stream for observe + teacher, "
        "one per generation)",
        f"torch threads per run: {args.threads} (OMP_NUM_THREADS; with one, another job on the shared machine slows "
        "both modes alike: with two, such a job stalled OpenMP's barriers, most of all in the many small expert "
        "matmuls, and a layer-by-layer search once took 12x the in-memory one)",
        f"load average (1, 5, 15 min) before: {load_before[0]:.1f} {load_before[1]:.1f} {load_before[2]:.1f}, after: "
        f"{load_after[0]:.1f} {load_after[1]:.1f} {load_after[2]:.1f} (a shared 2-core machine: wall times are noisy)",
        "peak RSS = VmHWM; 'over import' = peak RSS - the import-only process's; read = /proc/self/io read_bytes "
        "(from disk) and rchar (all reads, page cache included); cpu s = the work's CPU time (less sensitive to "
        "other jobs than wall time)",
        "",
        f"{'run':<16} {'wall s':>8} {'work s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'over import MB':>15} "
        f"{'% ckpt':>7} {'disk read MB':>13} {'rchar MB':>9}",
    ]
    for name, r in runs:
        over = r["peak_rss"] - base
        lines.append(
            f"{name:<16} {r['wall_s']:>8.1f} {r['work_s']:>8.1f} {r['cpu_s']:>8.1f} {r['peak_rss'] / mb:>12.0f} "
            f"{over / mb:>15.0f} {100 * over / size:>6.1f}% {r['read_bytes'] / mb:>13.0f} {r['rchar'] / mb:>9.0f}"
        )
    res = dict(runs)
    layer = res["search-layers"]
    worst = max(r["peak_rss"] - base for n, r in runs if n.endswith("-layers"))
    ratio = layer["search_s"] / res["search-memory"]["search_s"]
    lines += [
        "",
        f"per unit (layer by layer): largest decoder layer {layer['layer_bytes'] / mb:.1f} MB, embeddings + head "
        f"{layer['head_bytes'] / mb:.1f} MB; bytes the loader read in the search run: {layer['read_by_loader'] / 1e9:.2f} GB "
        f"= {layer['read_by_loader'] / size:.1f} x the checkpoint (1 stream for observe + teacher, 1 per generation, "
        "plus the uniform/best re-scores)",
        f"search phase only: in memory {res['search-memory']['search_s']:.1f} s, layer by layer {layer['search_s']:.1f} s "
        f"(CPU {res['search-memory']['search_cpu_s']:.1f} s vs {layer['search_cpu_s']:.1f} s = "
        f"{layer['search_cpu_s'] / res['search-memory']['search_cpu_s']:.2f}x; best ESAP "
        f"{res['search-memory']['best']:.6f} vs {layer['best']:.6f})",
        f"goal 1: layer-by-layer peak RSS - import baseline <= 15% of the checkpoint: {worst / mb:.0f} MB = "
        f"{100 * worst / size:.1f}%: {'met' if worst <= 0.15 * size else 'NOT met'}",
        f"goal 2: layer-by-layer search wall time <= 1.5x in memory (search phase): {ratio:.2f}x: "
        f"{'met' if ratio <= 1.5 else 'NOT met'}; whole process: "
        f"{layer['wall_s'] / res['search-memory']['wall_s']:.2f}x",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or RESULTS.with_name("scale_layers.txt")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)


if __name__ == "__main__":
    main()
