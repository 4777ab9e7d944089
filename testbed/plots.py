"""Plots of the shipped testbed: training curve and per-layer expert usage by domain.

``expert_usage_by_domain.png``: one forward pass over the calibration split with
``output_router_logits=True``; for every layer, the fraction of each domain's tokens whose top-k
contains expert e (rows = domains, columns = experts; each row sums to top_k).

Usage::

    python testbed/plots.py            # reads the bundled model/data, writes the PNGs next to them
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "moeprune" / "assets" / "testbed"


def plot_training_curve(curve_path: Path, out: Path) -> None:
    recs = [json.loads(line) for line in open(curve_path, encoding="utf-8")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    tok = [r["tokens"] / 1e6 for r in recs]
    axes[0].plot(tok, [r["loss"] for r in recs], lw=0.8, label="train (batch)")
    ev = [r for r in recs if "val_loss" in r]
    for dom in ev[0]["val_loss"] if ev else []:
        axes[0].plot(
            [r["tokens"] / 1e6 for r in ev], [r["val_loss"][dom] for r in ev], marker=".", label=f"val {dom}"
        )
    axes[0].set(xlabel="tokens (M)", ylabel="cross-entropy (nats)", title="loss", ylim=(0, 8))
    axes[0].legend(fontsize=7)
    axes[1].plot(tok, [r["aux_loss"] for r in recs], lw=0.8)
    axes[1].set(
        xlabel="tokens (M)",
        ylabel="load-balancing loss",
        title="router load-balancing loss (top_k = 4 is balanced)",
    )
    axes[2].plot([r["tokens"] / 1e6 for r in ev], [100 * r["val_arith_em"] for r in ev], marker="o")
    axes[2].set(xlabel="tokens (M)", ylabel="%", title="val arithmetic exact match (60 items)", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


@torch.no_grad()
def routing_hits(model, tokenizer, rows: list[dict], seq_len: int = 512, batch_size: int = 16):
    """Top-k hit counts per domain: ({domain: (layers, experts) counts}, {domain: tokens}).

    Rows are batched with right padding; padded positions are not counted."""
    cfg = model.config
    k, n_exp = cfg.num_experts_per_tok, cfg.num_experts
    hits: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    model.eval()
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        enc = tokenizer(
            [r["text"] for r in chunk],
            return_tensors="pt",
            padding="longest",
            truncation=True,
            max_length=seq_len,
            padding_side="right",
        )
        out = model(**enc, output_router_logits=True)
        mask = enc["attention_mask"].flatten().bool()  # (B*T,)
        dom_of_tok = [chunk[i]["domain"] for i in range(len(chunk)) for _ in range(enc["input_ids"].shape[1])]
        for dom in {r["domain"] for r in chunk}:
            sel = mask & torch.tensor([d == dom for d in dom_of_tok])
            h = torch.stack(
                [
                    torch.bincount(lg[sel].topk(k, -1).indices.flatten(), minlength=n_exp).float()
                    for lg in out.router_logits  # each (B*T, experts)
                ]
            )  # (layers, experts)
            hits[dom] = hits.get(dom, 0) + h
            tokens[dom] = tokens.get(dom, 0) + int(sel.sum())
    return hits, tokens


def expert_usage(model, tokenizer, rows: list[dict]) -> dict[str, np.ndarray]:
    """{domain: (layers, experts) fraction of the domain's tokens whose top-k contains the expert}."""
    hits, tokens = routing_hits(model, tokenizer, rows)
    return {d: (h / tokens[d]).numpy() for d, h in hits.items()}


def plot_usage(usage: dict[str, np.ndarray], out: Path) -> None:
    doms = list(usage)
    n_layers = next(iter(usage.values())).shape[0]
    cols = 4
    rows = (n_layers + cols - 1) // cols
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols, 1.6 * rows + 0.4 * len(doms) * rows), squeeze=False
    )
    vmax = max(u.max() for u in usage.values())
    for layer in range(rows * cols):
        ax = axes[layer // cols][layer % cols]
        if layer >= n_layers:
            ax.axis("off")
            continue
        mat = np.stack([usage[d][layer] for d in doms])  # (domains, experts)
        im = ax.imshow(mat, aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_yticks(range(len(doms)), doms, fontsize=7)
        ax.set_xticks(range(0, mat.shape[1], 4))
        ax.tick_params(axis="x", labelsize=6)
    fig.colorbar(im, ax=axes, shrink=0.6, label="fraction of domain tokens routed to expert")
    fig.suptitle("Expert usage by domain (calibration split, top-k hits / tokens)")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=ASSETS)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if (args.assets / "training_curve.jsonl").exists():
        plot_training_curve(args.assets / "training_curve.jsonl", args.assets / "training_curve.png")
    model = AutoModelForCausalLM.from_pretrained(args.assets / "model", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.assets / "model")
    rows = [json.loads(line) for line in open(args.assets / "data" / "calibration.jsonl", encoding="utf-8")]
    usage = expert_usage(model, tok, rows)
    plot_usage(usage, args.assets / "expert_usage_by_domain.png")
    summary = {
        d: {"max_share": float(u.max()), "experts_above_2x_uniform": int((u > 2 * 4 / u.shape[1]).sum())}
        for d, u in usage.items()
    }
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
