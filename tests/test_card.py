"""The model card written into every pruned checkpoint agrees with its manifest and weights."""

from __future__ import annotations

import json

from moeprune.report import markdown_table, model_card


def test_markdown_table_rows_in_first_seen_order():
    t = markdown_table({"a": {"x": "1", "y": "2"}, "b": {"y": "3", "z": "4"}})
    assert t.splitlines() == [
        "| | a | b |",
        "|---|---:|---:|",
        "| x | 1 |  |",
        "| y | 2 | 3 |",
        "| z |  | 4 |",
    ]


def test_card_lists_kept_experts_and_load_path():
    manifest = {
        "family": "qwen3_moe",
        "source_model": "org/model",
        "kept": {"0": [0, 2, 3], "1": [1]},
        "removed": {"0": [1], "1": [0, 2, 3]},
        "criterion": "reap",
        "sparsity": 0.5,
    }
    card = model_card(manifest, parameters=1234, experts={0: 3, 1: 1}, non_uniform=True, evaluation="| | x |")
    assert "| 0 | 3 | 1 |" in card and "| 1 | 1 | 0, 2, 3 |" in card
    assert "4 of 8 routed experts" in card and "1,234" in card
    assert "trust_remote_code=True" in card and "criterion: `reap`" in card
    assert card.rstrip().endswith(
        "`moeprune.json` holds the kept and removed expert ids per layer and the recipe."
    )
    uniform = model_card(manifest, parameters=1, experts={0: 3, 1: 1}, non_uniform=False)
    assert "trust_remote_code" not in uniform and "moeprune evaluate THIS_DIR" in uniform


def test_pruned_checkpoint_has_a_card(tiny_dir, run_cli, tmp_path):
    out = tmp_path / "pruned"
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"removed": {"0": [1, 2], "1": [0]}}))
    code, _, err = run_cli("prune", tiny_dir("qwen3_moe"), "--plan", plan, "--out", out)
    assert code == 0, err
    card = (out / "README.md").read_text()
    manifest = json.loads((out / "moeprune.json").read_text())
    for layer, ids in manifest["kept"].items():
        assert f"| {layer} | {len(ids)} |" in card
    assert "trust_remote_code=True" in card  # 6, 7 and 8 experts per layer: non-uniform
