"""Expert rows padded to a bucket (`arch.experts.ROW_BUCKET`) vs not, in a bf16 search in memory and
layer by layer: benchmarks/scale.py's search child (observe + teacher + EvoESAP population 8 x 2
generations) in a fresh process per run, with the bucket set before the run. Prints the search
phase's CPU seconds, peak RSS over import and the best ESAP of each run.

    python benchmarks/row_bucket.py --src CKPT          # a synthetic checkpoint of benchmarks/scale.py
    python benchmarks/row_bucket.py --src CKPT --buckets 32,1 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SCALE = Path(__file__).resolve().parent / "scale.py"
RUN = (
    "import runpy, sys\n"
    "import moeprune.arch.experts as experts\n"
    "experts.ROW_BUCKET = int(sys.argv.pop(1))\n"
    "sys.argv[0] = sys.argv[1]; sys.argv.pop(1)\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def run(bucket: int, mode: str, src: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env["PYTHONPATH"] = str(SCALE.parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    args = [sys.executable, "-c", RUN, str(bucket), str(SCALE), "--child", mode, src, "none", "none", "1GB"]
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="a synthetic bf16 checkpoint (benchmarks/scale.py --src)")
    ap.add_argument("--buckets", default="32,1")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--modes", default="search-memory,search-layers")
    a = ap.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%dT%H:%M')} | {a.src} | OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"
    )
    print(
        f"{'bucket':>6s} {'mode':14s} {'search cpu s':>12s} {'over import MB':>14s} {'best ESAP':>10s} {'load':>5s}"
    )
    for _ in range(a.repeats):
        for mode in a.modes.split(","):
            for bucket in (int(b) for b in a.buckets.split(",")):
                r = run(bucket, mode, a.src)
                over = (r["peak_rss"] - r["rss_after_import"]) / 1e6
                load = os.getloadavg()[0]
                print(
                    f"{bucket:6d} {mode:14s} {r['search_cpu_s']:12.2f} {over:14.0f} {r['best']:10.6f} {load:5.1f}"
                )


if __name__ == "__main__":
    main()
