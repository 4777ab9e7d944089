"""Write the shipped testbed: bf16 checkpoint + tokenizer, and the evaluation / search / calibration data.

Outputs (paths inside the package, ``src/moeprune/assets/testbed/``)::

    model/                    config.json, model.safetensors (bf16), tokenizer files
    data/test.jsonl           held-out text per domain ({"text", "domain"}), ~25k tokens per domain
    data/generation.jsonl     200 arithmetic prompts on held-out operand pairs ({"prompt", "answer", "op"})
    data/multiple_choice.jsonl 200 items: pick the right result among 4 ({"prompt", "options", "answer"})
    data/search.jsonl         search split, per domain (never test)
    data/search_prompts.jsonl the search split's arithmetic questions ({"prompt": "a+b=", "domain"}), for
                              on-policy search data: the model answers them, only its answers are scored
    data/calibration.jsonl    calibration split, per domain (never test)
    data/meta.json            seed, sizes, unigram-baseline perplexity per domain
    training_curve.jsonl      the training log

Usage::

    python testbed/export.py --work testbed/work --tag main
    python testbed/export.py --data-only --tokenizer testbed/work/corpus/tokenizer   # data without a model
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import shutil
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import DOMAINS, arith_answer, arith_pairs, pair_split  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "moeprune" / "assets" / "testbed"
TEST_TOKENS = 25_000
SPLIT_CHARS = {"search": 40_000, "calib": 40_000}
N_ITEMS = 200


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def cap_rows(rows: list[dict], budget, size) -> list[dict]:
    """Keep rows in order while the domain's running size (``size(row)``) stays under ``budget``."""
    used: Counter = Counter()
    out = []
    for r in rows:
        d = r["domain"]
        if used[d] >= budget:
            continue
        out.append(r)
        used[d] += size(r)
    return out


def test_pairs(seed: int) -> list[tuple[str, int, int]]:
    return [
        (op, a, b) for op, ps in arith_pairs().items() for a, b in ps if pair_split(op, a, b, seed) == "test"
    ]


def generation_items(seed: int, n: int = N_ITEMS) -> list[dict]:
    """n prompts ``a<op>b=`` on held-out (test-only) operand pairs, equal share per operator."""
    rng = random.Random(f"gen-{seed}")
    pairs = test_pairs(seed)
    items = []
    for k, op in enumerate(("+", "-", "*")):
        pool = [p for p in pairs if p[0] == op]
        take = n // 3 + (1 if k < n % 3 else 0)
        for _, a, b in rng.sample(pool, min(take, len(pool))):
            items.append({"prompt": f"{a}{op}{b}=", "answer": str(arith_answer(a, op, b)), "op": op})
    rng.shuffle(items)
    return items


def multiple_choice_items(seed: int, n: int = N_ITEMS) -> list[dict]:
    """Pick the right result among 4: the answer and 3 near misses (+-1, +-2, +-10, +-20, +-b for ``*``),
    each option scored as the continuation ``"<value>\\n"``; held-out operand pairs only."""
    rng = random.Random(f"mc-{seed}")
    pairs = test_pairs(seed)
    items = []
    for _ in range(n):
        op, a, b = rng.choice(pairs)
        c = arith_answer(a, op, b)
        deltas = [1, -1, 2, -2, 10, -10, 20, -20] + ([b, -b] if op == "*" else [])
        cands = sorted({c + d for d in deltas if c + d >= 0 and c + d != c})
        wrong = rng.sample(cands, 3)
        opts = [*wrong, c]
        rng.shuffle(opts)
        items.append(
            {"prompt": f"{a}{op}{b}=", "options": [f"{v}\n" for v in opts], "answer": opts.index(c), "op": op}
        )
    return items


def unigram_ppl(tokenizer, train_rows: list[dict], test_rows: list[dict]) -> dict[str, float]:
    """Perplexity of an add-one unigram model fit on each domain's train tokens, on the same test
    tokens that ``perplexity_by_domain`` scores (first token of each 512-window excluded)."""
    from moeprune.evaluate.perplexity import domain_token_streams

    counts: dict[str, Counter] = {d: Counter() for d in DOMAINS}
    for r in train_rows:
        counts[r["domain"]].update(tokenizer(r["text"])["input_ids"])
        counts[r["domain"]][tokenizer.eos_token_id] += 1
    out = {}
    vocab = len(tokenizer)
    for dom, ids in domain_token_streams(tokenizer, test_rows, 20_000).items():
        c = counts[dom]
        total = sum(c.values()) + vocab
        scored = [t for i, t in enumerate(ids) if i % 512 != 0]
        nll = -sum(math.log((c[t] + 1) / total) for t in scored) / len(scored)
        out[dom] = round(math.exp(nll), 2)
    return out


