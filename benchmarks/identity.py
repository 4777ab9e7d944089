"""Digest of what `prune --criterion`, `search` and `eep-prune` produce on the testbed, to show that a
refactoring leaves results bit-identical.

    python benchmarks/identity.py --out before.json      # on the old commit
    python benchmarks/identity.py --out after.json       # on the new one
    python benchmarks/identity.py --compare before.json after.json

Each command runs through the real CLI (small settings, fixed seeds) into a temporary directory; the
digest holds the plans, the search/EEP histories without timings, and a SHA-256 of every saved tensor.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "src/moeprune/assets/testbed/data"
MODEL = Path(__file__).resolve().parents[1] / "src/moeprune/assets/testbed/model"
TIMING = ("seconds", "eval_seconds", "search_seconds", "total_seconds", "teacher_seconds")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not any(t in k for t in TIMING)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def _tensors(out: Path) -> dict[str, str]:
    from safetensors import safe_open

    digest = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():  # noqa: SIM118
                t = st.get_tensor(name)
                digest[name] = hashlib.sha256(t.float().numpy().tobytes()).hexdigest()[:16]
    return digest


def _cli(*args: str) -> None:
    cmd = [sys.executable, "-c", "from moeprune.cli import main; main()", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{done.stderr}")


def _json(out: Path, name: str):
    p = out / name
    return _strip(json.loads(p.read_text())) if p.exists() else None


def digest(sparsity: float) -> dict:
    calib = ["--data", str(DATA / "calibration.jsonl"), "--num-samples", "16", "--seq-len", "128"]
    search = ["--search-data", str(DATA / "search.jsonl"), "--search-samples", "4", "--search-seq-len", "128"]
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp, "prune")
        _cli(
            "prune",
            str(MODEL),
            "--out",
            str(out),
            "--criterion",
            "frequency",
            "--sparsity",
            str(sparsity),
            *calib,
        )
        result["prune"] = {"removed": _json(out, "moeprune.json")["removed"], "tensors": _tensors(out)}
        out = Path(tmp, "search")
        _cli("search", str(MODEL), "--out", str(out), "--criterion", "frequency", "--sparsity", str(sparsity),
             "--population", "8", "--generations", "3", *calib, *search)  # fmt: skip
        result["search"] = {
            "plan": _json(out, "plan.json"),
            "history": _json(out, "search_history.json")["history"],
            "tensors": _tensors(out),
        }
        out = Path(tmp, "eep")
        _cli("eep-prune", str(MODEL), "--out", str(out), "--sparsity", str(sparsity), "--population", "6",
             "--iterations", "3", "--merge-iterations", "2", "--merge-population", "4", *search)  # fmt: skip
        result["eep"] = {
            "removed": _json(out, "moeprune.json")["removed"],
            "history": _json(out, "eep_history.json"),
            "merging": _json(out, "merging.json"),
            "tensors": _tensors(out),
        }
    return result


def _scores(history) -> list:
    """Every score in a history, whatever its field names (generation/iteration)."""
    if isinstance(history, dict):
        return [v for k, v in sorted(history.items()) if k in ("best", "median")] + [
            s for k, v in sorted(history.items()) if k not in ("best", "median") for s in _scores(v)
        ]
    if isinstance(history, list):
        return [s for v in history for s in _scores(v)]
    return []


def compare(a: dict, b: dict) -> list[str]:
    """What differs between two digests (history field names may differ; their scores may not)."""
    diffs = []
    for sp in sorted(set(a) | set(b)):
        for cmd in ("prune", "search", "eep"):
            x, y = a[sp][cmd], b[sp][cmd]
            for key in x:
                same = _scores(x[key]) == _scores(y[key]) if key == "history" else x[key] == y[key]
                if not same:
                    diffs.append(f"sparsity {sp} {cmd}: {key} differs")
    return diffs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--sparsity", default="0.5,0.3")
    ap.add_argument("--compare", nargs=2, type=Path)
    args = ap.parse_args()
    if args.compare:
        a, b = (json.loads(p.read_text()) for p in args.compare)
        diffs = compare(a, b)
        print("\n".join(diffs) if diffs else "identical: plans, histories (scores) and saved tensors")
        raise SystemExit(1 if diffs else 0)
    result = {sp: digest(float(sp)) for sp in args.sparsity.split(",")}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"digest -> {args.out}")


if __name__ == "__main__":
    main()
