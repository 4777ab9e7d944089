"""The Ray executor on a local cluster started here (one per module): the same history and plan as the
local executor with 2 workers, after a worker is SIGKILLed mid-generation, and after the driver is
SIGKILLed and resumed; one-line errors for bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from cli_checks import assert_clean_failure  # noqa: E402
from moeprune import api  # noqa: E402
from moeprune.execute.ray_executor import RayExecutor  # noqa: E402
from tiny_tokenizer import TEXT, save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module; its address, for subprocess drivers."""
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    save_tiny_checkpoint(root / "model")
    (root / "calib.txt").write_text(TEXT)
    (root / "search.txt").write_text(TEXT[::-1])
    return root


def _data(root, name, samples):
    return {"data": str(root / name), "samples": samples, "seq_len": 32}


def evoesap(root, out, search_samples=2, **options):
    api.search(
        root / "model", out, criterion="frequency", sparsity=0.5, data=_data(root, "calib.txt", 4),
        search_data=_data(root, "search.txt", search_samples), population=6, generations=3, seed=2,
        progress=False, **options,
    )  # fmt: skip
    history = json.loads((out / "search_history.json").read_text())
    return json.loads((out / "plan.json").read_text()), history["history"], history["executor"]


def eep(root, out, **options):
    api.eep(
        root / "model", out, sparsity=0.5, search_data=_data(root, "search.txt", 2), population=4, iterations=2,
        merge_population=3, merge_iterations=2, seed=1, progress=False, **options,
    )  # fmt: skip
    return (
        json.loads((out / "eep_history.json").read_text()),
        json.loads((out / "merging.json").read_text()),
        json.loads((out / "moeprune.json").read_text())["kept"],
    )


@pytest.fixture(scope="module")
def local(files):
    """The local executor's results, the reference of every Ray run."""
    return {"evoesap": evoesap(files, files / "local"), "eep": eep(files, files / "local-eep")}


def test_two_workers_equal_local(cluster, files, local, tmp_path):
    plan, history, executor = evoesap(files, tmp_path / "evo", executor="ray", workers=2, ray_address=cluster)
    assert executor["kind"] == "ray" and executor["workers"] == 2
    assert local["evoesap"][2]["kind"] == "local"
    assert (plan, history) == local["evoesap"][:2]  # bit for bit: fitness values, history, plan
    # EEP: the selection search and the merge search (merge matrices scored by the actors)
    assert eep(files, tmp_path / "eep", executor="ray", workers=2, ray_address=cluster) == local["eep"]


def test_racing_on_two_workers_equals_local(cluster, files, tmp_path):
    """A racing slice is a ScoreSpec: the actors score it like this process does, bit for bit."""
    race = dict(search_samples=8, racing_z=0.5)  # 4 search batches (racing_slices) of 2 windows
    local = evoesap(files, tmp_path / "local", **race)
    ray_run = evoesap(files, tmp_path / "ray", executor="ray", workers=2, ray_address=cluster, **race)
    assert ray_run[:2] == local[:2]
    saved = [json.loads((tmp_path / d / "search_history.json").read_text()) for d in ("local", "ray")]
    assert saved[0]["racing"]["slices"] == 4 and saved[0]["racing"]["raced_out"] > 0
    assert saved[0]["tokens"] == saved[1]["tokens"] and saved[0]["raced_out"] == saved[1]["raced_out"]


def test_mode_layers_on_two_workers_equals_local(cluster, files, tmp_path):
    """Mode layers on Ray: each actor runs the model layer by layer and scores its share of a
    generation in one stream; the same history and plan as the exact search of the local executor in
    memory (layer by layer a search does not race: each slice would be one more stream)."""
    exact = evoesap(files, tmp_path / "local", racing=False)
    plan, history, executor = evoesap(
        files, tmp_path / "evo", device="layers", executor="ray", workers=2, ray_address=cluster
    )
    assert executor["kind"] == "ray"
    assert (plan, history) == exact[:2]
    # EEP with merging and fewer active experts: the actors score merge plans layer by layer too
    options = dict(racing=False, active_experts=1)
    layers = eep(
        files, tmp_path / "eep", device="layers", executor="ray", workers=2, ray_address=cluster, **options
    )
    assert layers == eep(files, tmp_path / "eep-local", **options)


