"""SIGKILL a running EEP merge search (Python API), resume it, and get the uninterrupted result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

WORKER = textwrap.dedent(
    """
    import hashlib, json, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from tiny_models import tiny_model
    from moeprune import api
    from moeprune.arch import moe_layers
    from moeprune.fitness import CandidateEvaluator, SearchSet

    state, out, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    evaluate = CandidateEvaluator.evaluate

    def slow(self, plan):
        time.sleep(delay)  # a slow fitness, so that the kill lands mid-run
        return evaluate(self, plan)

    CandidateEvaluator.evaluate = slow
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    search = SearchSet.from_tensors(ids, batch_size=2)
    anchors = api.ExpertPlan.from_removed({{l.index: [1, 3, 4, 6] for l in moe_layers(model)}})
    r = api.eep_merge(
        model, search, anchors, population=4, iterations=8, seed=3, progress=False,
        state_path=state if state != "-" else None, resume=resume, checkpoint_every=1,
    )
    best = {{str(i): hashlib.sha256(m.weights.numpy().tobytes()).hexdigest() for i, m in r.best.items()}}
    json.dump({{"best": best, "best_score": r.best_score, "start_score": r.start_score,
               "evaluations": r.evaluations, "history": r.history}}, open(out, "w"))
    """
)


def run_worker(script: Path, state: str, out: Path, resume: bool, delay: float) -> subprocess.Popen:
    cmd = [sys.executable, str(script), state, str(out), "1" if resume else "0", str(delay)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_then_resume_eep_merge_matches_uninterrupted(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    state = tmp_path / "state.json"

    killed = run_worker(script, str(state), tmp_path / "killed.json", resume=False, delay=0.1)
    deadline = time.time() + 90
    while time.time() < deadline and killed.poll() is None:
        try:
            if json.loads(state.read_text())["generation"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    if killed.poll() is not None:
        pytest.fail(
            "the search finished before it could be killed: " + killed.communicate()[0].decode()[-2000:]
        )
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed.json").exists()
    assert 2 <= json.loads(state.read_text())["generation"] < 8

    # the resumed and the uninterrupted run side by side (separate processes, same thread count)
    procs = [
        run_worker(script, str(state), tmp_path / "resumed.json", resume=True, delay=0.0),
        run_worker(script, "-", tmp_path / "straight.json", resume=False, delay=0.0),
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output.decode()[-2000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    straight = json.loads((tmp_path / "straight.json").read_text())
    assert resumed == straight
    assert len(straight["history"]) == 8 and straight["evaluations"] == 4 + 7 * 2
    assert straight["best_score"] >= straight["start_score"]


CLI_WORKER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from moeprune.cli import main
    from moeprune.fitness import CandidateEvaluator

    delay, evaluate = float(os.environ.get("DELAY", "0")), CandidateEvaluator.evaluate

    def slow(self, plan):
        time.sleep(delay)  # a slow fitness, so that the kill lands mid-run
        return evaluate(self, plan)

    CandidateEvaluator.evaluate = slow
    sys.argv = ["moeprune", *sys.argv[1:]]
    main()
    """
)


def test_cli_eep_merge_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """`moeprune run RECIPE` (EEP with a merge search) killed with SIGKILL during the merge search, then
    `moeprune run RECIPE --resume`, saves what an uninterrupted run saves."""
    import yaml

    from tiny_tokenizer import TEXT, save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    script = tmp_path / "cli.py"
    script.write_text(CLI_WORKER)
    data = {"data": str(tmp_path / "text.txt"), "samples": 2, "seq_len": 32}

    def recipe(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(tmp_path / "model"), "out": str(tmp_path / name), "allocation": "eep", "sparsity": 0.5,
            "search": {"data": data, "checkpoint_every": 1},
            "eep": {"population": 4, "iterations": 2, "merge_population": 3, "merge_iterations": 8}, "seed": 1,
        }))  # fmt: skip
        return path

    def run(path: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DELAY": str(delay)}
        cmd = [sys.executable, str(script), "run", str(path), *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    killed = run(recipe("killed"), delay=0.1)
    state = tmp_path / ".killed.run" / "eep_merge_state.json"
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        try:
            if json.loads(state.read_text())["generation"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.02)
    if killed.poll() is not None:
        pytest.fail("the run finished before it could be killed: " + killed.communicate()[0].decode()[-2000:])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed").exists()  # nothing half-written: the checkpoint comes at the end
    assert 2 <= json.loads(state.read_text())["generation"] < 8

    procs = [run(recipe("killed"), "--resume"), run(recipe("straight"))]
    for proc in procs:
        output, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, output.decode()[-2000:]
    assert not (tmp_path / ".killed.run").exists()  # the work directory goes once the run is saved
    for name in ("merging.json", "eep_history.json", "eep_merge_state.json"):
        assert (tmp_path / "killed" / name).read_text() == (tmp_path / "straight" / name).read_text(), name
    manifests = [json.loads((tmp_path / d / "moeprune.json").read_text()) for d in ("killed", "straight")]
    for m in manifests:
        del m["recipe"]["out"]
    assert manifests[0] == manifests[1]
