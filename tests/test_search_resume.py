"""SIGKILL a running search, resume it, and get the plan and history of an uninterrupted run."""

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
    import sys, time, json
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from tiny_models import tiny_model
    from moeprune.allocate import AllocationSpace, EvoConfig, plan_from_counts, search_counts
    from moeprune.evolve import score_each
    from moeprune.arch import moe_layers
    from moeprune.fitness import CandidateEvaluator, SearchSet

    state, out, resume, delay = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
    model = tiny_model("mixtral")
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    search = SearchSet.from_tensors(ids, batch_size=2)
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=0.5)
    order = {{r.index: torch.randperm(8, generator=torch.Generator().manual_seed(r.index)).tolist() for r in space.layers}}
    ev = CandidateEvaluator(model, search, top_k=16)

    def score(counts):
        time.sleep(delay)  # a slow fitness, so that the kill lands mid-run
        return ev.evaluate(plan_from_counts(space, order, counts)).score

    cfg = EvoConfig(population=8, generations=8, seed=5, checkpoint_every=1)
    r = search_counts(space, score_each(score), cfg, state_path=state if state != "-" else None, resume=resume)
    json.dump({{"best": list(r.best), "history": r.history}}, open(out, "w"))
    """
)


def run_worker(script: Path, state: str, out: Path, resume: bool, delay: float, wait: bool = True):
    cmd = [sys.executable, str(script), state, str(out), "1" if resume else "0", str(delay)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if wait:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output.decode()[-2000:]
    return proc


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(tests=str(Path(__file__).parent)))
    state = tmp_path / "state.json"

    killed = run_worker(script, str(state), tmp_path / "killed.json", resume=False, delay=0.08, wait=False)
    deadline = time.time() + 90
    generation = 0
    while time.time() < deadline and killed.poll() is None:
        try:
            generation = json.loads(state.read_text())["generation"]
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            generation = 0
        if generation >= 2:
            break
        time.sleep(0.02)
    if killed.poll() is not None:
        pytest.fail("the search finished before it could be killed")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed.json").exists()
    assert 2 <= json.loads(state.read_text())["generation"] < 8

    # the resumed and the uninterrupted run side by side (separate processes, same thread count)
    procs = [
        run_worker(script, str(state), tmp_path / "resumed.json", resume=True, delay=0.0, wait=False),
        run_worker(script, "-", tmp_path / "straight.json", resume=False, delay=0.0, wait=False),
    ]
    for proc in procs:
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, output.decode()[-2000:]
    resumed = json.loads((tmp_path / "resumed.json").read_text())
    straight = json.loads((tmp_path / "straight.json").read_text())
    assert resumed["best"] == straight["best"]
    assert resumed["history"] == straight["history"]
    assert len(straight["history"]) == 8
