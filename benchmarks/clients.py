"""The testbed, unpruned and pruned by moeprune, in the tools people serve and quantize with:
llama.cpp (GGUF, through llama-cpp-python) and llm-compressor. Writes benchmarks/results/clients.txt.

    PYTHONPATH=src .venv/bin/python benchmarks/clients.py \
        --gguf-python ~/clients-venv/bin/python --llama-cpp DIR/vendor/llama.cpp \
        --llmc-python ~/llmc-venv/bin/python

The clients live in their own virtual environments (see docs/serving.md for the install commands) and
run as subprocesses (`clients_worker.py`); the moeprune side (pruning, transformers reference, metrics)
runs here. For each model (the testbed and its uniform prune at --sparsity with the frequency criterion):

- transformers (float32 compute on the bf16 weights): the reference;
- GGUF f16 and Q8_0, converted by llama.cpp's own convert_hf_to_gguf.py and run by llama-cpp-python
  (logits_all=True) on the SAME token ids (the transformers tokenizer's), so the comparison isolates the
  model. Metrics against the reference over every position of the held-out windows: max |dlogit| / range
  (per position, |dlogit| divided by that position's reference logit range max-min, then the max over
  positions), top-1 agreement, perplexity on the windows, greedy exact match on the generation items
  (scored as moeprune's suite does: text up to the first newline, stripped) and how often the answer
  equals transformers'. Separately, llama.cpp's own tokenizer: how many prompts/texts it tokenizes
  exactly like transformers, and exact match when llama.cpp tokenizes and detokenizes itself;
- llm-compressor: one-shot GPTQ W4A16 (default) on the CPU with a few calibration samples, saved as
  compressed-tensors, reloaded with transformers; perplexity and exact match.

Goals (issue 16): GGUF f16 max |dlogit| <= 1e-2 of the logit range and top-1 agreement >= 99%; Q8_0 exact
match within 2 points of transformers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "src/moeprune/assets/testbed/data"
MODEL = ROOT / "src/moeprune/assets/testbed/model"
WORKER = Path(__file__).resolve().parent / "clients_worker.py"
RESULT = Path(__file__).resolve().parent / "results/clients.txt"
TIE = 5e-3  # router gap (logits) below which a position counts as a routing near-tie
# (outtype, f32 KV cache?, label): llama.cpp's defaults (f16 KV cache) for f16/Q8_0, and f32 weights with an
# f32 KV cache as the exactness check of the conversion itself
GGUF_RUNS = (("f32", True, "GGUF F32, f32 KV"), ("f16", False, "GGUF F16"), ("q8_0", False, "GGUF Q8_0"))

INSTALL = """\
Install the clients into their own virtual environments (docs/serving.md):
  python3 -m venv ~/clients-venv
  ~/clients-venv/bin/pip install torch==2.13.0 numpy gguf transformers sentencepiece 'protobuf<5'
  ~/clients-venv/bin/pip install llama-cpp-python          # builds llama.cpp for the CPU
  pip download --no-deps --no-binary :all: llama-cpp-python   # its sdist ships vendor/llama.cpp
  python3 -m venv ~/llmc-venv && ~/llmc-venv/bin/pip install torch==2.13.0 llmcompressor
