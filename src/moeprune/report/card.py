"""The model card (``README.md``) written into every pruned checkpoint.

It says what the checkpoint is (source model, family, recipe), what was removed (experts kept per
layer, parameters), how to load it (stock or ``trust_remote_code`` / ``moeprune.load`` for
non-uniform counts), and, when the caller measured it, the evaluation table. Built only from the
``moeprune.json`` manifest and numbers passed in, so it never disagrees with them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .tables import markdown_table  # noqa: F401  (the card's evaluation tables use it)

RECIPE_KEYS = ("criterion", "sparsity", "allocation", "selection", "active_experts", "fitness")


def model_card(
    manifest: Mapping,
    *,
    parameters: int,
    experts: Mapping[int, int],
    non_uniform: bool,
    plot: str | None = None,
    evaluation: str | None = None,
) -> str:
    """Markdown card for a checkpoint described by `manifest` (``moeprune.json``) holding `experts`
    routed experts per MoE layer index and `parameters` parameters."""
    removed = {int(k): v for k, v in manifest.get("removed", {}).items()}
    source = manifest.get("source_model", "") or "(unknown)"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [moe, expert-pruning, moeprune]",
        "---",
        "",
        f"# Expert-pruned {manifest.get('family', '')} model",
        "",
        f"Made with moeprune {manifest.get('moeprune_version', '')} from `{source}` by removing routed "
        f"experts; every other weight is the source model's.",
        "",
        "## Recipe",
        "",
    ]
    recipe = [f"- {k}: `{manifest[k]}`" for k in RECIPE_KEYS if k in manifest]
    lines += recipe or ["- expert plan given explicitly"]
    total_kept = sum(experts.values())
    total_removed = sum(len(v) for v in removed.values())
    lines += [
        f"- experts kept: {total_kept} of {total_kept + total_removed} routed experts"
        f" in {len(experts)} MoE layers ({'non-uniform' if non_uniform else 'uniform'} per layer)",
        f"- parameters after pruning: {parameters:,}",
        "",
        "| layer | experts kept | removed (original ids) |",
        "|---:|---:|---|",
    ]
    for i, n in sorted(experts.items()):
        lines.append(f"| {i} | {n} | {', '.join(map(str, removed.get(i, []))) or '-'} |")
    if plot:
        lines += ["", f"![experts kept per layer]({plot})"]
    lines += ["", "## Load", "", "```python"]
    if non_uniform:
        lines += [
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("THIS_DIR", trust_remote_code=True)',
            "# or, without remote code:",
            "import moeprune",
            'model = moeprune.load("THIS_DIR")',
            "# llama.cpp, vLLM and SGLang need one expert count per model: `moeprune prune SOURCE",
            "# --uniform-from THIS_DIR --out DIR` writes the nearest uniform checkpoint",
        ]
    else:
        lines += [
            "from transformers import AutoModelForCausalLM",
            'model = AutoModelForCausalLM.from_pretrained("THIS_DIR")',
        ]
    lines += ["```", "", "## Evaluation", ""]
    lines += [
        evaluation
        or "Not measured when this checkpoint was written; `moeprune evaluate THIS_DIR [--lm-eval TASKS]` "
        "prints and writes the table for it."
    ]
    lines += ["", "`moeprune.json` holds the kept and removed expert ids per layer and the recipe.", ""]
    return "\n".join(lines)
