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


def child(mode: str, src: str, out: str, plan_file: str, shard: str) -> None:
    """One measured run (in a fresh process): prints a JSON line."""
    t0 = time.perf_counter()
    import moeprune  # noqa: F401
    from moeprune import api

    imported = time.perf_counter()
    rss_import = _status("VmRSS")
    if mode != "import":
        plan = {int(k): v for k, v in json.loads(Path(plan_file).read_text()).items()}
        if mode == "memory":
            model = api.load(src)
            counts = api.expert_counts(model)
            kept = api.prune(model, plan)
            api.save(model, out, source=src, kept=kept, num_experts=counts, max_shard_size=shard)
        else:
            api.stream_prune(src, plan, out, max_shard_size=shard)
    done = time.perf_counter()
    files = list(Path(out).glob("*.safetensors")) if mode != "import" else []
    print(
        json.dumps(
            {
                "work_s": done - imported,
                "process_s": done - t0,
                "peak_rss": _status("VmHWM"),
                "rss_after_import": rss_import,
                "out_bytes": sum(f.stat().st_size for f in files),
                "shards": len(files),
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
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic import qwen3_moe_config, write_synthetic_checkpoint

    work = Path(tempfile.mkdtemp(prefix="moeprune-scale-", dir=args.dir))
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
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
