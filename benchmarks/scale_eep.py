"""EEP's merge search at scale: in memory vs layer by layer (issue 13), each in a fresh process.

Builds a synthetic Qwen3-MoE checkpoint (`tests/synthetic.py`: random bf16 weights, per-expert
tensors as on the hub; default 16 layers x 128 experts, top-8, hidden 512, expert intermediate 160:
~1 GB), then runs, each in a fresh process with ``--threads`` torch threads (default 1):

  import         a process that only imports moeprune (the baseline)
  merge-memory   load -> teacher (search 8 x 128 tokens, hidden cache) -> EEP merge search
  merge-layers   LayerwiseModel -> teacher (one stream) -> the same merge search, each iteration's
                 candidates in one stream, the merges computed from each loaded layer
  select-*       the same with EEP's selection search instead (masks only: what the merge adds)

Merge search: anchors = the even experts of every layer (50%), population 8, 2 iterations, seed 0,
``--active-experts`` (default 6) per token, not raced; selection search: 50% of every layer,
population 8, 2 iterations, seed 0, the same active experts. Prints and writes wall and CPU time,
peak RSS (VmHWM), bytes read (/proc/self/io) and the load average, and checks that both modes give
the same history and best plan (for merges, a SHA-256 of the best plan's M bytes).

    python benchmarks/scale_eep.py        # writes benchmarks/results/scale_eep.txt
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scale import _io, _status

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "scale_eep.txt"


def search_run(mode: str, src: str, active: int) -> dict:
    """The teacher and a search (mode: merge-memory, merge-layers, select-memory, select-layers)."""
    import torch

    from moeprune.execute import LayerwiseModel, LocalExecutor, layerwise_evaluator
    from moeprune.fitness import SearchSet, run_teacher
    from moeprune.pipelines.eep import merge_into_anchors, select_experts
    from moeprune.plan import ExpertPlan
    from moeprune.surgery import load

    what, where = mode.split("-")
    gen = torch.Generator().manual_seed(0)
    search = SearchSet.from_tensors(torch.randint(3, 1000, (8, 128), generator=gen), batch_size=8)
    if where == "layers":
        lm = LayerwiseModel(src)
        teacher = lm.run_teacher(search, cache="hidden")
        model, executor = lm.model, LocalExecutor(lm, teacher, layerwise_evaluator)
    else:
        model = load(src)
        teacher, executor = run_teacher(model, search, cache="hidden"), None
    layers = model.config.num_hidden_layers
    experts = model.config.num_experts
    anchors = ExpertPlan.from_kept(
        {i: range(0, experts, 2) for i in range(layers)}, dict.fromkeys(range(layers), experts)
    )
    options = dict(population=8, iterations=2, seed=0, active_experts=active, progress=False, racing=False)
    t, cpu = time.perf_counter(), time.process_time()
    digest = hashlib.sha256()
    if what == "merge":
        result = merge_into_anchors(model, teacher, anchors, executor=executor, **options)
        for _, m in sorted(result.best.items()):
            digest.update(m.weights.numpy().tobytes())
    else:
        result = select_experts(model, teacher, sparsity=0.5, executor=executor, **options)
        digest.update(json.dumps(result.best.to_dict(), sort_keys=True).encode())
    info = {
        "search_s": time.perf_counter() - t,
        "search_cpu_s": time.process_time() - cpu,
        "best": result.best_score,
        "start": getattr(result, "start_score", None),
        "evaluations": result.evaluations,
        "history": hashlib.sha256(json.dumps(result.history, sort_keys=True).encode()).hexdigest(),
        "best_m": digest.hexdigest(),
    }
    if where == "layers":
        info["layer_bytes"] = max(lm.unit_bytes(j) for j in range(lm.replay.num_layers))
        info["read_by_loader"] = lm.bytes_read
    return info


def child(mode: str, src: str, active: int) -> None:
    from moeprune import api  # noqa: F401  (the baseline: torch and moeprune imported)

    t0, cpu = time.perf_counter(), time.process_time()
    io0 = _io()
    extra = search_run(mode, src, active) if mode != "import" else {}
    print(
        json.dumps(
            {
                "work_s": time.perf_counter() - t0,
                "cpu_s": time.process_time() - cpu,
                "peak_rss": _status("VmHWM"),
                "read_bytes": _io()["read_bytes"] - io0["read_bytes"],
                "rchar": _io()["rchar"] - io0["rchar"],
                **extra,
            }
        )
    )


def measure(mode: str, src: Path, active: int) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(src), str(active)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - t0
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "ACTIVE"), help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=160)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--active-experts", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (OMP_NUM_THREADS)")
    parser.add_argument(
        "--dir", type=Path, default=None, help="Where to build (default: a temp dir in /tmp)."
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.child:
        mode, src, active = args.child
        child(mode, src, int(active))
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from synthetic import qwen3_moe_config, write_synthetic_checkpoint

    work = Path(tempfile.mkdtemp(prefix="moeprune-scale-eep-", dir=args.dir))
    try:
        config = qwen3_moe_config(args.layers, args.experts, args.hidden, args.intermediate, args.top_k)
        src = write_synthetic_checkpoint(work / "src", config, shard_bytes=200 * 10**6)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        load_before = os.getloadavg()
        runs = {}
        for mode in ("import", "merge-memory", "merge-layers", "select-memory", "select-layers"):
            runs[mode] = measure(mode, src, args.active_experts)
            print(mode, runs[mode], flush=True)
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base, mb = runs["import"]["peak_rss"], 1e6
    lines = [
        "moeprune EEP searches: in memory vs layer by layer (benchmarks/scale_eep.py), each run a fresh process",
        f"checkpoint: synthetic qwen3_moe, {args.layers} layers x {args.experts} experts, top-{args.top_k}, hidden "
        f"{args.hidden}, expert intermediate {args.intermediate}, bf16 (computed so), per-expert tensors; "
        f"{size / 1e9:.2f} GB",
        "run: teacher (search 8 x 128 tokens, batch 8, hidden cache) + merge search (anchors: the even experts, "
        f"population 8, 2 iterations, seed 0, {args.active_experts} active experts, not raced); select: the "
        "selection search instead (50%, population 8, 2 iterations, the same active experts)",
        f"torch threads per run: {args.threads}; load average (1, 5, 15 min) before: "
        f"{' '.join(f'{x:.1f}' for x in load_before)}, after: {' '.join(f'{x:.1f}' for x in load_after)} "
        "(a shared 2-core machine: wall times are noisy, CPU times less so)",
        "peak RSS = VmHWM; 'over import' = peak RSS - the import-only process's; read = /proc/self/io read_bytes",
        "",
        f"{'run':<14} {'wall s':>8} {'cpu s':>8} {'search s':>9} {'search cpu s':>13} {'peak RSS MB':>12} "
        f"{'over import MB':>15} {'% ckpt':>7} {'disk read MB':>13}",
    ]
    for name, r in runs.items():
        over = r["peak_rss"] - base
        search = (
            f"{r['search_s']:>9.1f} {r['search_cpu_s']:>13.1f}" if "search_s" in r else f"{'-':>9} {'-':>13}"
        )
        lines.append(
            f"{name:<14} {r['wall_s']:>8.1f} {r['cpu_s']:>8.1f} {search} {r['peak_rss'] / mb:>12.0f} "
            f"{over / mb:>15.0f} {100 * over / size:>6.1f}% {r['read_bytes'] / mb:>13.0f}"
        )
    lines.append("")
    for what in ("merge", "select"):
        mem, lay = runs[f"{what}-memory"], runs[f"{what}-layers"]
        same = all(mem[k] == lay[k] for k in ("history", "best_m", "best", "start", "evaluations"))
        lines += [
            f"{what}: same history, best plan and scores in both modes: {same} (best {lay['best']:.6f}, "
            f"{lay['evaluations']} candidates); search phase, layer by layer / in memory: wall "
            f"{lay['search_s'] / mem['search_s']:.2f}x, CPU {lay['search_cpu_s'] / mem['search_cpu_s']:.2f}x; peak "
            f"RSS over import {(lay['peak_rss'] - base) / mb:.0f} MB vs {(mem['peak_rss'] - base) / mb:.0f} MB; the "
            f"loader read {lay['read_by_loader'] / 1e9:.2f} GB = {lay['read_by_loader'] / size:.1f} x the checkpoint",
        ]
    merge, select = runs["merge-layers"], runs["select-layers"]
    lines.append(
        f"largest decoder layer {merge['layer_bytes'] / mb:.1f} MB; layer by layer, peak RSS of the merge search "
        f"minus the selection search's: {(merge['peak_rss'] - select['peak_rss']) / mb:+.0f} MB"
    )
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
