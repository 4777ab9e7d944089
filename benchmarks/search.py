"""EvoESAP search cost on the testbed: the default search against a straightforward reference, side by
side in one process, over several seeds and both kinds of search data.

default    what `moeprune search` runs: the hidden-state teacher cache (``cache="hidden"``, exact; the
           teacher's probabilities computed once and kept where T x V float32 fit 256 MiB, as here),
           racing on with its defaults (z = 1, 4 slices of the search batches; `moeprune.racing`,
           `execute.slices.search_scoring`), prefix reuse, the last layer's MoE block and the head on the scored rows only; search
           batches built as the pipeline builds them (``SearchSet.from_tokens(tokens, min_batches=4,
           shuffle_seed=seed)``: rows in the seed's random order, so every batch holds every domain)
           and scored by `pipelines.evoesap.search_allocation(..., racing=True)`; its budget by
           default too (population 32 x 50 generations, `EvoConfig`'s; the reference the same).
reference  a dense full-vocabulary teacher cache, a full forward per candidate, log-softmax and ESAP on
           every scored row's whole logits at once, every candidate on every token (no racing).

Search data (both searches of a seed use the same batches):
text       the search split's text windows (2 per domain x 256 tokens), every token scored;
onpolicy   what `moeprune demo` searches on: the unpruned model answers the search split's arithmetic
           questions (search_prompts.jsonl; 256 prompts, `data.continue_prompts(..., gen_tokens=8,
           stop="\\n")`), only its answers scored. Generating them is common to both searches and
           reported apart (the pipeline keeps it with the run for a resume).

Prints, per data kind: the whole-search wall time (teacher + evolution) of each search and their ratio
per seed and over all seeds (goal >= 3x); the best plan's exact (dense) ESAP of each, and their
mean over the seeds (goal: default within 0.002 of the reference); where the default search's time
goes (candidate cost in plain forwards of the same batches, timed next to the candidates; layers
run; racing's share of the work; what recomputing the teacher from the hidden cache would cost;
teacher pass); and the teacher-cache table: bytes of dense / sparse top-K / nucleus (p = 0.95,
K_max = K) / hidden on the testbed and per scored token at Qwen3's V = 151,936, H = 2048, and the
largest |ESAP - dense ESAP| over every candidate the reference searches scored (their logits scored
against each cache, outside the timed windows).

    python benchmarks/search.py [--kinds text,onpolicy] [--seeds 0,1,2]      # `moeprune search`'s 32 x 50
    python benchmarks/search.py --kinds text --json t.json & python benchmarks/search.py --kinds onpolicy --json o.json
    python benchmarks/search.py --population 16 --generations 10            # the demo's budget
    python benchmarks/search.py --device cuda --threads 4     # the same on a GPU
    python benchmarks/search.py --as-loaded --racing-z 2      # rows grouped as loaded, z = 2 (the earlier default)
    python benchmarks/search.py --dtype bfloat16              # both in the checkpoint's bfloat16 (`moeprune search`'s)
    python benchmarks/search.py --default-dtype bfloat16      # the default in bfloat16, the reference in float32

The model runs in float32 unless asked (exact ESAP is the reference's, in the reference's dtype).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau

from moeprune.allocate import (
    AllocationSpace,
    EvoConfig,
    mutate,
    plan_from_counts,
    search_counts,
    uniform_allocation,
)
from moeprune.arch import moe_layers
from moeprune.data import continue_prompts, read_rows
from moeprune.evolve import score_each
from moeprune.execute import LocalExecutor
from moeprune.fitness import CandidateEvaluator, SearchSet, run_teacher
from moeprune.pipelines.evoesap import search_allocation
from moeprune.racing import DEFAULT_SLICES, DEFAULT_Z
from moeprune.surgery import mask_experts
from moeprune.testbed import load_testbed, removal_order_for, token_split

QWEN3 = {"V": 151_936, "H": 2048}


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"{one:.1f}/{five:.1f}"


def per_token_bytes(kind: str, vocab: int, hidden: int, k: int, hidden_bytes: int = 4) -> int:
    """Bytes one scored token costs in a cache (sparse: K float32 probs + K ids + the tail mass)."""
    ids = 2 if vocab <= 32767 else 4
    sparse = k * (4 + ids) + 4  # nucleus: the same layout (zeros past each nucleus)
    return {"dense": 4 * vocab, "sparse": sparse, "nucleus": sparse, "hidden": hidden_bytes * hidden}[kind]


def shared_prefix_share(space: AllocationSpace, base: tuple[int, ...], samples: int = 4000) -> float:
    """Mean share of MoE layers before the first one a mutant changes: the most a mutant can take
    from its parent's cached prefix (the structural bound of prefix reuse)."""
    rng = np.random.Generator(np.random.PCG64(0))
    cfg, n, shares = EvoConfig(), len(space.layers), []
    for _ in range(samples):
        child = mutate(space, base, cfg, rng)
        changed = [i for i in range(n) if child[i] != base[i]]
        if changed:
            shares.append(changed[0] / n)
    return float(np.mean(shares))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class PlainProbe:
    """Times one stock forward of every search batch (the unit of cost), now and then during a search;
    the seconds it takes are excluded from that search's wall time."""

    def __init__(self, model, search: SearchSet, device: str) -> None:
        self.model, self.batches, self.device = model, search.to(device).batches, device
        self.samples: list[list[float]] = []  # per probe: seconds per batch
        self.seconds = 0.0  # spent probing

    @torch.inference_mode()
    def run(self) -> None:
        t0 = time.perf_counter()
        per = []
        for b in self.batches:
            t = time.perf_counter()
            self.model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)
            sync(self.device)
            per.append(time.perf_counter() - t)
        self.samples.append(per)
        self.seconds += time.perf_counter() - t0

    def per_batch(self) -> list[float]:
        """Median seconds of each batch's plain forward over the probes."""
        return [statistics.median(s[b] for s in self.samples) for b in range(len(self.batches))]

    def total(self) -> float:
        return sum(self.per_batch())


