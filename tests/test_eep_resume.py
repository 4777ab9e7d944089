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


def test_api_eep_resumes_in_its_output_directory(tmp_path):
    """`api.eep(resume=True)` continues the prune search from the state it left in the output
    directory (here: a run stopped after 2 of 3 iterations) and saves what an uninterrupted run saves."""
    import torch

    from moeprune import api
    from moeprune.errors import MoepruneError
    from moeprune.fitness import SearchSet
    from tiny_models import tiny_model

    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(0))
    search = SearchSet.from_tensors(ids, batch_size=2)
    settings = dict(sparsity=0.5, population=4, iterations=3, merge_iterations=2, merge_population=3, seed=1)
    straight = api.eep(tiny_model("qwen3_moe"), search, tmp_path / "straight", progress=False, **settings)
    assert {"eep_prune_state.json", "eep_merge_state.json"} <= {p.name for p in straight["out"].iterdir()}

    out = tmp_path / "resumed"
    with pytest.raises(MoepruneError, match="nothing to resume"):
        api.eep(tiny_model("qwen3_moe"), search, out, resume=True, **settings)
    stopped = {k: v for k, v in settings.items() if k.startswith(("population", "seed"))}
    api.eep_prune(tiny_model("qwen3_moe"), search, sparsity=0.5, iterations=2, progress=False,
                  state_path=out / "eep_prune_state.json", **stopped)  # fmt: skip
    resumed = api.eep(tiny_model("qwen3_moe"), search, out, resume=True, progress=False, **settings)
    assert resumed["prune"].history == straight["prune"].history
    assert resumed["merge"].history == straight["merge"].history
    for name in ("moeprune.json", "merging.json", "eep_history.json"):
        assert (out / name).read_text() == (straight["out"] / name).read_text(), name
