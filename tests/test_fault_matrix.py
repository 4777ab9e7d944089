"""The fault matrix (docs/failures.md): every fault through the real CLI in a subprocess, each ending
in its exit code, one line on stderr (no traceback) and a known state on disk.

Most cases run concurrently (two at a time) in a module fixture, each test then checks its own;
the kills, the lock, the disk and the resumes need their own setup. The kills land deterministically
during the save: ``MOEPRUNE_TEST_PAUSE_IN_SAVE`` makes `atomic_directory` wait after writing the
files and before moving them into place, and the test kills when the partial output is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import yaml

from tiny_models import tiny_model
from tiny_tokenizer import TEXT, save_tiny_checkpoint

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {
    "PYTHONPATH": SRC,
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",  # "without hub access", and no test waits for the network
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}
SMALL = ("--num-samples", "4", "--seq-len", "32")
SEARCH = ("--search-samples", "2", "--search-seq-len", "32", "--population", "4", "--generations", "2")


def start(args, *, cwd, env=None) -> subprocess.Popen:
    """The CLI in a child process that takes Ctrl-C as a terminal's foreground job does: a test run
    started in the background of a non-interactive shell (CI's, say) ignores SIGINT, and a child
    would inherit that (and rightly keep ignoring it, as any program started so)."""
    cmd = [sys.executable, "-c", "from moeprune.cli import main; main()", *map(str, args)]
    full = {**os.environ, **ENV, **(env or {})}
    return subprocess.Popen(
        cmd, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=partial(signal.signal, signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def cli(args, *, cwd, env=None, timeout=300) -> tuple[int, str, str]:
    proc = start(args, cwd=cwd, env=env)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]


def assert_one_line(result, code: int, *needles: str) -> None:
    """Exit `code`, exactly one line on stderr holding every needle, no traceback."""
    got, stdout, stderr = result
    assert got == code, (got, stdout[-2000:], stderr[-3000:])
    assert "Traceback" not in stderr, stderr
    assert len(lines(stderr)) == 1, stderr
    for needle in needles:
        assert needle in stderr, stderr


def leftovers(out: Path) -> list[str]:
    """What a run may leave beside its output: partial copies, replaced outputs, locks, work dirs."""
    parent = out.parent
    return sorted(p.name for p in parent.glob(f".{out.name}.*")) if parent.is_dir() else []


def assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was written"
    assert leftovers(out) == [], leftovers(out)


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


# --- inputs ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    model = save_tiny_checkpoint(root / "model")
    (root / "calib.txt").write_text(TEXT)
    (root / "calib2.txt").write_text(TEXT[: len(TEXT) // 2])
    (root / "search.txt").write_text(TEXT[::-1])
    (root / "search2.txt").write_text(TEXT[::-2])
    (root / "plan.json").write_text(json.dumps({"removed": {"0": [1, 2]}}))
    (root / "bool_plan.json").write_text(json.dumps({"removed": {"0": [True]}}))
    (root / "a_file").write_text("")
    for name in ("noweights", "truncated", "corrupt", "remote"):
        (root / name).mkdir()
        for f in model.iterdir():
            if name != "noweights" or f.suffix != ".safetensors":
                (root / name / f.name).write_bytes(f.read_bytes())
    weights = root / "truncated" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 3)
    with open(root / "corrupt" / "model.safetensors", "r+b") as f:
        f.write(b"garbage!garbage!")
    config = json.loads((root / "remote" / "config.json").read_text())
    config |= {
        "model_type": "mystery_moe",
        "auto_map": {
            "AutoConfig": "configuration_x.XConfig",
            "AutoModelForCausalLM": "modeling_x.XForCausalLM",
        },
    }
    (root / "remote" / "config.json").write_text(json.dumps(config))
    marker = root / "REMOTE_CODE_RAN"
    code = f"open({str(marker)!r}, 'w').write('ran')\n"
    (root / "remote" / "configuration_x.py").write_text(code)
    (root / "remote" / "modeling_x.py").write_text(code)
    # a tokenizer that takes 64 tokens, and one long row (transformers warns about its length)
    short = root / "short_tok"
    short.mkdir()
    for f in model.iterdir():
        (short / f.name).write_bytes(f.read_bytes())
    tok = json.loads((short / "tokenizer_config.json").read_text())
    (short / "tokenizer_config.json").write_text(json.dumps(tok | {"model_max_length": 64}))
    (root / "long.jsonl").write_text(json.dumps({"text": TEXT}) + "\n")
    # the same model with other weights (same config, same file sizes)
    save_tiny_checkpoint(root / "other_weights", tiny_model("qwen3_moe", seed=1))
    return root


@dataclass
class Case:
    id: str
    args: tuple  # "{root}" in an argument is replaced by the inputs' folder
    needles: tuple = ()
    code: int = 2
    out: str = "out"  # the --out the case must leave absent (and without siblings)
    check: str = ""  # extra check, see test_case
    env: dict = field(default_factory=dict)


PRUNE = ("prune", "{root}/model", "--out", "{out}")
CRIT = ("--criterion", "frequency", "--sparsity", "0.5", "--data", "{root}/calib.txt", *SMALL)
SEARCH_ARGS = (
    "search",
    "{root}/model",
    "--criterion",
    "frequency",
    "--sparsity",
    "0.5",
    "--data",
    "{root}/calib.txt",
    "--search-data",
    "{root}/search.txt",
    "--out",
    "{out}",
    *SMALL,
    *SEARCH,
)
EEP_ARGS = (
    "eep-prune",
    "{root}/model",
    "--sparsity",
    "0.5",
    "--search-data",
    "{root}/search.txt",
    "--out",
    "{out}",
)
PLAN = ("--plan", "{root}/plan.json")

CASES = [
    # usage errors (typer's vendored click): one line, exit 2
    Case("bare-moeprune", (), check="help-on-stdout"),
    Case("unknown-command", ("prnue",), ("No such command 'prnue'", "Did you mean 'prune'?")),
    Case("missing-argument", ("prune",), ("Missing argument",)),
    Case("missing-out", ("prune", "{root}/model", *PLAN), ("Missing option '--out'",)),
    Case("unknown-option", (*PRUNE, *PLAN, "--bogus"), ("No such option: --bogus",)),
    Case(
        "sparsity-not-a-number", (*PRUNE, "--criterion", "frequency", "--sparsity", "abc"), ("'--sparsity'",)
    ),
    Case("samples-not-a-number", (*PRUNE, *CRIT, "--num-samples", "abc"), ("'--num-samples'",)),
    # bad values: named by their flag, before anything loads
    Case("negative-seed", (*PRUNE, *PLAN, "--seed", "-1"), ("--seed:", "greater than or equal to 0")),
    Case(
        "observe-negative-seed",
        ("observe", "{root}/model", "--data", "{root}/calib.txt", "--out", "{out}", "--seed", "-1"),
        ("--seed:",),
    ),
    Case("population-0", (*SEARCH_ARGS, "--population", "0"), ("--population:",)),
    Case("merge-population-2", (*EEP_ARGS, "--merge-population", "2"), ("--merge-population:", "elites")),
    Case(
        "active-experts-not-below-top-k",
        (*EEP_ARGS, "--active-experts", "2"),
        ("--active-experts 2 must be below the model's top-k of 2",),
    ),
    Case("seed-and-plan-conflict", (*PRUNE, *PLAN, "--criterion", "frequency"), ("not both",)),
    # models that cannot load
    Case("model-path-missing", ("prune", "./no/such/model", "--out", "{out}", *PLAN), ("no such directory",)),
    Case(
        "model-without-weights", ("prune", "{root}/noweights", "--out", "{out}", *PLAN), ("holds no weights",)
    ),
    Case("truncated-safetensors", ("prune", "{root}/truncated", "--out", "{out}", *PLAN), ("truncated",)),
    Case(
        "corrupt-safetensors",
        ("prune", "{root}/corrupt", "--out", "{out}", *PLAN),
        ("corrupt or incomplete",),
    ),
    Case(
        "remote-code-refused",
        ("prune", "{root}/remote", "--out", "{out}", *PLAN),
        ("trust_remote_code=False",),
        check="no-remote-code",
    ),
    # plans and data
    Case("plan-is-a-directory", (*PRUNE, "--plan", "{root}"), ("is a directory",)),
    Case("plan-true-is-not-an-id", (*PRUNE, "--plan", "{root}/bool_plan.json"), ("valid integer",)),
    Case(
        "data-missing",
        (*PRUNE, "--criterion", "frequency", "--sparsity", "0.5", "--data", "{root}/no.jsonl"),
        ("does not exist",),
    ),
    Case("resume-without-state", (*SEARCH_ARGS, "--resume"), ("nothing to resume",)),
    # outputs that cannot be written, checked before loading
    Case(
        "out-parent-is-a-file",
        ("prune", "{root}/model", "--out", "{root}/a_file/out", *PLAN),
        ("is a file, not a folder",),
        out="{root}/a_file/out",
    ),
    Case(
        "out-under-proc",
        ("prune", "{root}/model", "--out", "/proc/moeprune-out", *PLAN),
        ("takes no new files",),
        out="/proc/moeprune-out",
        check="proc",
    ),
    Case(
        "out-is-the-model",
        ("prune", "{root}/model", "--out", "{root}/model", *PLAN, "--overwrite"),
        ("is the input",),
        out="",
        check="model-intact",
    ),
    Case(
        "out-inside-the-model",
        ("prune", "{root}/model", "--out", "{root}/model/pruned", *PLAN),
        ("inside the input model",),
        out="{root}/model/pruned",
        check="model-intact",
    ),
    Case(
        "out-holds-the-model",
        ("prune", "{root}/model", "--out", "{root}", *PLAN, "--overwrite"),
        ("holds the input",),
        out="",
        check="model-intact",
    ),
    Case(
        "new-parents-removed-on-failure",
        ("prune", "{root}/model", "--out", "{root}/new/deeper/out", "--plan", "{root}/bool_plan.json"),
        ("valid integer",),
        out="{root}/new",
    ),
    # evaluation without the hub (HF_HUB_OFFLINE): one line, not a 95-line ConnectionError
    Case(
        "lm-eval-offline",
        ("evaluate", "{root}/model", "--suite", "none", "--lm-eval", "arc_easy", "--limit", "2"),
        ("lm-eval could not fetch the data of arc_easy",),
        check="lm-eval",
    ),
    # runs that succeed, with what they must (not) print
    Case(
        "seq-len-clamped",
        (
            "prune",
            "{root}/short_tok",
            "--out",
            "{out}",
            "--criterion",
            "frequency",
            "--sparsity",
            "0.5",
            "--data",
            "{root}/long.jsonl",
            "--num-samples",
            "2",
            "--seq-len",
            "4096",
        ),
        ("warning: --seq-len 4096 is longer than the model's 64 positions",),
        code=0,
        check="clamped",
    ),
]


@pytest.fixture(scope="module")
def results(root, tmp_path_factory):
    """Every case of CASES run, two at a time: {id: (code, stdout, stderr, out path)}."""
    work = tmp_path_factory.mktemp("cases")
    cases = [c for c in CASES if c.check != "lm-eval" or not importlib_missing("lm_eval")]

    def run(case: Case):
        folder = work / case.id
        folder.mkdir()
        out = folder / "out"
        args = [a.replace("{root}", str(root)).replace("{out}", str(out)) for a in case.args]
        code, stdout, stderr = cli(args, cwd=folder, env=case.env)
        where = Path(case.out.replace("{root}", str(root)).replace("{out}", str(out))) if case.out else None
        if case.out == "out":
            where = out
        return case.id, (code, stdout, stderr, where)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, cases))


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, results, root):
    if case.check == "lm-eval" and importlib_missing("lm_eval"):
        pytest.skip("lm-eval is not installed")
    if case.check == "proc" and not Path("/proc").is_dir():
        pytest.skip("no /proc")
    code, stdout, stderr, out = results[case.id]
    if case.check == "help-on-stdout":
        assert code == 2 and "Traceback" not in stderr and lines(stderr) == [], stderr
        assert "Commands" in stdout
        return
    assert_one_line((code, stdout, stderr), case.code, *case.needles)
    assert "fatal: not a git repository" not in stderr and "Token indices" not in stderr
    if case.code == 2:
        assert stderr.startswith("error: "), stderr
        assert stdout == "", stdout
        if out is not None:
            assert_nothing_written(out)
    if case.check == "no-remote-code":
        assert not (root / "REMOTE_CODE_RAN").exists(), "the checkpoint's own code ran"
    if case.check == "model-intact":
        assert (root / "model" / "model.safetensors").is_file() and (root / "model" / "config.json").is_file()
        assert leftovers(root / "model") == [] and not (root / "model" / "pruned").exists()
    if case.check == "clamped":
        recipe = yaml.safe_load((out / "recipe.yaml").read_text())
        assert recipe["calibration"]["seq_len"] == 64
        assert leftovers(out) == []
        assert (out.stat().st_mode & 0o777) == 0o777 & ~current_umask(), oct(out.stat().st_mode)
        assert "pruned" in stdout and "warning" not in stdout


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --- kills during the save, the lock ---------------------------------------------------------------


def wait_for_partial(out: Path, proc: subprocess.Popen, timeout: float = 180) -> Path:
    """The partial output once its files are all written (the run then pauses in the save)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            if (tmp / "moeprune.json").exists():
                return tmp
        if proc.poll() is not None:
            pytest.fail(f"the run ended before its save: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the run never reached its save")


PAUSE = {"MOEPRUNE_TEST_PAUSE_IN_SAVE": "120"}


def test_lock_contention_then_sigterm_at_save(root, tmp_path):
    """A second run to the same --out is refused while the first saves; SIGTERM then removes the
    first one's partial output and its lock: nothing stays."""
    out = tmp_path / "out"
    first = start([*PRUNE_ARGS(root, out), *plan(root)], cwd=tmp_path, env=PAUSE)
    wait_for_partial(out, first)
    second = cli([*PRUNE_ARGS(root, out), *plan(root)], cwd=tmp_path)
    assert_one_line(second, 2, "another moeprune run", "is writing")
    first.send_signal(signal.SIGTERM)
    stdout, stderr = first.communicate(timeout=60)
    assert_one_line((first.returncode, stdout, stderr), 143, "interrupted (SIGTERM); nothing was written")
    assert_nothing_written(out)


def test_ctrl_c_at_save(root, tmp_path):
    out = tmp_path / "out"
    proc = start([*PRUNE_ARGS(root, out), *plan(root)], cwd=tmp_path, env=PAUSE)
    wait_for_partial(out, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert_one_line((proc.returncode, stdout, stderr), 130, "interrupted (Ctrl-C); nothing was written")
    assert_nothing_written(out)


def test_sigkill_at_save_is_cleaned_by_the_next_run(root, tmp_path):
    """SIGKILL cannot be handled: the partial copy stays, and the next run removes it (and says so)."""
    out = tmp_path / "out"
    proc = start([*PRUNE_ARGS(root, out), *plan(root)], cwd=tmp_path, env=PAUSE)
    partial = wait_for_partial(out, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and partial.is_dir() and not out.exists()
    result = cli([*PRUNE_ARGS(root, out), *plan(root)], cwd=tmp_path)
    assert_one_line(result, 0, f"warning: removed {partial.name}", "killed while saving")
    assert (out / "moeprune.json").is_file() and leftovers(out) == []


def test_sigterm_at_a_searchs_save_keeps_the_search_for_resume(root, tmp_path):
    """Interrupted after the search, while saving: the search state stays (the message says where),
    and --resume finishes the same search without searching again."""
    out = tmp_path / "out"
    args = [a.replace("{root}", str(root)).replace("{out}", str(out)) for a in SEARCH_ARGS]
    proc = start(args, cwd=tmp_path, env=PAUSE)
    wait_for_partial(out, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert_one_line((proc.returncode, stdout, stderr), 143, "interrupted (SIGTERM)", "--resume")
    assert not out.exists() and leftovers(out) == [f".{out.name}.run"]
    code, stdout, stderr = cli([*args, "--resume"], cwd=tmp_path)
    assert code == 0, stderr
    assert "EvoESAP" in stdout and "EvoESAP gen" not in stdout  # the result on stdout, progress not
    assert json.loads((out / "search_state.json").read_text())["generation"] == 2
    assert leftovers(out) == []


# --- the disk -------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """mount(options) -> a small tmpfs (root and a working mount only), unmounted afterwards."""
    mounted = []

    def mount(options: str) -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], capture_output=True)


def test_not_enough_space_is_refused_before_loading(root, tmp_path, tmpfs):
    out = tmpfs("size=64k") / "out"
    result = cli([*PRUNE_ARGS(root, out), *plan(root)], cwd=tmp_path)
    assert_one_line(result, 2, "not enough disk space", "MiB free")
    assert list(out.parent.iterdir()) == []


def test_disk_full_while_saving(root, tmp_path, tmpfs):
    """Space enough by the numbers, but the file system runs out (of inodes) mid-save."""
    out = tmpfs("size=16m,nr_inodes=6") / "out"
    result = cli([*PRUNE_ARGS(root, out), *plan(root)], cwd=tmp_path)
    assert_one_line(result, 2, f"writing {out} failed (No space left on device); nothing was written")
    assert list(out.parent.iterdir()) == []


# --- resume identity --------------------------------------------------------------------------------


RESUME_CHANGES = [
    (
        "fitness",
        ("--fitness", "nll"),
        "--fitness changed (the saved search used esap, this run asks for nll)",
    ),
    ("search-data", ("--search-data", "{root}/search2.txt"), "the search data"),
    ("criterion", ("--criterion", "reap"), "--criterion changed"),
    ("calibration", ("--data", "{root}/calib2.txt"), "the criterion's statistics"),
    ("sparsity", ("--sparsity", "0.25"), "--sparsity changed"),
    ("seed", ("--seed", "1"), "--seed changed"),
    ("population", ("--population", "6"), "--population changed"),
    ("cache", ("--cache", "sparse"), "--cache changed"),  # (--top-k counts only for the sparse cache)
    ("model-weights", ("MODEL", "{root}/other_weights"), "the model (its config or weight files) changed"),
]


@pytest.fixture(scope="module")
def resumed(root, tmp_path_factory):
    """One finished search, then `--resume` with each setting of RESUME_CHANGES changed."""
    work = tmp_path_factory.mktemp("resume")
    out = work / "out"
    base = [a.replace("{root}", str(root)).replace("{out}", str(out)) for a in SEARCH_ARGS]
    first = cli(base, cwd=work)
    assert first[0] == 0, first[2]
    assert "EvoESAP gen" not in first[1]  # progress is not a result
    before = digest(out)

    def run(change):  # each on its own copy of the finished run (one run holds an output's lock)
        name, extra, _ = change
        copy = work / f"out-{name}"
        shutil.copytree(out, copy)
        extra = [a.replace("{root}", str(root)) for a in extra]
        args = [str(copy) if a == str(out) else a for a in base]
        if extra[0] == "MODEL":
            args = [extra[1] if a == str(root / "model") else a for a in args]
        else:
            args += extra
        result = cli([*args, "--resume"], cwd=work)
        return name, (result, digest(copy) == before, leftovers(copy))

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(run, RESUME_CHANGES))


@pytest.mark.parametrize("change", RESUME_CHANGES, ids=[c[0] for c in RESUME_CHANGES])
def test_resume_with_a_changed_setting_is_refused(change, resumed):
    result, unchanged, left = resumed[change[0]]
    assert_one_line(result, 2, "--resume:", change[2], "--overwrite")
    assert unchanged, "a refused resume changed the finished run"
    assert left == []


def test_eep_resume_identity(root, tmp_path):
    """EEP keeps its identity the same way: a saved EEP search resumed with other --iterations is
    refused (the state is the one a search would have saved; the identity is the run's own)."""
    from moeprune.pipelines.base import IDENTITY_FILE, STATE_FILE, RunContext, work_dir
    from moeprune.recipe import Recipe

    out = tmp_path / "out"
    recipe = {
        "model": str(root / "model"),
        "out": str(out),
        "allocation": "eep",
        "sparsity": 0.5,
        "search": {"data": {"data": str(root / "search.txt"), "samples": 2, "seq_len": 32}},
        "eep": {"population": 4, "iterations": 2},
    }
    ctx = RunContext(Recipe.build(recipe), overwrite=False, resume=False, progress=False)
    try:
        ctx.state_path().write_text("{}")  # identity.json beside a (stand-in) search state
    finally:
        ctx.close()
    assert (work_dir(out) / IDENTITY_FILE).is_file() and (work_dir(out) / STATE_FILE).is_file()
    recipe["eep"]["iterations"] = 3
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    result = cli(["run", tmp_path / "r.yaml", "--resume"], cwd=tmp_path)
    assert_one_line(
        result, 2, "--resume: --iterations changed (the saved search used 2, this run asks for 3)"
    )
    assert not out.exists()


def PRUNE_ARGS(root: Path, out: Path) -> list[str]:
    return ["prune", str(root / "model"), "--out", str(out)]


def plan(root: Path) -> list[str]:
    return ["--plan", str(root / "plan.json")]
