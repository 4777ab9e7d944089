"""Every check lives once, in the specs: the same bad input fails the same way from Python, a recipe
and the CLI, in one line, before any weight is loaded and with nothing written."""

from __future__ import annotations

import pytest
import yaml
from transformers import PreTrainedModel

from moeprune import api
from moeprune.errors import MoepruneError
from moeprune.recipe import Recipe
from tiny_tokenizer import TEXT, save_tiny_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("specs")
    save_tiny_checkpoint(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.fixture(autouse=True)
def no_weights(monkeypatch):
    """Loading any weight fails the test: every case must be refused before."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: refuse()))


CASES = [
    ({"cache": "dnse"}, "did you mean 'dense'"),
    ({"fitness": "esapp"}, "did you mean 'esap'"),
    ({"sparsity": 1.2}, "must be in [0, 1), got 1.2"),
    ({"population": 0}, "greater than or equal to 1"),
    ({"criterion": "freqency"}, "did you mean 'frequency'"),
    ({"racing_z": 0}, "must be > 0 (inf: never drop a candidate), got 0"),
    ({"racing": "maybe"}, "Input should be a valid boolean"),
]


@pytest.mark.parametrize("change, needle", CASES)
def test_api_search_checks_before_loading(files, tmp_path, change, needle):
    args = {
        "criterion": "frequency",
        "sparsity": 0.5,
        "data": files / "text.txt",
        "search_data": files / "text.txt",
    }
    with pytest.raises(MoepruneError) as e:
        api.search(files / "model", tmp_path / "out", **(args | change))
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("change, needle", CASES)
def test_recipe_and_cli_check_before_loading(run_cli, files, tmp_path, change, needle):
    search = {"data": {"data": str(files / "text.txt")}}
    recipe = {"model": str(files / "model"), "out": str(tmp_path / "out"), "allocation": "evoesap",
              "sparsity": 0.5, "criterion": "frequency", "calibration": {"data": str(files / "text.txt")},
              "search": search}  # fmt: skip
    for key, value in change.items():
        (search if key in ("cache", "fitness", "population", "racing_z", "racing") else recipe)[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(MoepruneError) as e:
        Recipe.from_yaml(path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    code, _, err = run_cli("run", path)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    flag = {"cache": "--cache", "fitness": "--fitness", "sparsity": "--sparsity", "population": "--population",
            "criterion": "--criterion", "racing_z": "--racing-z", "racing": "--racing"}[next(iter(change))]  # fmt: skip
    args = ["search", files / "model", "--criterion", "frequency", "--sparsity", "0.5", "--data", files / "text.txt",
            "--search-data", files / "text.txt", "--out", tmp_path / "cli", flag, str(next(iter(change.values())))]  # fmt: skip
    code, _, err = run_cli(*args)
    assert code == 2 and needle in err and flag in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cli").exists()
