"""Recipes: YAML <-> Recipe with one-line errors, and `moeprune run` for each allocation."""

from __future__ import annotations

import inspect
import json

import pytest
import yaml

from moeprune.api import expert_counts
from moeprune.errors import MoepruneError
from moeprune.pipelines.eep import merge_into_anchors, select_experts
from moeprune.pipelines.evoesap import search_allocation
from moeprune.recipe import Recipe
from moeprune.surgery import load
from tiny_tokenizer import TEXT, save_tiny_checkpoint


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    save_tiny_checkpoint(root / "model")
    (root / "text.txt").write_text(TEXT)
    suite = root / "suite"
    suite.mkdir()
    (suite / "multiple_choice.jsonl").write_text(
        "".join(
            json.dumps({"prompt": f"{i}+1=", "options": [f"{i + 1}\n", f"{i + 2}\n"], "answer": 0}) + "\n"
            for i in range(4)
        )  # fmt: skip
    )
    return root


def recipe(root, out: str, **changes) -> dict:
    data = {"data": str(root / "text.txt"), "samples": 4, "seq_len": 32}
    base = {
        "model": str(root / "model"), "out": str(root / out), "sparsity": 0.5, "criterion": "frequency",
        "calibration": data, "search": {"data": data, "population": 4, "generations": 2},
    }  # fmt: skip
    base.update(changes)
    return base


def write(root, name: str, data: dict):
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_yaml_round_trip(root):
    r = Recipe.from_yaml(write(root, "rt", recipe(root, "o", allocation="evoesap")))
    assert Recipe.model_validate(yaml.safe_load(r.to_yaml())) == r
    assert r.search.generations == 2 and r.search.fitness == "esap" and r.allocation == "evoesap"


@pytest.mark.parametrize(
    "allocation, search",
    [("evoesap", search_allocation), ("eep", select_experts), ("eep", merge_into_anchors)],
)
def test_racing_z_default_is_the_search_functions(root, allocation, search):
    """A recipe without racing_z races with the z its search function has by default (Python API)."""
    r = Recipe.from_yaml(write(root, f"z-{allocation}", recipe(root, "o", allocation=allocation)))
    assert r.search.racing_z == inspect.signature(search).parameters["racing_z"].default


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"sparsty": 0.5}, "sparsty: Extra inputs are not permitted"),
        ({"sparsity": 1.5}, "sparsity: must be in [0, 1), got 1.5"),
        ({"allocation": "evo"}, "allocation: unknown allocation 'evo' (did you mean 'evoesap'?)"),
        ({"criterion": "freq"}, "freq"),
        ({"calibration": None}, "a criterion needs calibration data"),
        ({"allocation": "eep", "criterion": None}, "calibration data is only used by a criterion"),
        ({"allocation": "evoesap", "search": None}, "needs search data"),
        ({"eep": {"iterations": 2}}, "an eep section needs allocation: eep"),
        ({"search": {"data": {"data": "x"}, "population": 0}}, "search.population: Input should be greater"),
        (
            {"search": {"data": {"data": "x"}, "cache": "nucleus", "nucleus_p": 0}},
            "search.nucleus_p: must be in (0, 1]",
        ),
        (
            {"search": {"data": {"data": "x"}, "nucleus_p": 1.5}},
            "nucleus cache keeps), got 1.5",
        ),
    ],
)
def test_bad_recipes_fail_in_one_line(root, changes, needle):
    with pytest.raises(MoepruneError) as e:
        Recipe.from_yaml(write(root, "bad", recipe(root, "o", **changes)))
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("allocation", ["uniform", "evoesap", "eep"])
def test_run_each_allocation(run_cli, root, allocation):
    extra = {"eep": {"population": 4, "iterations": 1}} if allocation == "eep" else {}
    tasks = ["moeprune_mc"] if allocation == "uniform" else []  # lm-eval once (its task index is slow)
    data = recipe(
        root, f"out-{allocation}", allocation=allocation,
        evaluate={"suite": str(root / "suite"), "lm_eval": tasks, "limit": 2}, **extra,
    )  # fmt: skip
    path = write(root, allocation, data)
    code, stdout, err = run_cli("run", path)
    assert code == 0, err
    out = root / f"out-{allocation}"
    assert sum(expert_counts(load(out)).values()) == 12  # half of 3 layers x 8 experts
    manifest = json.loads((out / "moeprune.json").read_text())
    assert manifest["recipe"]["allocation"] == allocation
    assert Recipe.from_yaml(out / "recipe.yaml").allocation == allocation
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["suite"]["multiple_choice"]["n"] == 4
    assert evaluation.get("lm_eval", {}).get("moeprune_mc", {}).get("n") == (2 if tasks else None)
    assert "multiple-choice acc." in stdout
    code, _, err = run_cli("run", path)  # the output exists now
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_a_run_shuffles_its_search_rows_by_the_data_seed(root):
    """Racing's slices stand for the whole search set: a run puts its search rows in the data seed's
    random order (the run's seed by default) before cutting them into batches."""
    import torch

    from moeprune.pipelines.base import RunContext

    for seed in (None, 7):
        data = {"data": str(root / "text.txt"), "samples": 6, "seq_len": 16, "seed": seed}
        spec = Recipe.build(recipe(root, "shuffled", allocation="evoesap", search={"data": data}))
        ctx = RunContext(spec, overwrite=False, resume=False, progress=False)
        try:
            loaded = ctx.search_tokens.input_ids  # (N, L) as read
            got = torch.cat([b.input_ids for b in ctx._search_set().batches])
            order = torch.randperm(len(loaded), generator=torch.Generator().manual_seed(seed or spec.seed))
            assert len(loaded) >= 4 and torch.equal(got, loaded[order]) and not torch.equal(got, loaded)
        finally:
            ctx.close()


