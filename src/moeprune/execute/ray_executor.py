"""Score a search's candidates on Ray actors: N workers, each with its own model copy and prefix cache.

    driver                                   worker actor (x N; one GPU each on a GPU run, else CPUs)
    teacher run once -> ray.put (CPU copy)   load the model from the checkpoint (same device kind, dtype)
    scheduler: candidate -> worker           teacher from the object store -> its own CandidateEvaluator
      (longest cached prefix, load balance)  score(spec, candidates) -> FitnessResults, seconds, pid

Connects to a running cluster (``address``: HOST:PORT, ``ray://HOST:PORT`` or ``auto``) or starts a
local one. A worker that dies is restarted by Ray (``max_restarts``) and the tasks it held are run
again on the new process (``max_task_retries``), so a lost worker costs time, never a different
result: every score is computed by the same code on the same weights, in one thread per worker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import socket
import time
from collections.abc import Sequence

import torch

from ..errors import MoepruneError
from ..fitness import FitnessResult, TeacherRun
from ..plan import ExpertPlan
from .base import Executor, Scorer, ScoreSpec, memory_evaluator, merge_stats
from .schedule import AffinityScheduler, prefix_keys

__all__ = ["RayExecutor", "connect", "keep_heap", "portable", "worker_count"]

CONNECT_TIMEOUT_S = 5.0
INSTALL = "pip install 'moeprune[ray]'"
# glibc mallopt parameters (M_MMAP_THRESHOLD: 32 MiB, glibc's largest; M_TRIM_THRESHOLD)
MALLOPT = {-3: 32 * 2**20, -1: 256 * 2**20}


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MoepruneError(f"executor 'ray' needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def _probe(address: str) -> None:
    """One-line error unless something answers at `address` (HOST:PORT or ray://HOST:PORT)."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise MoepruneError(f"ray_address '{address}' is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise MoepruneError(
            f"cannot reach a Ray cluster at {address} ({e.strerror or type(e).__name__}); start one with "
            "`ray start --head` or fix ray_address"
        ) from None


def connect(address: str | None = None, cpus: int = 1) -> bool:
    """Connect this process to Ray: the cluster at `address`, or a new local one (with at least `cpus`
    CPUs) without one; reuses a connection the process already has. True when it started Ray here."""
    ray = _import_ray()
    if address not in (None, "auto"):
        _probe(address)
    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None and not os.environ.get("RAY_ADDRESS"):
            ray.init(num_cpus=max(os.cpu_count() or 1, cpus), include_dashboard=False, **quiet)
            return True
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MoepruneError(f"cannot connect to Ray ({address or 'RAY_ADDRESS'}): {first}") from None
    return False


def worker_count(workers: int | None, device: str = "cpu", threads: int = 1) -> int:
    """How many workers the connected cluster runs: `workers`, or one per GPU on a CUDA run (else one
    per `threads` CPUs); one-line error when the cluster has too few."""
    import ray

    gpu = torch.device(device).type == "cuda"
    unit, per = ("GPU", 1) if gpu else ("CPU", threads)
    have = int(ray.cluster_resources().get(unit, 0))
    n = workers if workers is not None else have // per
    if n < 1 or n * per > have:
        raise MoepruneError(
            f"workers: {n} Ray workers need {max(n, 1) * per} {unit}s, the Ray cluster has {have}"
        )
    return n


def _tensors_to(value, device: torch.device, copy: bool = False):
    """`value` with every tensor (in dataclasses, lists, tuples, dicts) moved (`copy`: copied) to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=copy)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {
            f.name: _tensors_to(getattr(value, f.name), device, copy) for f in dataclasses.fields(value)
        }
        return dataclasses.replace(value, **changes)
    if isinstance(value, list | tuple):
        return type(value)(_tensors_to(v, device, copy) for v in value)
    if isinstance(value, dict):
        return {k: _tensors_to(v, device, copy) for k, v in value.items()}
    return value


def keep_heap() -> bool:
    """Make glibc's malloc in this process serve blocks up to 32 MiB from the heap and keep up to
    256 MiB of freed heap, instead of mapping every large block afresh and handing freed memory
    back to the kernel; False where the C library has no `mallopt` (not glibc) or refuses.

    glibc starts at a 128 KiB mmap threshold (and a 128 KiB trim threshold) and raises them only
    once a larger mapped block is freed. A driver that ran the calibration and the teacher has freed
    ~30 MiB blocks (full-vocabulary logits), so its thresholds sit near 30/60 MiB; a fresh worker's
    do not, and each evaluation's tensors were mapped and page-faulted in again: ~30,000 minor
    faults and ~50 ms of system time per evaluation on the testbed (0.20 CPU s against 0.145 in
    the driver). Scores are unchanged: only where the memory comes from."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(param, value) == 1 for param, value in MALLOPT.items()])