class TimedExecutor(LocalExecutor):
    """The local executor, recording every scoring call: (seconds, candidates, batches it covered);
    after every `every` calls the probe times a plain forward (excluded from the search's time)."""

    def __init__(self, model, teacher, probe: PlainProbe, every: int) -> None:
        super().__init__(model, teacher)
        self.probe, self.every, self.batches = probe, every, len(teacher.records)
        self.calls: list[tuple[float, int, tuple[int, int]]] = []

    def score(self, spec, candidates):
        t = time.perf_counter()
        out = super().score(spec, candidates)
        self.calls.append((time.perf_counter() - t, len(candidates), spec.slice or (0, self.batches)))
        if len(self.calls) % self.every == 1:
            self.probe.run()
        return out


def search_data(
    kind: str, seed: int, tok, model, data_dir: Path, prompts, samples: int, seq_len: int, mix: bool = True
):
    """(SearchSet as the pipeline builds it, seconds spent generating on-policy answers); `mix`: its
    rows in the seed's random order (the pipeline's), else grouped by domain as loaded."""
    t0 = time.perf_counter()
    if kind == "text":
        data, gen_s = token_split(tok, data_dir / "search.jsonl", samples, seq_len, seed), 0.0
    else:
        data = continue_prompts(model, tok, prompts, gen_tokens=8, num_samples=256, seed=seed, stop="\n")
        gen_s = time.perf_counter() - t0
    return SearchSet.from_tokens(data, min_batches=DEFAULT_SLICES, shuffle_seed=seed if mix else None), gen_s


