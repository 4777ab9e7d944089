"""Train the testbed Qwen3-MoE on the corpus built by ``testbed/corpus.py``.

Each training sequence is a random window of ``--seq-len`` tokens from one domain's token stream
(train split only); the domain is drawn with the mixture weights below. Loss = next-token CE +
``router_aux_loss_coef`` x load-balancing loss (``output_router_logits=True``). Seeded sampling, AdamW,
cosine learning rate over a run capped by ``--steps`` and by a wall-clock budget ``--minutes`` (the
schedule follows whichever is further along, so the step count depends on the machine's speed); a checkpoint every ``--ckpt-every`` steps lets a crashed run
resume (``--resume``). The loss curve goes to ``<work>/curve.jsonl`` (one JSON object per log step).

Usage::

    python testbed/train.py --work testbed/work --steps 60 --tag probe        # throughput probe
    nohup python testbed/train.py --work testbed/work --steps 3000 --minutes 60 > testbed/work/train.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

MIXTURE = {"arith": 0.40, "en": 0.14, "de": 0.15, "fr": 0.14, "code": 0.17}


def model_config(tok, args: argparse.Namespace) -> Qwen3MoeConfig:
    """The testbed architecture: 8 MoE layers x 32 experts, top-4, normalised top-k, tied embeddings."""
    return Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,  # unused: every layer is MoE (decoder_sparse_step=1)
        moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 32,
        num_key_value_heads=2,
        head_dim=32,
        num_experts=args.experts,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        tie_word_embeddings=True,
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def token_streams(corpus: Path, tok, cache: Path) -> dict[str, np.ndarray]:
    """One uint16 stream per domain: <bos> doc <eos> <bos> doc <eos> ... (train split)."""
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    if all((cache / f"{d}.npy").exists() for d in MIXTURE):
        return {d: np.load(cache / f"{d}.npy") for d in MIXTURE}
    texts: dict[str, list[str]] = {d: [] for d in MIXTURE}
    with open(corpus / "train.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            texts[r["domain"]].append(r["text"])
    for d, ts in texts.items():
        ids = tok(ts, add_special_tokens=True)["input_ids"]
        arr = np.fromiter((t for x in ids for t in (*x, tok.eos_token_id)), dtype=np.uint16)
        np.save(cache / f"{d}.npy", arr)
        out[d] = arr
        print(f"[tokens] {d}: {len(arr):,}", flush=True)
    return out


def sample_batch(streams: dict[str, np.ndarray], rng: random.Random, bsz: int, seq: int) -> torch.Tensor:
    doms = rng.choices(list(MIXTURE), weights=list(MIXTURE.values()), k=bsz)
    rows = []
    for d in doms:
        s = streams[d]
        i = rng.randrange(0, len(s) - seq - 1)
        rows.append(torch.from_numpy(s[i : i + seq].astype(np.int64)))
    return torch.stack(rows)  # (bsz, seq)


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``peak`` to 0.1 x peak as progress goes 0 -> 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def quick_arith_em(model, tok, rows: list[str], n: int = 60) -> float:
    """Greedy exact match on the first problem of ``n`` val arithmetic docs (monitoring only)."""
    model.eval()
    probs = [r.split("\n")[0] for r in rows[:n]]
    prompts = [p.split("=")[0] + "=" for p in probs]
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, output_router_logits=False
    )
    gen = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    ok = sum(g.split("\n")[0].strip() == p.split("=")[1] for g, p in zip(gen, probs, strict=True))
    model.train()
    return ok / len(probs)


@torch.no_grad()
def val_loss(model, batches: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    res = {d: model(input_ids=b, labels=b).loss.item() for d, b in batches.items()}
    model.train()
    return res


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("testbed/work"))
    p.add_argument("--tag", default="main")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=1400, help="maximum number of optimizer steps")
    p.add_argument(
        "--minutes",
        type=float,
        default=0.0,
        help="wall-clock budget: the cosine schedule follows max(step/steps, time/budget)",
    )
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--hidden", type=int, default=192)
    p.add_argument("--moe-inter", type=int, default=96)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--experts-impl", default="grouped_mm", help="transformers experts implementation")
    p.add_argument("--mkldnn", action="store_true", help="keep oneDNN on (it gave 5-10x slow steps here)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--resume", action="store_true")
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from the weights of another run's ckpt.pt (fresh optimizer and schedule; logged steps "
        "and tokens continue from that run's)",
    )
    p.add_argument(
        "--stop-at",
        type=int,
        default=None,
        help="stop (with a checkpoint) after this step; schedule unchanged",
    )
    p.add_argument(
        "--mix",
        default=None,
        help="override the domain mixture, e.g. arith=0.55,en=0.1,de=0.11,fr=0.1,code=0.14",
    )
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.mix:
        MIXTURE.update({k: float(v) for k, v in (kv.split("=") for kv in args.mix.split(","))})
    print(f"[mixture] {MIXTURE}", flush=True)
    torch.backends.mkldnn.enabled = args.mkldnn
    torch.manual_seed(args.seed)
    corpus = args.work / "corpus"
    run = args.work / f"run-{args.tag}"
    run.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    streams = token_streams(corpus, tok, args.work / "tokens")
    cfg = model_config(tok, args)
    model = Qwen3MoeForCausalLM(cfg)
    if args.experts_impl != "eager":
        model.set_experts_implementation(args.experts_impl)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[model] {n_params / 1e6:.2f}M params", flush=True)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    rng = random.Random(args.seed)
    step, tokens_seen, elapsed0 = 0, 0, 0.0
    step0, tokens0 = 0, 0  # offsets of a continued run (--init-from), for the log only
    if args.init_from is not None:
        st = torch.load(args.init_from, weights_only=False)
        model.load_state_dict(st["model"])
        step0, tokens0 = st["step"], st["tokens"]
        rng.seed(args.seed + step0)
        print(f"[init] weights of {args.init_from} (step {step0})", flush=True)
    ckpt = run / "ckpt.pt"
    if args.resume and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        step, tokens_seen, elapsed0 = st["step"], st["tokens"], st["elapsed"]
        step0, tokens0 = st.get("step0", 0), st.get("tokens0", 0)
        print(f"[resume] step {step}", flush=True)
        if (run / "curve.jsonl").exists():  # drop log lines written after the checkpoint
            lines = (run / "curve.jsonl").read_text().splitlines()
            keep = [x for x in lines if json.loads(x)["step"] <= step0 + step]
            (run / "curve.jsonl").write_text("".join(x + "\n" for x in keep))

    val_rows = {d: [] for d in MIXTURE}
    with open(corpus / "val.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            val_rows[r["domain"]].append(r["text"])
    vrng = random.Random(0)
    val_batches = {}
    for d, ts in val_rows.items():
        ids = [t for x in tok(ts[:200])["input_ids"] for t in (*x, tok.eos_token_id)]
        starts = [vrng.randrange(0, len(ids) - args.seq_len) for _ in range(4)]
        val_batches[d] = torch.tensor([ids[s : s + args.seq_len] for s in starts])

    curve = open(run / "curve.jsonl", "a", encoding="utf-8")
    model.train()
    t0 = time.time() - elapsed0
    t_log, tok_log = time.time(), 0

    def progress() -> float:
        by_time = (time.time() - t0) / (60 * args.minutes) if args.minutes else 0.0
        return max(step / args.steps, by_time)

    while progress() < 1.0:
        lr = lr_at(step, progress(), args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x = sample_batch(streams, rng, args.batch, args.seq_len)
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += x.numel()
        tok_log += x.numel()
        last = progress() >= 1.0 or step == args.stop_at
        if step % args.log_every == 0 or last:
            now = time.time()
            rec = {
                "step": step0 + step,
                "tokens": tokens0 + tokens_seen,
                "loss": round(out.loss.item() - cfg.router_aux_loss_coef * out.aux_loss.item(), 4),
                "aux_loss": round(out.aux_loss.item(), 4),
                "lr": lr,
                "elapsed_s": round(now - t0, 1),
                "tok_per_s": round(tok_log / (now - t_log), 1),
            }
            t_log, tok_log = now, 0
            if step % args.eval_every == 0 or last:
                rec["val_loss"] = {k: round(v, 4) for k, v in val_loss(model, val_batches).items()}
                rec["val_arith_em"] = quick_arith_em(model, tok, val_rows["arith"])
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            print(json.dumps(rec), flush=True)
        if step % args.ckpt_every == 0 or last:
            st = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "rng": rng.getstate(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "tokens": tokens_seen,
                "elapsed": time.time() - t0,
                "step0": step0,
                "tokens0": tokens0,
            }
            torch.save(st, run / "ckpt.tmp")
            (run / "ckpt.tmp").replace(ckpt)
        if step == args.stop_at:
            print(f"[stop] at step {step}", flush=True)
            return
    model.config.output_router_logits = False
    model.save_pretrained(run / "final")
    tok.save_pretrained(run / "final")
    (run / "args.json").write_text(json.dumps({k: str(v) for k, v in vars(args).items()}, indent=1))
    print(f"[done] {step} steps, {tokens_seen:,} tokens, {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