def _faults() -> int:
    """Minor page faults of this thread so far (0 where unknown)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    except (ImportError, AttributeError, OSError):
        return 0


def portable(teacher: TeacherRun) -> TeacherRun:
    """The teacher run without its layer replay (which holds the driver's model), on the CPU: what
    travels to the workers through the object store."""
    return _tensors_to(dataclasses.replace(teacher, replay=None), torch.device("cpu"))


class ScoringWorker:
    """A Ray actor (`ray.remote` applied by `RayExecutor`): one model copy, one `Scorer`.

    The teacher run comes with every task as ``[ObjectRef]`` (only the reference travels) and is
    fetched from the object store once per process: a restarted actor gets it with the task Ray
    retries on it, and the constructor holds no object-store argument that a restart would need.
    The process keeps its freed heap (`keep_heap`); `ready` also scores the unpruned model once
    on a scorer of its own, thrown away (the first call's one-time costs, outside the search)."""

    def __init__(self, source: str, device: str, dtype: str, threads: int, layers: bool = False) -> None:
        from ..recipe import placement
        from ..surgery import load
        from .layerwise import LayerwiseModel

        keep_heap()
        torch.set_num_threads(threads)
        self.layers = layers
        if layers:  # one decoder layer at a time from the checkpoint, as on the driver
            self.model = LayerwiseModel(source, device=device, dtype=dtype)
        else:
            self.model = load(source, **placement(device, dtype))
        self.scorer: Scorer | None = None

    def _attach(self, teacher: list, replay: bool) -> Scorer:
        if self.scorer is None:
            import ray

            from ..fitness import LayerReplay
            from .lockstep import layerwise_evaluator

            # copied into this process's memory (writable, the actor's own); the extra CPU once blamed
            # on computing from the object store's shared memory was the malloc thresholds (`keep_heap`):
            # with them, copied and zero-copy cost the same (benchmarks/ray_eval_cost.py)
            device = self.model.device if self.layers else next(self.model.parameters()).device
            run = _tensors_to(ray.get(teacher[0]), device, copy=True)
            if replay:
                run = dataclasses.replace(
                    run, replay=self.model.replay if self.layers else LayerReplay(self.model)
                )
            factory = layerwise_evaluator if self.layers else memory_evaluator
            self.scorer = Scorer(self.model, run, factory)
        return self.scorer

    def ready(self, teacher: list, replay: bool) -> int:
        """Warm up (one evaluation of the unpruned model, its scorer and cache discarded); the pid."""
        scorer = self._attach(teacher, replay)
        Scorer(self.model, scorer.teacher, scorer.make_evaluator).score(ScoreSpec(), [ExpertPlan({})])
        return os.getpid()

    def score(
        self, spec: ScoreSpec, candidates: list, teacher: list, replay: bool
    ) -> tuple[list[FitnessResult], float, tuple[float, float, int], int]:
        """(results, wall seconds, (CPU seconds of this thread, of this process, minor page faults of
        this thread), pid)."""
        t0, c0, p0, f0 = time.perf_counter(), time.thread_time(), time.process_time(), _faults()
        results = self._attach(teacher, replay).score(spec, candidates)
        cpu = (time.thread_time() - c0, time.process_time() - p0, _faults() - f0)
        return results, time.perf_counter() - t0, cpu, os.getpid()

    def stats(self, spec: ScoreSpec, teacher: list, replay: bool):
        return self._attach(teacher, replay).stats(spec)


class RayExecutor(Executor):
    """Candidates scored by `workers` Ray actors (module docstring).

    `source`/`device`/`dtype`: how each actor loads the model (the run's checkpoint and placement;
    a CUDA run gives every actor one GPU, of its own); with `layers` each actor runs it layer by
    layer from the checkpoint and scores its share of a call's candidates in one stream. `teacher`: the driver's teacher run, put in
    the object store once. `moe_indices`: the MoE decoder layers (prefix keys for the scheduler).
    `workers` None: one per GPU of the cluster on a CUDA run, else one per `threads` CPUs.
    `queue`: candidates sent ahead to each worker (hides the round trip to the driver).

    `timing` adds up, over `score` calls: candidates, tasks, restarts; the driver's wall seconds in
    `score`, the seconds actors spent scoring (the CPU seconds of the scoring thread and of the whole
    actor process meanwhile, the scoring thread's minor page faults), the tail seconds (a worker
    idle at a generation's end because nothing was left for it). workers x wall - scoring - tail is the scheduling and transfer overhead."""

    kind = "ray"

    def __init__(
        self,
        *,
        source: str,
        teacher: TeacherRun,
        moe_indices: Sequence[int],
        device: str = "cpu",
        dtype: str = "auto",
        workers: int | None = None,
        address: str | None = None,
        layers: bool = False,
        threads: int = 1,
        queue: int = 2,
        max_restarts: int = 3,
    ) -> None:
        ray = _import_ray()
        self._ray = ray
        self.actors: list = []
        gpu = torch.device(device).type == "cuda"
        self._started = connect(address, (workers or 1) * threads)
        try:
            self.workers = worker_count(workers, device, threads)
        except MoepruneError:
            self.close()
            raise
        self.moe_indices = list(moe_indices)
        self.queue = queue
        self.max_restarts = max_restarts
        self.scheduler = AffinityScheduler(self.workers)
        names = "candidates tasks restarts wall_seconds worker_seconds worker_cpu_seconds tail_seconds"
        self.timing: dict[str, float] = dict.fromkeys(
            [*names.split(), "worker_process_cpu_seconds", "worker_minor_faults"], 0
        )
        self._teacher = ray.put(portable(teacher))
        actor = ray.remote(ScoringWorker).options(
            num_cpus=threads,
            num_gpus=1 if gpu else 0,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )
        where = "cuda" if gpu else device  # an actor sees only its own GPU
        self._run = ([self._teacher], teacher.replay is not None)  # what every task carries
        self.layers = layers
        self.actors = [actor.remote(str(source), where, dtype, threads, layers) for _ in range(self.workers)]
        try:
            self.pids: list[int] = ray.get([a.ready.remote(*self._run) for a in self.actors])
        except Exception as e:
            self.close()
            raise MoepruneError(f"a Ray worker could not start: {_cause(e)}") from None

    def score(self, spec: ScoreSpec, candidates: Sequence) -> list[FitnessResult]:
        ray = self._ray
        t0 = time.perf_counter()
        keys = [[] if spec.merged else prefix_keys(c, self.moe_indices) for c in candidates]
        results: list[FitnessResult | None] = [None] * len(candidates)
        pending = list(range(len(candidates)))
        inflight: dict = {}  # ObjectRef -> (worker, candidate indices)
        load = [0] * self.workers
        last = [t0] * self.workers  # when each worker's last result arrived
        # layer by layer a task's candidates share one stream of the checkpoint: one task per worker
        per_task = -(-len(candidates) // self.workers) if self.layers else spec.candidate_batch
        while pending or inflight:
            for w in range(self.workers):
                # one candidate each; a second one queued only while more are left than workers (so
                # that a generation's last candidates go to whichever worker is free first)
                while pending and (load[w] == 0 or (load[w] < self.queue and len(pending) > self.workers)):
                    take = self.scheduler.take(w, pending, keys, per_task)
                    pending = [i for i in pending if i not in take]
                    inflight[self._submit(w, spec, [candidates[i] for i in take])] = (w, take)
                    load[w] += 1
            done, _ = ray.wait(list(inflight), num_returns=1)
            for ref in done:
                w, take = inflight.pop(ref)
                load[w] -= 1
                try:
                    scored, seconds, cpu, pid = ray.get(ref)
                except ray.exceptions.RayTaskError as e:
                    cause = _cause(e)
                    raise (cause if isinstance(cause, MoepruneError) else e) from None
                except ray.exceptions.RayActorError as e:
                    raise MoepruneError(
                        f"Ray worker {w} died more than {self.max_restarts} times: {_cause(e)}"
                    ) from None
                if pid != self.pids[w]:  # restarted by Ray: its cache is empty
                    self.pids[w] = pid
                    self.timing["restarts"] += 1
                    self.scheduler.forget(w)
                for i, r in zip(take, scored, strict=True):
                    results[i] = r
                last[w] = time.perf_counter()
                self.timing["tasks"] += 1
                self.timing["worker_seconds"] += seconds
                self.timing["worker_cpu_seconds"] += cpu[0]
                self.timing["worker_process_cpu_seconds"] += cpu[1]
                self.timing["worker_minor_faults"] += cpu[2]
        self.timing["candidates"] += len(candidates)
        self.timing["wall_seconds"] += time.perf_counter() - t0
        self.timing["tail_seconds"] += sum(max(last) - t for t in last)  # nothing left for a worker
        return results  # type: ignore[return-value]

    def _submit(self, worker: int, spec: ScoreSpec, candidates: list):
        return self.actors[worker].score.remote(spec, candidates, *self._run)

    def reuse(self, spec: ScoreSpec) -> dict:
        return merge_stats(self._ray.get([a.stats.remote(spec, *self._run) for a in self.actors]))

    def describe(self) -> dict:
        t = self.timing
        return super().describe() | {
            "restarts": t["restarts"],
            "worker_seconds": round(t["worker_seconds"], 3),
            "wall_seconds": round(t["wall_seconds"], 3),
        }

    def close(self) -> None:
        for a in self.actors:
            try:
                self._ray.kill(a, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
            self._started = False


def _cause(error: BaseException) -> BaseException | str:
    """The exception a Ray error wraps (or its first line)."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