def default_search(
    model, search, sparsity: float, order, cfg, device: str, candidate_batch: int, z: float = DEFAULT_Z
) -> dict:
    """The default search, timed from its teacher pass to its plan."""
    probe = PlainProbe(model, search, device)
    t0 = time.perf_counter()
    teacher = run_teacher(model, search, cache="hidden")
    t_teacher = time.perf_counter() - t0
    ex = TimedExecutor(model, teacher, probe, every=5)
    out = search_allocation(
        model, order, teacher, sparsity=sparsity, config=cfg, progress=False, executor=ex,
        candidate_batch=candidate_batch, racing_z=z,
    )  # fmt: skip
    wall = time.perf_counter() - t0 - probe.seconds
    per_batch = probe.per_batch()
    plain = sum(per_batch)
    eval_s = sum(s for s, _, _ in ex.calls)
    # the work the calls did, in plain forwards of the batches they covered (racing scores slices)
    work = sum(n * sum(per_batch[a:b]) for _, n, (a, b) in ex.calls)
    evaluations = out.result.evaluations
    # what the hidden cache's recompute of p = softmax(lm_head(h)) on every scored row would cost per
    # full candidate (0 when the probabilities are kept, as here where T x V fit)
    ev = CandidateEvaluator(model, run_teacher(model, search, cache="hidden", keep_probs_bytes=0))
    t = time.perf_counter()
    with torch.inference_mode():
        for sl in ev.teacher.slices:
            for i in range(0, sl.hidden.shape[0], ev.head_rows):
                ev._teacher_rows(sl, i, i + ev.head_rows)
    sync(device)
    head_extra = time.perf_counter() - t
    return {
        "outcome": out,
        "teacher": teacher,
        "wall": wall,
        "teacher_s": t_teacher,
        "eval_s": eval_s,
        "plain": plain,
        "evaluations": evaluations,
        "work_share": work / (evaluations * plain),  # racing: 1 - its saving, in plain forwards
        "cost": eval_s / work,  # one candidate's cost on the positions it was scored on, in plain forwards
        "head_extra": head_extra / plain,
        "probs_kept": teacher.cache.probs_kept,
        "kept_bytes": teacher.cache.kept_nbytes(),
        "layers": out.reuse["layers_run_fraction"],
        "hit_rate": out.reuse["hit_rate"],
        "attention_reused": out.reuse["attention_reused"],
        "tokens_saved": out.racing["saved"] if out.racing else 0.0,
        "raced_out": out.racing["raced_out"] if out.racing else 0,
        "load": load(),
    }


def reference_search(model, search, space, order, cfg, device: str, others: dict) -> dict:
    """The straightforward reference, timed from its teacher pass to its plan. Every candidate's
    logits are also scored against the `others` evaluators (other caches) outside the timed window."""
    probe = PlainProbe(model, search, device)
    t0 = time.perf_counter()
    ev = CandidateEvaluator(model, search, cache="dense", reuse=False, full_forward=True, head_rows=None)
    t_teacher = time.perf_counter() - t0
    values: dict[tuple, dict[str, float]] = {}
    eval_s, excluded = [], 0.0

    def score(counts):
        nonlocal excluded
        t = time.perf_counter()
        logits = ev.candidate_logits(plan_from_counts(space, order, counts))
        r = ev.score_logits(logits)
        eval_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        values[counts] = {"dense": r.value} | {
            name: o.score_logits(logits).value for name, o in others.items()
        }
        if len(eval_s) % 16 == 1:
            probe.run()
        excluded += time.perf_counter() - t
        return r.score

    result = search_counts(space, score_each(score), cfg)
    wall = time.perf_counter() - t0 - excluded
    plain = probe.total()
    return {
        "result": result,
        "evaluator": ev,
        "values": values,
        "wall": wall,
        "teacher_s": t_teacher,
        "eval_s": sum(eval_s),
        "plain": plain,
        "evaluations": result.evaluations,
        "cost": sum(eval_s) / (len(eval_s) * plain),
        "load": load(),
    }


