"""Observer cost on the testbed, measured side by side in one process.

Prints, for the same calibration batches:
  observer pass time / plain forward time        (moeprune.observe: each expert on its routed tokens)
  dense reference time / plain forward time      (every expert on every token, as research code does)
and the peak memory of each pass. Memory is measured with the kernel's resident-set counters: a
fresh child process loads the model and data, resets its peak RSS (``/proc/self/clear_refs`` = 5),
runs that one pass and reports VmHWM (peak RSS during the pass) minus VmRSS before it. (torch's CPU
allocator has no peak counter, and tracemalloc does not see tensor memory.)

With ``--layers`` the model runs layer by layer (`execute.LayerwiseModel`: each decoder layer read
from the checkpoint, run on every batch, freed) and the passes are a plain forward (`batch_logits`,
every batch's logits) and the observer; both pay the same weight reads. ``--random-tokens`` feeds
seeded random token ids (a synthetic checkpoint without a tokenizer).

    python benchmarks/observe.py                       # the bundled testbed model and calibration split
    python benchmarks/observe.py --model DIR --data calib.jsonl --samples 32 --seq-len 256
    python benchmarks/observe.py --model SYNTHETIC --random-tokens --dtype bfloat16 --layers
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moeprune.arch import decode_router_output, expert_outputs, moe_layers
from moeprune.data import TokenSet, load_data
from moeprune.observe import observe

ASSETS = Path(__file__).resolve().parents[1] / "src" / "moeprune" / "assets" / "testbed"


class DenseReference:
    """Research-code observer: a router hook runs EVERY expert on EVERY token, then keeps the routed
    outputs; accumulates the same float64 statistics as moeprune.observe (counts, gates, norms, Gram)."""

    def __init__(self, model):
        self.layers = moe_layers(model)
        self.valid = None
        self.stats = {
            layer.index: {
                "count": torch.zeros(layer.num_experts, dtype=torch.float64),
                "norm_sum": torch.zeros(layer.num_experts, dtype=torch.float64),
                "gnorm_sum": torch.zeros(layer.num_experts, dtype=torch.float64),
                "gram": torch.zeros(layer.num_experts, layer.num_experts, dtype=torch.float64),
            }
            for layer in self.layers
        }
        self.handles = []

    def __enter__(self):
        self.handles = [layer.router.register_forward_hook(self.hook(layer)) for layer in self.layers]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def hook(self, layer):
        def fn(module, args, output):
            dec = decode_router_output(layer, output)
            x = args[0].reshape(-1, args[0].shape[-1])[self.valid]  # (T, H)
            idx, w = dec.indices[self.valid], dec.weights[self.valid].double()  # (T, k)
            t, e = x.shape[0], layer.num_experts
            ids = torch.arange(e).repeat_interleave(t)  # (E*T,)
            a_all = expert_outputs(layer, x.repeat(e, 1), ids).view(e, t, -1)  # (E, T, H): dense
            a = a_all[idx, torch.arange(t)[:, None]].double()  # (T, k, H) the routed outputs
            st = self.stats[layer.index]
            norms = a.norm(dim=-1)
            st["count"] += torch.bincount(idx.reshape(-1), minlength=e).double()
            st["norm_sum"].index_add_(0, idx.reshape(-1), norms.reshape(-1))
            st["gnorm_sum"].index_add_(0, idx.reshape(-1), (w * norms).reshape(-1))
            c = a * w[..., None]
            pair = torch.einsum("tah,tbh->tab", c, c)
            k = idx.shape[1]
            st["gram"].index_put_(
                (
                    idx[:, :, None].expand(-1, -1, k).reshape(-1),
                    idx[:, None, :].expand(-1, k, -1).reshape(-1),
                ),
                pair.reshape(-1),
                accumulate=True,
            )

        return fn


@torch.no_grad()
def plain_pass(model, data: TokenSet, batch: int) -> None:
    for b in data.batches(batch):
        model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)


@torch.no_grad()
def dense_pass(model, data: TokenSet, batch: int) -> dict:
    with DenseReference(model) as ref:
        for b in data.batches(batch):
            ref.valid = b.attention_mask.reshape(-1).bool()
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
    return ref.stats


def observer_pass(model, data: TokenSet, batch: int, dense_tokens: int = 0):
    return observe(model, data, batch_size=batch, dense_tokens=dense_tokens, progress=False)


def layers_plain_pass(lm, data: TokenSet, batch: int) -> None:
    """Every batch's logits from one layer-by-layer stream (the head run batch by batch)."""
    for _ in lm.batch_logits([(b.input_ids, b.attention_mask) for b in data.batches(batch)]):
        pass


PASSES = {
    "plain": lambda m, d, a: plain_pass(m, d, a.batch),
    "observer": lambda m, d, a: observer_pass(m, d, a.batch),
    "observer+mop": lambda m, d, a: observer_pass(m, d, a.batch, a.dense_tokens),
    "dense": lambda m, d, a: dense_pass(m, d, a.batch),
}


LAYER_PASSES = {
    "plain": lambda m, d, a: layers_plain_pass(m, d, a.batch),
    "observer": lambda m, d, a: observer_pass(m, d, a.batch),
}