then pass --gguf-python, --llama-cpp (the unpacked sdist's vendor/llama.cpp) and --llmc-python, or set
MOEPRUNE_GGUF_PYTHON, MOEPRUNE_LLAMA_CPP and MOEPRUNE_LLMC_PYTHON."""


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _probe(python: str | None, code: str) -> str | None:
    """None when `python` runs `code`; else why not (one line)."""
    if not python:
        return "not given"
    if not Path(python).exists():
        return f"{python} does not exist"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit {done.returncode}"
    return None


def check_clients(args) -> None:
    problems = []
    why = _probe(args.gguf_python, "import llama_cpp, gguf, transformers, numpy")
    if why:
        problems.append(f"--gguf-python ({args.gguf_python}): {why}")
    if not args.llama_cpp or not Path(args.llama_cpp, "convert_hf_to_gguf.py").is_file():
        problems.append(f"--llama-cpp ({args.llama_cpp}): no convert_hf_to_gguf.py there")
    if not args.no_llmc:
        why = _probe(args.llmc_python, "import llmcompressor, compressed_tensors, transformers")
        if why:
            problems.append(f"--llmc-python ({args.llmc_python}): {why} (or pass --no-llmc REASON)")
    if problems:
        raise SystemExit("clients.py: the clients are missing:\n  " + "\n  ".join(problems) + "\n" + INSTALL)


def _worker(python: str, *argv: str, log: Path) -> None:
    t0 = time.perf_counter()
    done = subprocess.run([python, str(WORKER), *argv], capture_output=True, text=True)
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-25:])
        raise SystemExit(f"clients_worker {argv[0]} failed (log: {log}):\n{tail}")
    print(f"  {argv[0]} {Path(argv[-1]).name}: {time.perf_counter() - t0:.0f}s", flush=True)


def prune(sparsity: float, out: Path) -> None:
    cmd = [sys.executable, "-c", "from moeprune.cli import main; main()", "prune", str(MODEL)]
    cmd += ["--criterion", "frequency", "--sparsity", str(sparsity)]
    cmd += ["--data", str(DATA / "calibration.jsonl"), "--out", str(out), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"moeprune prune failed:\n{done.stderr[-3000:]}")


def make_job(tok, args) -> dict:
    from moeprune.evaluate.perplexity import domain_token_streams

    streams = domain_token_streams(tok, _jsonl(DATA / "test.jsonl"), args.tokens_per_domain)
    windows = [
        ids[i : i + args.seq_len] for ids in streams.values() for i in range(0, len(ids), args.seq_len)
    ]
    windows = [w for w in windows if len(w) >= 2]
    items = _jsonl(DATA / "generation.jsonl")[: args.items]
    texts = [r["text"] for r in _jsonl(DATA / "test.jsonl")][: args.tokenizer_texts]
    calib = [tok(r["text"])["input_ids"][: args.seq_len] for r in _jsonl(DATA / "calibration.jsonl")]
    return {
        "windows": windows,
        "items": items,
        "prompts": [tok(it["prompt"])["input_ids"] for it in items],
        "prompt_texts": [it["prompt"] for it in items],
        "texts": texts,
        "text_ids": [tok(t)["input_ids"] for t in texts],
        "max_new_tokens": args.max_new_tokens,
        "eos_id": tok.eos_token_id,
        "calibration": calib[: args.calib_samples],
    }


def reference(model_dir: Path, tok, job: dict) -> dict:
    """transformers, float32 compute: logits per window and the suite's greedy exact match."""
    from moeprune import load
    from moeprune.evaluate.generation import generation_exact_match

    model = load(model_dir, dtype=torch.float32)
    logits, margins = [], []
    with torch.inference_mode():
        for w in job["windows"]:
            out = model(torch.tensor([w]), output_router_logits=True)
            logits.append(out.logits[0].numpy())
            margins.append(_router_margin(out, len(w), model.config.num_experts_per_tok))
    logits = np.concatenate(logits)
    em = generation_exact_match(model, tok, job["items"], job["max_new_tokens"], return_predictions=True)
    n_exp = {getattr(model.config, "num_local_experts", None), getattr(model.config, "num_experts", None)}
    return {
        "logits": logits,
        "margin": np.concatenate(margins),
        "predictions": em["predictions"],
        "experts": max(x for x in n_exp if x is not None),
        "bytes": sum(f.stat().st_size for f in model_dir.glob("*.safetensors")),
    }


def _router_margin(out, n: int, top_k: int) -> np.ndarray:
    """Per position, the smallest gap over MoE layers between the router's top_k-th and next logit: a
    near-zero gap is a routing near-tie, where a tiny numeric change swaps an expert."""
    gaps = []
    for r in getattr(out, "router_logits", None) or ():
        top = r.reshape(n, -1).float().topk(top_k + 1, dim=-1).values
        gaps.append(top[:, top_k - 1] - top[:, top_k])
    return torch.stack(gaps).min(0).values.numpy() if gaps else np.full(n, np.inf)


def _ppl(logits: np.ndarray, windows: list[list[int]]) -> float:
    nll, n, at = 0.0, 0, 0
    for w in windows:
        lg = torch.from_numpy(logits[at : at + len(w) - 1]).double()
        tgt = torch.tensor(w[1:])
        nll -= torch.log_softmax(lg, -1).gather(-1, tgt[:, None]).sum().item()
        n += len(w) - 1
        at += len(w)
    return math.exp(nll / n)


def compare(ref: dict, logits: np.ndarray, preds: list[str], job: dict) -> dict:
    from moeprune.evaluate.generation import normalize_answer

    r = ref["logits"]
    delta = np.abs(logits - r).max(-1)
    rng = r.max(-1) - r.min(-1)
    answers = [str(it["answer"]).strip() for it in job["items"]]
    preds = [normalize_answer(p) for p in preds]
    rel = delta / rng
    over = rel > 1e-2
    return {
        "ppl": _ppl(logits, job["windows"]),
        "max_abs": float(delta.max()),
        "max_rel": float(rel.max()),
        "p99_rel": float(np.quantile(rel, 0.99)),
        "n_over": int(over.sum()),
        "n_over_tie": int((over & (ref["margin"] < TIE)).sum()),
        "positions": int(len(rel)),
        "top1": float((logits.argmax(-1) == r.argmax(-1)).mean()),
        "em": float(np.mean([p == a for p, a in zip(preds, answers, strict=True)])),
        "same_answer": float(np.mean([p == q for p, q in zip(preds, ref["predictions"], strict=True)])),
    }


def run_model(label: str, model_dir: Path, work: Path, args, rows: list[dict]) -> None:
    from transformers import AutoTokenizer

    print(f"{label}: {model_dir}", flush=True)
    tok = AutoTokenizer.from_pretrained(model_dir)
    job = make_job(tok, args)
    job_file = work / f"{label}-job.json"
    job_file.write_text(json.dumps(job))
    ref = reference(model_dir, tok, job)
    own = compare(ref, ref["logits"], ref["predictions"], job)
    rows.append(
        {
            "model": label,
            "backend": "transformers fp32",
            "bytes": ref["bytes"],
            **own,
            "experts": ref["experts"],
        }
    )

    for outtype, kv_f32, name in GGUF_RUNS:
        gguf = work / f"{label}-{outtype}.gguf"
        _worker(args.gguf_python, "convert", "--llama-cpp", args.llama_cpp, "--model", str(model_dir),
                "--outtype", outtype, "--outfile", str(gguf), log=work / f"{label}-{outtype}-convert.log")  # fmt: skip
        prefix = str(work / f"{label}-{outtype}")
        _worker(args.gguf_python, "llama", "--gguf", str(gguf), "--job", str(job_file), "--threads",
                str(args.threads), *(["--kv-f32"] if kv_f32 else []), "--out", prefix,
                log=work / f"{label}-{outtype}-llama.log")  # fmt: skip
        info = json.loads(Path(prefix + ".json").read_text())
        preds = [tok.decode(g, skip_special_tokens=True) for g in info["gen"]]
        m = compare(ref, np.load(prefix + ".npy"), preds, job)
        own_em = compare(ref, ref["logits"], info["own_gen_text"], job)["em"]
        tok_prompts = np.mean([a == b for a, b in zip(info["own_prompt_ids"], job["prompts"], strict=True)])
        tok_texts = np.mean([a == b for a, b in zip(info["own_text_ids"], job["text_ids"], strict=True)])
        rows.append({"model": label, "backend": f"{name} (llama.cpp)", "bytes": info["file_bytes"],
                     "experts": info["n_expert"], **m, "own_em": own_em, "tok_prompts": float(tok_prompts),
                     "tok_texts": float(tok_texts)})  # fmt: skip

    if args.no_llmc:
        rows.append({"model": label, "backend": "llm-compressor", "reason": args.no_llmc})
        return
    prefix = str(work / f"{label}-llmc")
    wd = work / f"{label}-llmc"
    wd.mkdir(exist_ok=True)
    _worker(args.llmc_python, "llmc", "--model", str(model_dir), "--job", str(job_file), "--scheme", args.scheme,
            "--algorithm", args.algorithm, "--workdir", str(wd), "--threads", str(args.threads), "--out", prefix,
            log=work / f"{label}-llmc.log")  # fmt: skip
    info = json.loads(Path(prefix + ".json").read_text())
    preds = [tok.decode(g, skip_special_tokens=True) for g in info["gen"]]
    m = compare(ref, np.load(prefix + ".npy"), preds, job)
    rows.append({"model": label, "backend": f"llm-compressor {args.algorithm.upper()} {args.scheme}",
                 "bytes": info["file_bytes"], "experts": ref["experts"], **m, "fmt": info["format"]})  # fmt: skip


def _versions(python: str, mods: str) -> str:
    code = f"import importlib.metadata as m; print(' '.join(f'{{p}}=={{m.version(p)}}' for p in {mods!r}.split()))"
    done = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return done.stdout.strip() or done.stderr.strip().splitlines()[-1]


def table(rows: list[dict], args, seconds: float, job_shape: str) -> str:
    cols = f"{'E/layer':>7} {'MB':>6} {'ppl':>8} {'max rel':>8} {'p99 rel':>8} {'>1e-2':>14} {'top-1':>7} {'EM':>6} {'=ref':>6}"
    head = f"{'model':<11} {'backend':<32} {cols}"
    out = [head, "-" * len(head)]
    for r in rows:
        if "reason" in r:
            out.append(f"{r['model']:<11} {r['backend']:<32} not run: {r['reason']}")
            continue
        base = f"{r['model']:<11} {r['backend']:<32} {r['experts']:>7} {r['bytes'] / 1e6:>6.1f} {r['ppl']:>8.3f} "
        if r["backend"].startswith("transformers"):
            out.append(base + f"{'-':>8} {'-':>8} {'-':>14} {'-':>7} {r['em']:>6.1%} {'-':>6}")
            continue
        over = f"{r['n_over']} ({r['n_over_tie']} tie)"
        out.append(
            base + f"{r['max_rel']:>8.1e} {r['p99_rel']:>8.1e} {over:>14} {r['top1']:>7.2%} "
            f"{r['em']:>6.1%} {r['same_answer']:>6.1%}"
        )
    out += [
        "",
        "llama.cpp's own tokenizer (GGUF rows): prompts / held-out texts tokenized exactly as transformers",
    ]
    out.append("does, and exact match when llama.cpp tokenizes the prompt and detokenizes the answer itself:")
    for r in rows:
        if "own_em" in r:
            out.append(
                f"  {r['model']:<11} {r['backend']:<32} prompts {r['tok_prompts']:.1%}  texts {r['tok_texts']:.1%}"
                f"  EM {r['own_em']:.1%}"
            )
    goals = []
    for label in dict.fromkeys(r["model"] for r in rows):
        by = {r["backend"].split(" (")[0]: r for r in rows if r["model"] == label and "reason" not in r}
        f32, f16, q8, ref = (
            by.get(k) for k in ("GGUF F32, f32 KV", "GGUF F16", "GGUF Q8_0", "transformers fp32")
        )
        if f32:
            ok = f32["max_rel"] <= 1e-4 and f32["top1"] == 1.0
            goals.append(
                f"  {label}: conversion exact (GGUF f32, f32 KV): max rel {f32['max_rel']:.1e} <= 1e-4 and top-1 "
                f"{f32['top1']:.2%} = 100%: {'PASS' if ok else 'FAIL'}"
            )
        if f16:
            goals.append(
                f"  {label}: GGUF f16 max rel {f16['max_rel']:.1e} <= 1e-2: {'PASS' if f16['max_rel'] <= 1e-2 else 'FAIL'}"
                f" (p99 {f16['p99_rel']:.1e}; {f16['n_over']} of {f16['positions']} positions over 1e-2, "
                f"{f16['n_over_tie']} of them at a routing near-tie); top-1 {f16['top1']:.2%} >= 99%: "
                f"{'PASS' if f16['top1'] >= 0.99 else 'FAIL'}"
            )
        if q8 and ref:
            gap = abs(q8["em"] - ref["em"]) * 100
            goals.append(
                f"  {label}: GGUF Q8_0 exact match {q8['em']:.1%} vs transformers {ref['em']:.1%} (gap {gap:.1f} "
                f"points <= 2): {'PASS' if gap <= 2 else 'FAIL'}"
            )
    out += ["", "Goals (issue 16):", *goals, ""]
    out += [
        f"Setup: {job_shape}. Sparsity {args.sparsity} (uniform, frequency criterion, default calibration).",
        "rel: per position, max over the vocabulary of |logit - transformers logit| divided by that position's",
        "transformers logit range (max - min); max rel / p99 rel: over all positions; >1e-2: positions with rel",
        f"> 1e-2 (tie: of them, positions whose router gap between the top_k-th and next expert is < {TIE} in",
        "some layer in transformers, where f16 rounding can swap an expert); top-1: argmax agreement over all",
        "positions; ppl: over the same windows; EM: greedy exact match on the generation items, scored as the",
        "suite does; =ref: fraction of items whose answer equals transformers'. GGUF and llm-compressor rows get",
        "the transformers tokenizer's token ids. MB: safetensors / GGUF / compressed-tensors file size.",
        "llama.cpp runs with its defaults (f16 KV cache) except the F32 row, which also uses an f32 KV cache to",
        "check the conversion itself. llm-compressor: oneshot GPTQ, ignoring lm_head and the routers, experts",
        "linearized by llmcompressor's load_quantizable_moe; reloaded with transformers (compressed-tensors).",
        f"Project: torch {torch.__version__}, {_versions(sys.executable, 'transformers')}",
        f"GGUF client: {_versions(args.gguf_python, 'llama-cpp-python gguf transformers torch')}; converter: "
        "convert_hf_to_gguf.py from the llama-cpp-python sdist's vendor/llama.cpp",
    ]
    if not args.no_llmc:
        out.append(
            f"llm-compressor client: {_versions(args.llmc_python, 'llmcompressor compressed-tensors transformers torch')}"
        )
    out.append(f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared); total {seconds:.0f}s")
    return "\n".join(out) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf-python", default=os.environ.get("MOEPRUNE_GGUF_PYTHON"))
    p.add_argument("--llama-cpp", default=os.environ.get("MOEPRUNE_LLAMA_CPP"))
    p.add_argument("--llmc-python", default=os.environ.get("MOEPRUNE_LLMC_PYTHON"))
    p.add_argument("--no-llmc", metavar="REASON", help="skip llm-compressor and record REASON in the table")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--items", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--tokens-per-domain", type=int, default=1024)
    p.add_argument("--tokenizer-texts", type=int, default=100)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--scheme", default="W8A8")
    p.add_argument("--algorithm", choices=["gptq", "rtn"], default="gptq")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="keep GGUF files, logs and checkpoints here (default: a temporary dir)")
    p.add_argument("--out", type=Path, default=RESULT)
    args = p.parse_args()
    check_clients(args)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        pruned = work / f"pruned{round(args.sparsity * 100)}"
        print(f"pruning the testbed to {pruned}", flush=True)
        prune(args.sparsity, pruned)
        rows: list[dict] = []
        run_model("unpruned", MODEL, work, args, rows)
        run_model(f"pruned-{round(args.sparsity * 100)}%", pruned, work, args, rows)
        job = json.loads((work / "unpruned-job.json").read_text())
        shape = (f"{len(job['windows'])} held-out windows of <= {args.seq_len} tokens from test.jsonl "
                 f"({sum(len(w) for w in job['windows'])} positions), {len(job['items'])} generation items, "
                 f"{args.max_new_tokens} new tokens, llm-compressor calibration {len(job['calibration'])} samples")  # fmt: skip
    text = table(rows, args, time.perf_counter() - t0, shape)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