@torch.inference_mode()
def pieces(model, search: SearchSet, plan, device: str, repeats: int = 3) -> dict[str, float]:
    """One candidate (`plan`) scored on the whole search set without prefix reuse, piece by piece, in
    plain forwards of the same batches (median of `repeats` interleaved rounds): the decoder layers
    replayed from layer 0 (all positions; and with the last MoE block on the scored rows only, as
    `evaluate` runs them), the candidate's head on the scored rows, log-softmax + ESAP against a dense
    teacher, the hidden cache's recomputation of the teacher (what keeping the probabilities saves);
    and whole evaluations with the hidden cache (probabilities kept where they fit), the dense cache
    and the reference."""
    hidden = CandidateEvaluator(model, run_teacher(model, search, cache="hidden"), reuse=False)
    recompute = CandidateEvaluator(
        model, run_teacher(model, search, cache="hidden", keep_probs_bytes=0), reuse=False
    )
    dense = CandidateEvaluator(model, run_teacher(model, search, cache="dense"), reuse=False)
    ref = CandidateEvaluator(model, search, cache="dense", reuse=False, full_forward=True, head_rows=None)
    step, batches = hidden.head_rows, hidden.search.batches

    def rows(states):  # the scored rows of each batch's last-layer output, in head chunks
        for b, h in enumerate(states):
            r = h.reshape(-1, h.shape[-1])[hidden.positions[b]]  # (n_b, H)
            yield from ((b, i, r[i : i + step]) for i in range(0, r.shape[0], step))

    def plain():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False)

    def layers():
        with mask_experts(model, plan):
            return hidden._run_layers(plan, [])

    def layers_scored():
        with mask_experts(model, plan):
            return hidden._run_layers(plan, [], scored_only=True)

    states = layers()
    with mask_experts(model, plan):
        logits = [(b, i, hidden.replay.head(r)) for b, i, r in rows(states)]  # (c, V) chunks

    def head():
        for _, _, r in rows(states):
            hidden.replay.head(r)

    def score():
        for b, i, chunk in logits:
            logq = torch.log_softmax(chunk.float(), dim=-1)
            teacher = dense.teacher.slices[b].rows(i, i + chunk.shape[0])
            dense.fitness.fn(logq, teacher, dense.labels[b][i : i + chunk.shape[0]])

    def teacher():
        for b, i, chunk in logits:
            recompute._teacher_rows(recompute.teacher.slices[b], i, i + chunk.shape[0])

    parts = {
        "plain": plain,
        "layers": layers,
        "layers_scored": layers_scored,
        "head": head,
        "score": score,
        "teacher": teacher,
        "eval_hidden": lambda: hidden.evaluate(plan),
        "eval_dense": lambda: dense.evaluate(plan),
        "eval_reference": lambda: ref.evaluate(plan),
    }
    seconds: dict[str, list[float]] = {k: [] for k in parts}
    for _ in range(repeats):
        for name, f in parts.items():
            t = time.perf_counter()
            f()
            sync(device)
            seconds[name].append(time.perf_counter() - t)
    unit = statistics.median(seconds["plain"])
    return {k: statistics.median(v) / unit for k, v in seconds.items()} | {"plain_s": unit, "load": load()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--data", default=None)
    p.add_argument("--kinds", default="text,onpolicy", help="search data: text, onpolicy")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--criterion", default="frequency")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--population", type=int, default=EvoConfig().population, help="`moeprune search`'s")
    p.add_argument("--generations", type=int, default=EvoConfig().generations, help="`moeprune search`'s")
    p.add_argument("--search-samples", type=int, default=2, help="text windows per domain")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64, help="the sparse cache of the cache table")
    p.add_argument("--threads", type=int, default=1, help="2 threads on 2 busy cores ran 4-30x slower")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--candidate-batch", type=int, default=1, help="default search: candidates per forward")
    p.add_argument("--racing-z", type=float, default=DEFAULT_Z, help="the default search's racing z")
    p.add_argument(
        "--as-loaded",
        action="store_true",
        help="search rows grouped by domain as loaded (not the pipeline's order)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the model's dtype in both searches (the testbed checkpoint is bfloat16, which `moeprune "
        "search` runs it in by default)",
    )
    p.add_argument(
        "--default-dtype",
        default=None,
        choices=["float32", "bfloat16"],
        help="the default search's dtype alone (its teacher too; default: --dtype); exact ESAP stays the "
        "reference's",
    )
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    args.default_dtype = args.default_dtype or args.dtype
    torch.set_num_threads(args.threads)
    kinds, seeds = args.kinds.split(","), [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()

    model, tok, model_dir, data_dir = load_testbed(args.model, args.data)  # float32: bf16 weights, exact
    model.to(args.device, getattr(torch, args.dtype))
    # the default search's model: the same weights in its dtype (float32 -> bfloat16 is exact here)
    d_model = (
        model
        if args.default_dtype == args.dtype
        else copy.deepcopy(model).to(getattr(torch, args.default_dtype))
    )
    text_cfg = model.config.get_text_config()
    calib = token_split(tok, data_dir / "calibration.jsonl", 4, args.seq_len, 0)
    order = removal_order_for(model, calib, args.criterion, 0)
    space = AllocationSpace.from_layers(moe_layers(model), sparsity=args.sparsity)
    prompts = read_rows(data_dir / "search_prompts.jsonl") if "onpolicy" in kinds else None
    print(
        f"# {datetime.datetime.now().isoformat(timespec='minutes')} | model {model_dir} (V={text_cfg.vocab_size}, "
        f"H={text_cfg.hidden_size}) | {args.criterion} order | sparsity {args.sparsity} | population "
        f"{args.population} x {args.generations} generations | seeds {seeds} | device {args.device}, "
        f"{args.threads} thread(s) of {os.cpu_count()} cores | dtype {args.default_dtype} (default) / {args.dtype} "
        f"(reference) | default's racing z {args.racing_z}, {DEFAULT_SLICES} "
        f"slices | search rows {'as loaded' if args.as_loaded else 'in the seed order'} | load average (1/5 min) {load()}",
        flush=True,
    )
    report: dict = {"settings": vars(args), "kinds": {}}
    for kind in kinds:
        runs = []
        for seed in seeds:
            search, gen_s = search_data(
                kind,
                seed,
                tok,
                model,
                data_dir,
                prompts,
                args.search_samples,
                args.seq_len,
                not args.as_loaded,
            )
            cfg = EvoConfig(population=args.population, generations=args.generations, seed=seed)
            # the other caches, scored on the reference's logits (outside its timed window)
            others = {
                kind_: CandidateEvaluator(model, run_teacher(model, search, cache=kind_, top_k=args.top_k))
                for kind_ in ("sparse", "nucleus", "hidden")
            }

            def run_default(search=search, cfg=cfg):
                return default_search(
                    d_model, search, args.sparsity, order, cfg, args.device, args.candidate_batch, args.racing_z,
                )  # fmt: skip

            def run_reference(search=search, cfg=cfg, others=others):
                return reference_search(model, search, space, order, cfg, args.device, others)

            if seed % 2 == 0:  # alternate which goes first: a load drift favours neither
                d, r = run_default(), run_reference()
            else:
                r = run_reference()
                d = run_default()
            exact = {c: v["dense"] for c, v in r["values"].items()}
            for best in (d["outcome"].best, r["result"].best):
                if best not in exact:
                    exact[best] = r["evaluator"].evaluate(plan_from_counts(space, order, best)).value
            run = {
                "seed": seed,
                "batches": [tuple(b.input_ids.shape) for b in search.batches],
                "scored": search.num_scored(),
                "positions": search.num_tokens(),
                "gen_s": gen_s,
                "default": d,
                "reference": r,
                "best_default": d["outcome"].best,
                "best_reference": r["result"].best,
                "esap_default": exact[d["outcome"].best],
                "esap_reference": exact[r["result"].best],
                "bytes": {"dense": r["evaluator"].teacher.nbytes()}
                | {k: o.teacher.nbytes() for k, o in others.items()},
            }
            if not runs:  # where one candidate's time goes, on the first seed's batches
                run["pieces"] = pieces(
                    d_model, search, plan_from_counts(space, order, uniform_allocation(space)), args.device
                )
            runs.append(run)
            print(
                f"{kind} seed {seed}: default {d['wall']:.1f}s ({d['evaluations']} candidates, load {d['load']}), "
                f"reference {r['wall']:.1f}s ({r['evaluations']}, load {r['load']}): "
                f"{r['wall'] / d['wall']:.2f}x; exact ESAP of the best plans {run['esap_default']:.5f} / "
                f"{run['esap_reference']:.5f}",
                flush=True,
            )
        print_kind(kind, runs, space, args, text_cfg)
        report["kinds"][kind] = [json_run(run) for run in runs]
    print(f"# total {time.perf_counter() - started:.0f}s; load average at the end {load()}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str) + "\n")


def print_kind(kind: str, runs: list[dict], space, args, text_cfg) -> None:
    """The tables of one kind of search data."""
    first = runs[0]
    shapes = ", ".join("x".join(map(str, s)) for s in first["batches"])
    print(f"\n## {kind}: {first['scored']} scored tokens of {first['positions']} positions, batches {shapes}")
    if kind == "onpolicy":
        print(
            f"   generating the answers: {statistics.mean(r['gen_s'] for r in runs):.1f}s (common, not counted)"
        )
    print(f"{'seed':<6}{'default s':>10}{'reference s':>12}{'ratio':>8}{'cand. def/ref':>15}"
          f"{'ESAP default':>14}{'ESAP reference':>16}{'same plan':>11}{'load d/r':>16}")  # fmt: skip
    for r in runs:
        d, ref = r["default"], r["reference"]
        print(f"{r['seed']:<6}{d['wall']:>10.1f}{ref['wall']:>12.1f}{ref['wall'] / d['wall']:>7.2f}x"
              f"{d['evaluations']:>9}/{ref['evaluations']:<5}{r['esap_default']:>14.5f}{r['esap_reference']:>16.5f}"
              f"{'yes' if r['best_default'] == r['best_reference'] else 'no':>11}"
              f"{d['load'] + ' ' + ref['load']:>16}")  # fmt: skip
    wall_d = sum(r["default"]["wall"] for r in runs)
    wall_r = sum(r["reference"]["wall"] for r in runs)
    mean_d = statistics.mean(r["esap_default"] for r in runs)
    mean_r = statistics.mean(r["esap_reference"] for r in runs)
    ratios = [r["reference"]["wall"] / r["default"]["wall"] for r in runs]
    print(f"{'all':<6}{wall_d:>10.1f}{wall_r:>12.1f}{wall_r / wall_d:>7.2f}x   (per seed {min(ratios):.2f}-"
          f"{max(ratios):.2f}x; goal >= 3x: {'met' if wall_r / wall_d >= 3 else 'NOT met'})")  # fmt: skip
    gap = mean_r - mean_d
    print(f"mean exact ESAP of the best plans: default {mean_d:.5f}, reference {mean_r:.5f}, reference - default "
          f"{gap:+.5f} (goal <= 0.002: {'met' if gap <= 0.002 else 'NOT met'})")  # fmt: skip

    # where the time goes (means over the seeds)
    def mean(side: str, key: str) -> float:
        return statistics.mean(r[side][key] for r in runs)

    d_eval, r_eval = mean("default", "eval_s"), mean("reference", "eval_s")
    d_teacher, r_teacher = mean("default", "teacher_s"), mean("reference", "teacher_s")
    d_wall, r_wall = mean("default", "wall"), mean("reference", "wall")
    print("where the time goes (means over the seeds; plain forward = a stock forward of the same batches, "
          "timed during each search)")  # fmt: skip
    print(f"  plain forward of the search set: {mean('default', 'plain'):.3f}s (default's searches), "
          f"{mean('reference', 'plain'):.3f}s (reference's)")  # fmt: skip
    print(f"  teacher pass: default (hidden cache, layer calls recorded) {d_teacher:.2f}s, reference (dense) "
          f"{r_teacher:.2f}s")  # fmt: skip
    print(f"  scoring candidates: default {d_eval:.1f}s, reference {r_eval:.1f}s ({r_eval / d_eval:.2f}x); "
          f"the rest (evolution, plans, bookkeeping): default {d_wall - d_teacher - d_eval:.1f}s, "
          f"reference {r_wall - r_teacher - r_eval:.1f}s")  # fmt: skip
    print(
        f"  reference: one candidate = {mean('reference', 'cost'):.2f} plain forwards "
        f"(a full forward, then log-softmax + ESAP on every scored row's {text_cfg.vocab_size} logits)"
    )
    work, cost = mean("default", "work_share"), mean("default", "cost")
    print(f"  default: a candidate is scored on {work:.2f} of the search set on average (racing: "
          f"{1 - work:.0%} of the work saved in plain forwards, {mean('default', 'tokens_saved'):.0%} of the "
          f"token evaluations; {mean('default', 'raced_out'):.0f} candidates dropped per search)")  # fmt: skip
    kept = all(r["default"]["probs_kept"] for r in runs)
    kept_mb = statistics.mean(r["default"]["kept_bytes"] for r in runs) / 1e6
    print(f"  default: scoring the positions it reaches costs {cost:.2f} plain forwards per full candidate "
          f"(so {work * cost:.2f} per candidate); layers run {mean('default', 'layers'):.2f} of a full forward "
          f"(prefix hit rate {mean('default', 'hit_rate'):.0%}, restarts with cached attention "
          f"{mean('default', 'attention_reused'):.0f})")  # fmt: skip
    print("  the teacher's probabilities: "
          + (f"kept in memory by the hidden cache ({kept_mb:.1f} MB, T x V float32 within its 256 MiB budget)"
             if kept else "recomputed per candidate from the hidden cache (over the budget)")
          + f"; recomputing them would cost {mean('default', 'head_extra'):.3f} plain forwards per full "
          f"candidate")  # fmt: skip
    bound = shared_prefix_share(space, first["best_default"])
    print(f"  a mutant of the first seed's best plan can take {bound:.2f} of the MoE layers from its parent "
          f"(the structural bound of exact prefix reuse, simulated)")  # fmt: skip
    target = r_wall / 3
    print(f"  3x needs the default search in {target:.1f}s or less: its teacher pass + rest take "
          f"{d_wall - d_eval:.1f}s, leaving {target - (d_wall - d_eval):.1f}s for scoring, "
          f"{(target - (d_wall - d_eval)) / (mean('default', 'evaluations') * mean('default', 'plain')):.2f} "
          f"plain forwards per candidate (now {work * cost:.2f})")  # fmt: skip
    pc, frac = first["pieces"], mean("default", "layers")
    print(f"  one candidate on the whole search set without reuse, piece by piece (first seed's batches, uniform "
          f"plan, median of 3, load {pc['load']}), in plain forwards: decoder layers {pc['layers']:.2f} "
          f"({pc['layers_scored']:.2f} with the last MoE block on the scored rows only, as scored), its head "
          f"on the scored rows {pc['head']:.2f}, log-softmax + ESAP {pc['score']:.2f}, the hidden cache's "
          f"teacher recompute {pc['teacher']:.2f} ({'not run: kept' if kept else 'run'}); whole evaluations: "
          f"hidden cache {pc['eval_hidden']:.2f}, dense cache {pc['eval_dense']:.2f}, reference "
          f"{pc['eval_reference']:.2f}")  # fmt: skip
    teacher_cost = 0.0 if kept else pc["teacher"]
    model_cost = frac * pc["layers_scored"] + pc["head"] + pc["score"] + teacher_cost
    print(f"  so a default candidate ~ {work:.2f} (racing) x ({frac:.2f} (layers run) x {pc['layers_scored']:.2f} "
          f"+ {pc['head']:.2f} + {pc['score']:.2f} + {teacher_cost:.2f}) = {work * model_cost:.2f} plain forwards "
          f"(measured in the searches: {work * cost:.2f})")  # fmt: skip
    need = (target - (d_wall - d_eval)) / (mean("default", "evaluations") * mean("default", "plain"))
    if need < work * cost:  # not met: what would meet it
        print(f"  to reach 3x ({need:.2f} per candidate): racing would have to leave {need / model_cost:.2f} of the "
              f"work (now {work:.2f}), or at today's racing the layers run would have to fall to "
              f"{(need / work - pc['head'] - pc['score'] - teacher_cost) / pc['layers_scored']:.2f} of a forward "
              f"(now {frac:.2f}; exact reuse is bounded by the mutations, above)")  # fmt: skip

    # the teacher caches
    big_dense = per_token_bytes("dense", QWEN3["V"], QWEN3["H"], args.top_k)
    print(f"teacher caches ({first['scored']} scored tokens; |dESAP| over every candidate of the reference "
          f"searches, {len(runs)} seeds, their logits scored against each cache)")  # fmt: skip
    print(f"{'cache':<16}{'bytes':>12}{'% dense':>9}{'B/token':>9}{'B/token @V=151,936':>20}{'% dense there':>15}"
          f"{'max |dESAP|':>13}{'Kendall tau':>13}")  # fmt: skip
    for name in ("dense", "sparse", "nucleus", "hidden"):
        nbytes = first["bytes"][name]
        values = [v for r in runs for v in r["reference"]["values"].values()]
        delta = max(abs(v[name] - v["dense"]) for v in values)
        tau = kendalltau([v[name] for v in values], [v["dense"] for v in values])[0]
        big = per_token_bytes(name, QWEN3["V"], QWEN3["H"], args.top_k)
        label = {"dense": "dense", "sparse": f"sparse top-{args.top_k}", "nucleus": f"nucleus .95/{args.top_k}",
                 "hidden": "hidden (default)"}[name]  # fmt: skip
        print(f"{label:<16}{nbytes:>12,}{100 * nbytes / first['bytes']['dense']:>8.2f}%"
              f"{nbytes / first['scored']:>9,.0f}{big:>20,}{100 * big / big_dense:>14.2f}%{delta:>13.2e}"
              f"{tau:>13.3f}")  # fmt: skip
    bf16 = per_token_bytes("hidden", QWEN3["V"], QWEN3["H"], args.top_k, hidden_bytes=2)
    print(f"(hidden at H = 2048: {bf16:,} B/token in bf16, {100 * bf16 / big_dense:.2f}% of dense; sparse and "
          f"nucleus at V = 151,936 store int32 ids; nucleus: p = 0.95, at most {args.top_k} tokens, stored padded "
          f"to {args.top_k}, value = the middle of its bound; hidden's bytes are the cache's, without the "
          f"probabilities it keeps where they fit; over {sum(len(r['reference']['values']) for r in runs)} "
          f"candidates)")  # fmt: skip


def json_run(run: dict) -> dict:
    keep = ("wall", "teacher_s", "eval_s", "plain", "evaluations", "cost", "load")
    d, r = run["default"], run["reference"]  # pieces (first seed only) is plain JSON
    out = {k: v for k, v in run.items() if k not in ("default", "reference")}
    out["default"] = {
        k: d[k]
        for k in (
            *keep,
            "work_share",
            "head_extra",
            "layers",
            "hit_rate",
            "tokens_saved",
            "probs_kept",
            "kept_bytes",
        )
    }
    out["default"]["racing"] = d["outcome"].racing
    out["reference"] = {k: r[k] for k in keep}
    out["reference"]["values"] = {",".join(map(str, c)): v for c, v in r["values"].items()}
    return out


if __name__ == "__main__":
    main()