def search_prompts(search_rows: list[dict]) -> list[dict]:
    """Every distinct ``a<op>b=`` question of the search split's arithmetic lines, in order of first
    appearance (the search split never shares an operand pair with the generation or MC items)."""
    seen: dict[str, None] = {}
    for row in search_rows:
        if row["domain"] == "arith":
            for line in row["text"].split("\n"):
                if re.fullmatch(r"\d+[-+*]\d+=\d+", line):
                    seen.setdefault(line.split("=")[0] + "=", None)
    return [{"prompt": q, "domain": "arith"} for q in seen]


def export_data(corpus: Path, tokenizer, seed: int, out: Path) -> dict:
    def ntok(r: dict) -> int:
        return len(tokenizer(r["text"])["input_ids"]) + 1

    test_rows = cap_rows(read_jsonl(corpus / "test.jsonl"), TEST_TOKENS, ntok)
    write_jsonl(out / "test.jsonl", test_rows)
    for split, name in (("search", "search"), ("calib", "calibration")):
        rows = cap_rows(read_jsonl(corpus / f"{split}.jsonl"), SPLIT_CHARS[split], lambda r: len(r["text"]))
        write_jsonl(out / f"{name}.jsonl", rows)
    write_jsonl(out / "search_prompts.jsonl", search_prompts(read_jsonl(out / "search.jsonl")))
    write_jsonl(out / "generation.jsonl", generation_items(seed))
    write_jsonl(out / "multiple_choice.jsonl", multiple_choice_items(seed))
    meta = {
        "seed": seed,
        "domains": list(DOMAINS),
        "unigram_ppl": unigram_ppl(tokenizer, read_jsonl(corpus / "train.jsonl"), test_rows),
        "files": {p.name: p.stat().st_size for p in sorted(out.glob("*.jsonl"))},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def load_run(run: Path, tok_dir: Path, from_ckpt: bool = False):
    """The trained model of a run: ``final/`` or, with ``from_ckpt`` (crashed/unfinished run), ``ckpt.pt``
    loaded into the default architecture of ``train.py``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

    if not from_ckpt:
        return AutoModelForCausalLM.from_pretrained(run / "final", dtype=torch.float32)
    from train import model_config

    args = json.loads((run / "args.json").read_text()) if (run / "args.json").exists() else {}
    ns = argparse.Namespace(
        **{
            k: int(args.get(k, v))
            for k, v in (("hidden", 192), ("moe_inter", 96), ("layers", 8), ("experts", 32))
        }
    )
    model = Qwen3MoeForCausalLM(model_config(AutoTokenizer.from_pretrained(tok_dir), ns))
    model.load_state_dict(torch.load(run / "ckpt.pt", weights_only=False)["model"])
    return model


def curve_lines(run: Path) -> list[str]:
    """The training log of a run, preceded by its parent's up to the start step when it continued
    another run (``train.py --init-from``)."""
    lines = (run / "curve.jsonl").read_text().splitlines()
    args = json.loads((run / "args.json").read_text()) if (run / "args.json").exists() else {}
    parent = args.get("init_from")
    if parent not in (None, "None"):
        first = json.loads(lines[0])["step"] if lines else 0
        before = [x for x in curve_lines(Path(parent).parent) if json.loads(x)["step"] < first]
        lines = before + lines
    return lines


def export_model(run: Path, out: Path, tok_dir: Path, from_ckpt: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer

    model = load_run(run, tok_dir, from_ckpt)
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("testbed/work"))
    p.add_argument("--tag", default="main")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--assets", type=Path, default=ASSETS)
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--model-only", action="store_true")
    p.add_argument("--from-ckpt", action="store_true", help="export the last checkpoint of an unfinished run")
    args = p.parse_args(argv)
    corpus = args.work / "corpus"
    tok = AutoTokenizer.from_pretrained(corpus / "tokenizer")
    if not args.model_only:
        meta = export_data(corpus, tok, args.seed, args.assets / "data")
        print(json.dumps(meta, indent=1))
    if not args.data_only:
        run = args.work / f"run-{args.tag}"
        export_model(run, args.assets / "model", corpus / "tokenizer", args.from_ckpt)
        (args.assets / "training_curve.jsonl").write_text("".join(x + "\n" for x in curve_lines(run)))
        print(f"model -> {args.assets / 'model'}")


if __name__ == "__main__":
    main()