def test_worker_sigkill_mid_generation_same_plan(cluster, files, local, tmp_path, monkeypatch):
    score, submit, seen = RayExecutor.score, RayExecutor._submit, {"generations": 0, "killed": 0}

    def counting(self, spec, candidates):
        seen["generations"] += 1
        return score(self, spec, candidates)

    def kill_after_submit(self, worker, spec, candidates):
        ref = submit(self, worker, spec, candidates)
        if seen["generations"] == 2 and worker == 0 and not seen["killed"]:
            os.kill(self.pids[0], signal.SIGKILL)  # worker 0's process dies with its candidate in flight
            seen["killed"] += 1
        return ref

    monkeypatch.setattr(RayExecutor, "score", counting)
    monkeypatch.setattr(RayExecutor, "_submit", kill_after_submit)
    plan, history, executor = evoesap(files, tmp_path / "evo", executor="ray", workers=2, ray_address=cluster)
    assert seen["killed"] == 1 and executor["restarts"] >= 1  # replaced, its candidates re-scored
    assert (plan, history) == local["evoesap"][:2]


DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    from moeprune.cli import main
    from moeprune.execute.ray_executor import RayExecutor

    delay, score = float(os.environ.get("DELAY", "0")), RayExecutor.score

    def slow(self, spec, candidates):
        time.sleep(delay)  # a slow generation, so that the kill lands mid-run
        return score(self, spec, candidates)

    RayExecutor.score = slow
    sys.argv = ["moeprune", *sys.argv[1:]]
    main()
    """
)


def test_driver_sigkill_then_resume_same_plan(cluster, files, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)

    def recipe(name: str, executor: dict) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(files / "model"), "out": str(tmp_path / name), "allocation": "evoesap",
            "sparsity": 0.5, "criterion": "frequency", "calibration": _data(files, "calib.txt", 4),
            "search": {"data": _data(files, "search.txt", 2), "population": 6, "generations": 6,
                       "checkpoint_every": 1, **executor},
            "seed": 3,
        }))  # fmt: skip
        return path

    def run(path: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DELAY": str(delay)}
        cmd = [sys.executable, str(script), "run", str(path), *extra]
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    on_ray = recipe("killed", {"executor": "ray", "workers": 2, "ray_address": cluster})
    killed = run(on_ray, delay=1.0)
    state = tmp_path / ".killed.run" / "search_state.json"
    deadline = time.time() + 240
    while time.time() < deadline and killed.poll() is None:
        try:
            if json.loads(state.read_text())["generation"] >= 2:
                break
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        time.sleep(0.05)
    if killed.poll() is not None:
        pytest.fail("the run ended before it could be killed: " + killed.communicate()[0].decode()[-2000:])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed").exists()
    assert 2 <= json.loads(state.read_text())["generation"] < 6

    # resumed on Ray beside an uninterrupted run with the local executor
    procs = [run(on_ray, "--resume"), run(recipe("straight", {}))]
    for proc in procs:
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output.decode()[-3000:]
    resumed, straight = (
        (json.loads((tmp_path / n / "plan.json").read_text()), json.loads((tmp_path / n / "search_history.json").read_text()))
        for n in ("killed", "straight")
    )  # fmt: skip
    assert resumed[0] == straight[0]
    assert resumed[1]["history"] == straight[1]["history"] and len(straight[1]["history"]) == 6


def _args(root, out, *extra):
    return (
        "search", root / "model", "--criterion", "frequency", "--sparsity", "0.5", "--data", root / "calib.txt",
        "--search-data", root / "search.txt", "--out", out, "--population", "4", "--generations", "1",
        "--num-samples", "2", "--seq-len", "32", "--search-samples", "2", "--search-seq-len", "32", *extra,
    )  # fmt: skip


@pytest.mark.parametrize(
    "extra, needles",
    [
        (
            ("--executor", "ray", "--ray-address", "127.0.0.1:1"),
            ("cannot reach a Ray cluster at 127.0.0.1:1",),
        ),
        (("--executor", "ray", "--ray-address", "nowhere"), ("is not HOST:PORT",)),
        (("--executor", "ray", "--workers", "0"), ("--workers: Input should be greater than or equal to 1",)),
        (("--workers", "2"), ("--workers: is a setting of the ray executor",)),
        (("--executor", "dask"), ("--executor", "'local' or 'ray'")),
        (("--executor", "ray", "--workers", "64"), ("64 Ray workers need 64 CPUs",)),
    ],
)
def test_bad_input_one_line(cluster, run_cli, files, tmp_path, extra, needles):
    out = tmp_path / "run"
    assert_clean_failure(run_cli(*_args(files, out, *extra)), out, *needles)


@pytest.mark.parametrize("command", ["search", "eep-prune"])
def test_ray_missing_one_line(run_cli, files, tmp_path, monkeypatch, command):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as where it is not installed
    out = tmp_path / "run"
    args = _args(files, out, "--executor", "ray")
    if command == "eep-prune":
        args = ("eep-prune", files / "model", "--sparsity", "0.5", "--search-data", files / "search.txt",
                "--out", out, "--search-samples", "2", "--search-seq-len", "32", "--executor", "ray")  # fmt: skip
    assert_clean_failure(run_cli(*args), out, "needs Ray", "pip install 'moeprune[ray]'")