@pytest.mark.parametrize(
    "caps, dtype",
    [
        ({"avx512_bf16": True}, "auto"),
        ({"amx_bf16": True}, "auto"),
        ({"avx512_bf16": False}, "float32"),
        ({}, "float32"),
    ],
)
def test_the_demo_runs_bfloat16_only_where_the_cpu_computes_it(monkeypatch, tmp_path, caps, dtype):
    """A bfloat16 checkpoint runs in bfloat16 on a CPU with native bfloat16, else in float32 (emulated
    bfloat16 is slower); the demo's recipe takes that dtype."""
    import torch

    from moeprune.demo import demo_recipe
    from moeprune.recipe import cpu_dtype

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: caps)
    assert cpu_dtype() == dtype
    assert demo_recipe(tmp_path / "demo").dtype == dtype


def test_the_demo_runs_one_thread_unless_the_user_set_omp_num_threads(monkeypatch, tmp_path):
    """The testbed's operations are too small to split across threads (docs/results.md, the demo's
    wall time), so the demo's recipe asks for one; a user's OMP_NUM_THREADS wins."""
    from moeprune.demo import demo_recipe

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert demo_recipe(tmp_path / "demo").threads == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert demo_recipe(tmp_path / "demo").threads is None


def test_a_run_sets_torch_threads_for_its_duration_and_restores_them(tmp_path):
    """`threads` in a recipe: checked (>= 1, one line naming the key), set while the run works and
    put back after, also when the run fails."""
    import torch

    from moeprune.errors import MoepruneError
    from moeprune.pipelines.run import torch_threads

    with pytest.raises(MoepruneError, match="threads"):
        Recipe.build({"model": "m", "out": str(tmp_path / "o"), "threads": 0})
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    with torch_threads(wanted):
        assert torch.get_num_threads() == wanted
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(wanted):
        raise RuntimeError("a failing run")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_run_carries_a_recipe_out_under_its_threads(monkeypatch, tmp_path):
    """`pipelines.run.run` works under the recipe's `threads` (the wiring, not only the helper)."""
    import importlib

    import torch

    run_mod = importlib.import_module("moeprune.pipelines.run")  # the module (the package exports run)

    class Context:  # stands in for the run's context: no model is loaded
        def __init__(self, spec, **_):
            self.spec = spec

        def close(self):
            pass

    monkeypatch.setattr(run_mod, "RunContext", Context)
    monkeypatch.setattr(run_mod, "_carry_out", lambda ctx, t0: torch.get_num_threads())
    before = torch.get_num_threads()
    wanted = 1 if before > 1 else 2
    fields = {
        "model": "m",
        "out": str(tmp_path / "o"),
        "sparsity": 0.5,
        "criterion": "frequency",
        "stats": "s",
    }
    recipe = Recipe.build(fields | {"threads": wanted})
    assert run_mod.run(recipe) == wanted
    assert torch.get_num_threads() == before
    assert run_mod.run(Recipe.build(fields)) == before