def load(args):
    torch.set_num_threads(args.threads)
    if args.layers:
        from moeprune.execute import LayerwiseModel

        model = LayerwiseModel(args.model, dtype=args.dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    if args.random_tokens:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(
            3, min(1000, model.config.vocab_size), (args.samples, args.seq_len), generator=gen
        )
        ones = torch.ones_like(ids)
        return model, TokenSet(ids, ones, ones.bool(), ["random"] * args.samples)
    tok = AutoTokenizer.from_pretrained(args.model)
    data = load_data(args.data, tok, seq_len=args.seq_len, num_samples=args.samples, seed=0)
    return model, data


def proc_status_mb(key: str) -> float:
    """A memory line of /proc/self/status (kB) in MB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def peak_rss_mb(args, variant: str) -> float:
    """Peak RSS growth (MB) during one `variant` pass, in a fresh child process."""
    cmd = [sys.executable, __file__, *sys.argv[1:], "--probe", variant]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_mb"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ASSETS / "model"))
    p.add_argument("--data", default=str(ASSETS / "data" / "calibration.jsonl"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--dense-tokens", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--layers", action="store_true", help="run layer by layer (plain forward vs observer)")
    p.add_argument("--short", action="store_true", help="plain forward vs observer only, wall and CPU time")
    p.add_argument("--random-tokens", action="store_true", help="random token ids instead of --data")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS probes (a process each)")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    p.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    model, data = load(args)
    short = args.layers or args.short
    passes = LAYER_PASSES if args.layers else {k: PASSES[k] for k in LAYER_PASSES} if short else PASSES
    if args.probe:
        gc.collect()
        before = proc_status_mb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        passes[args.probe](model, data, args)
        print(json.dumps({"peak_rss_mb": proc_status_mb("VmHWM") - before}))
        return

    passes["plain"](model, data, args)  # warm-up (kernels, allocator)
    times: dict[str, list[float]] = {k: [] for k in passes}
    cpu: dict[str, list[float]] = {k: [] for k in passes}
    load_before = os.getloadavg()
    for _ in range(args.repeats):  # interleaved, so background load hits every variant alike
        for name, fn in passes.items():
            t, c = time.perf_counter(), time.process_time()
            fn(model, data, args)
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    load_after = os.getloadavg()
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    if short:
        report_short(args, model, data, med, med_cpu, (load_before, load_after))
        return

    fast = observer_pass(model, data, args.batch)
    ref = dense_pass(model, data, args.batch)
    agree = max(
        float((fast.layers[i].__dict__[n] - ref[i][n]).abs().max() / ref[i][n].abs().max().clamp_min(1e-30))
        for i in ref
        for n in ("count", "norm_sum", "gnorm_sum", "gram")
    )
    mem = {k: peak_rss_mb(args, k) for k in PASSES}
    layers = moe_layers(model)
    result = {
        "model": args.model,
        "experts": layers[0].num_experts,
        "top_k": layers[0].top_k,
        "moe_layers": len(layers),
        "tokens": data.num_tokens,
        "threads": args.threads,
        "dtype": args.dtype,
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "time_ratio_vs_plain": {k: round(med[k] / med["plain"], 3) for k in med},
        "peak_rss_growth_mb": {k: round(v, 1) for k, v in mem.items()},
        "peak_rss_growth_ratio_vs_plain": {k: round(mem[k] / mem["plain"], 2) for k in mem},
        "max_rel_diff_observer_vs_dense_stats": agree,
    }
    print(
        f"{data.num_tokens} calibration tokens, {len(layers)} MoE layers x {layers[0].num_experts} experts "
        f"(top-{layers[0].top_k}), {args.threads} thread(s), {args.dtype}, median of {args.repeats}"
    )
    print(f"{'pass':<14}{'seconds':>9}{'/ plain':>9}{'peak +RSS MB':>14}{'vs plain':>10}")
    for k in PASSES:
        print(
            f"{k:<14}{med[k]:>9.3f}{med[k] / med['plain']:>9.3f}{mem[k]:>14.1f}{mem[k] / mem['plain']:>10.2f}"
        )
    print(f"observer vs dense reference statistics: max relative difference {agree:.2e}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


def report_short(args, model, data: TokenSet, med: dict, med_cpu: dict, load: tuple) -> None:
    """The observer's wall and CPU time against a plain forward's (and peak RSS), in memory or layer by
    layer."""
    mem = {} if args.no_memory else {k: peak_rss_mb(args, k) for k in LAYER_PASSES}
    layers = model.moe_indices if args.layers else moe_layers(model)
    cfg = model.config.get_text_config()
    mode = "layer by layer" if args.layers else "in memory"
    result = {
        "model": args.model,
        "mode": mode,
        "experts": getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None),
        "top_k": cfg.num_experts_per_tok,
        "moe_layers": len(layers),
        "tokens": data.num_tokens,
        "batch": args.batch,
        "threads": args.threads,
        "dtype": args.dtype,
        "load_average_before_after": [round(x, 2) for x in load[0] + load[1]],
        "seconds_median": {k: round(v, 3) for k, v in med.items()},
        "cpu_seconds_median": {k: round(v, 3) for k, v in med_cpu.items()},
        "time_ratio_vs_plain": {k: round(med[k] / med["plain"], 3) for k in med},
        "cpu_ratio_vs_plain": {k: round(med_cpu[k] / med_cpu["plain"], 3) for k in med_cpu},
        "peak_rss_growth_mb": {k: round(v, 1) for k, v in mem.items()},
    }
    print(
        f"{mode}: {data.num_tokens} tokens, batch {args.batch}, {len(layers)} MoE layers x "
        f"{result['experts']} experts (top-{result['top_k']}), {args.threads} thread(s), {args.dtype}, "
        f"median of {args.repeats}; load average {load[0][0]:.1f} before, {load[1][0]:.1f} after"
    )
    print(f"{'pass':<10}{'seconds':>9}{'/ plain':>9}{'cpu s':>9}{'/ plain':>9}{'peak +RSS MB':>14}")
    for k in LAYER_PASSES:
        print(
            f"{k:<10}{med[k]:>9.3f}{med[k] / med['plain']:>9.3f}{med_cpu[k]:>9.3f}"
            f"{med_cpu[k] / med_cpu['plain']:>9.3f}{mem.get(k, float('nan')):>14.1f}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
