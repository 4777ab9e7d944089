"""How torch's OpenMP threads wait, on an idle and on a busy machine (why the CLI waits passively).

A fixed CPU workload (forward passes of the bundled testbed model over calibration windows) runs in
a fresh process per setting, since OpenMP reads its settings once, when torch loads it:

  1 thread                    OMP_NUM_THREADS=1
  N threads, active wait      OMP_WAIT_POLICY=ACTIVE   (threads spin at every barrier)
  N threads, OpenMP default   (libgomp spins a while, then sleeps)
  N threads, passive wait     OMP_WAIT_POLICY=PASSIVE  (what `moeprune` sets unless the user did)

each with 0, 1, ... competing busy processes (pure Python loops, one core each) started beside it.
Prints wall and CPU seconds per setting and each one's wall time relative to 1 thread; settings
alternate within each round, so a change in the machine's other load touches all of them.

    python benchmarks/threads.py                         # 0 and 1 competitors, 3 rounds
    python benchmarks/threads.py --busy 0,1,2 --rounds 2 --forwards 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "moeprune" / "assets" / "testbed"
SETTINGS = {  # name -> environment (OMP_NUM_THREADS filled in for the N-thread rows)
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "N threads, active wait": {"OMP_WAIT_POLICY": "ACTIVE"},
    "N threads, OpenMP default": {},
    "N threads, passive wait": {"OMP_WAIT_POLICY": "PASSIVE"},
}
CHILD = r"""
import json, resource, sys, time, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from moeprune.data import load_data
model_dir, data, forwards = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
tokens = load_data(data, AutoTokenizer.from_pretrained(model_dir), seq_len=256, num_samples=8)
ids = tokens.input_ids[:8]  # (8, 256)
with torch.inference_mode():
    model(input_ids=ids[:2])  # warm-up
    c0, t0 = time.process_time(), time.perf_counter()
    for _ in range(forwards):
        model(input_ids=ids)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
print(json.dumps({"wall": wall, "cpu": cpu, "threads": torch.get_num_threads()}))
"""


def spin() -> None:
    while True:
        pass


def run_one(env_extra: dict, forwards: int, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    env.update({"OMP_NUM_THREADS": str(threads)} | env_extra)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-c", CHILD, str(ASSETS / "model"), str(ASSETS / "data" / "calibration.jsonl")]
    out = subprocess.run([*args, str(forwards)], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", default="0,1", help="numbers of competing busy processes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--forwards", type=int, default=10, help="forward passes of 8 x 256 tokens per run")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="N of the N-thread rows")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M')} | {os.cpu_count()} cores | N = {a.threads} | {a.forwards} forwards of"
    )
    print(f"# 8 x 256 tokens of the testbed per run | {a.rounds} rounds | load average {os.getloadavg()[:2]}")
    rows = []
    for busy in (int(b) for b in a.busy.split(",")):
        hogs = [mp.Process(target=spin, daemon=True) for _ in range(busy)]
        for h in hogs:
            h.start()
        runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
        try:
            for _ in range(a.rounds):
                for name, env in SETTINGS.items():
                    runs[name].append(run_one(env, a.forwards, 1 if name == "1 thread" else a.threads))
        finally:
            for h in hogs:
                h.terminate()
        load = os.getloadavg()[0]
        base = statistics.median(r["wall"] for r in runs["1 thread"])
        print(f"\n{busy} competing busy process(es) (load average at the end {load:.1f})")
        print(f"{'setting':28s} {'wall s':>8s} {'cpu s':>8s} {'wall / 1 thread':>16s}")
        for name, rs in runs.items():
            wall, cpu = statistics.median(r["wall"] for r in rs), statistics.median(r["cpu"] for r in rs)
            print(f"{name:28s} {wall:8.2f} {cpu:8.2f} {wall / base:15.2f}x")
            rows.append({"busy": busy, "setting": name, "wall": wall, "cpu": cpu, "runs": rs, "load": load})
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
