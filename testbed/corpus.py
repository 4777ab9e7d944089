"""Build the testbed corpus (5 domains, seeded splits) and its BPE tokenizer.

Domains
    en     English man pages (Debian package ``manpages``), roff markup stripped
    de     German man pages (``manpages-de``)
    fr     French man pages (``manpages-fr``)
    code   Python standard-library source files of the running interpreter
    arith  synthetic arithmetic with exact answers: ``a+b=c``, ``a-b=c`` (2-digit operands),
           ``a*b=c`` (2-digit x 1-digit); 10% of operand pairs are held out for test, 5% for val

Every document goes to exactly one split, chosen by a seeded hash of its name:
test 6%, val 4%, search 3%, calib 3%, train the rest. Rows are ``{"text", "domain"}`` jsonl.

Usage::

    python testbed/corpus.py --out testbed/work/corpus            # full build (~1-2 min)
    python testbed/corpus.py --out /tmp/c --small                  # CI-sized build (seconds)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

DOMAINS = ("en", "de", "fr", "code", "arith")
SPLITS = ("train", "val", "test", "search", "calib")
SPLIT_FRACTIONS = (("test", 0.06), ("val", 0.04), ("search", 0.03), ("calib", 0.03))
MAN_PACKAGES = {"en": "manpages", "de": "manpages-de", "fr": "manpages-fr"}
CHUNK_CHARS = 3000
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>"]

# ----------------------------------------------------------------------------- text sources


def _hash01(key: str, seed: int) -> float:
    h = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def split_of(key: str, seed: int) -> str:
    u = _hash01(key, seed)
    acc = 0.0
    for name, frac in SPLIT_FRACTIONS:
        acc += frac
        if u < acc:
            return name
    return "train"


_ESC = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\s[+-]?\d"), ""),  # size changes
    (re.compile(r"\\\*\((..)"), ""),  # strings
    (re.compile(r"\\\*\[[^\]]*\]"), ""),
    (re.compile(r"\\\*."), ""),
    (re.compile(r"\\\(em|\\\(en"), "-"),
    (re.compile(r"\\\(lq|\\\(rq|\\\(dq"), '"'),
    (re.compile(r"\\\(aq"), "'"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^,/:%]"), ""),
    (re.compile(r"\\[ ~0]"), " "),
    (re.compile(r"\\c$"), ""),
]
_KEEP_ARGS = {
    "B",
    "I",
    "BI",
    "IB",
    "BR",
    "RB",
    "IR",
    "RI",
    "SH",
    "SS",
    "TP",
    "IP",
    "UR",
    "MT",
    "Nm",
    "Nd",
    "Sh",
}


def roff_to_text(src: str) -> str:
    """Strip roff/man markup to plain prose (good enough for language-model text, not for display)."""
    out: list[str] = []
    for line in src.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].strip().split(None, 1)
            if not parts:
                continue
            macro, args = parts[0], (parts[1] if len(parts) > 1 else "")
            if macro in _KEEP_ARGS and args:
                args = args.replace('"', "")
                if macro in ("SH", "SS", "Sh"):
                    out.append("")
                    line = args
                elif macro in ("TP", "IP"):
                    line = args if not re.fullmatch(r"[\d.]+[nimv]?", args.strip()) else ""
                else:
                    line = args
            elif macro in ("PP", "LP", "P", "sp", "br", "Pp"):
                out.append("")
                continue
            else:
                continue
        for pat, rep in _ESC:
            line = pat.sub(rep, line)
        out.append(line.rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def _package_files(pkg: str) -> list[Path]:
    try:
        listing = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(
            f"Debian package {pkg!r} is missing (see testbed/requirements-apt.txt): {err}"
        ) from err
    files = [Path(p) for p in listing.splitlines() if re.search(r"/man/.*\.\d\w*(\.gz)?$", p)]
    return sorted(p for p in files if p.is_file() and not p.is_symlink())


def man_documents(domain: str) -> list[tuple[str, str]]:
    """(key, text) for every man page of the domain's Debian package, sorted by path."""
    docs = []
    for path in _package_files(MAN_PACKAGES[domain]):
        raw = gzip.open(path, "rb").read() if path.suffix == ".gz" else path.read_bytes()
        src = raw.decode("utf-8", errors="replace")
        if src.lstrip().startswith(".so "):
            continue  # alias page
        text = roff_to_text(src)
        if len(text) > 200:
            docs.append((path.name, text))
    return docs


def code_documents() -> list[tuple[str, str]]:
    """(key, text) for the interpreter's pure-Python stdlib modules (tests, idlelib, etc. excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "pydoc_data", "encodings"}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if skip & set(rel.parts) or path.stat().st_size > 200_000:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) > 200:
            docs.append((str(rel), text))
    return docs


# ----------------------------------------------------------------------------- synthetic arithmetic

ARITH_OPS = ("+", "-", "*")


def arith_answer(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arith_pairs() -> dict[str, list[tuple[int, int]]]:
    """All operand pairs per operator: 2-digit +/- 2-digit (a >= b for -), 2-digit * 1-digit (2..9)."""
    return {
        "+": [(a, b) for a in range(10, 100) for b in range(10, 100)],
        "-": [(a, b) for a in range(10, 100) for b in range(10, 100) if a >= b],
        "*": [(a, b) for a in range(10, 100) for b in range(2, 10)],
    }


def pair_split(op: str, a: int, b: int, seed: int) -> str:
    """Operand pairs are split too: 10% appear only in test, 5% only in val, the rest in train/search/calib."""
    u = _hash01(f"pair{op}{a},{b}", seed)
    return "test" if u < 0.10 else "val" if u < 0.15 else "train"


def arith_line(rng: random.Random, seed: int, pool: str, pairs: dict) -> str:
    op = rng.choices(ARITH_OPS, weights=(1, 1, 2))[0]
    while True:
        a, b = rng.choice(pairs[op])
        if pair_split(op, a, b, seed) == pool:
            return f"{a}{op}{b}={arith_answer(a, op, b)}"


def arith_documents(n_docs: int, seed: int, split: str) -> list[str]:
    """Documents of 8-16 problems, one per line; test/val use their own held-out operand pairs."""
    rng = random.Random(f"arith-{split}-{seed}")
    pairs = arith_pairs()
    pool = split if split in ("test", "val") else "train"
    return [
        "\n".join(arith_line(rng, seed, pool, pairs) for _ in range(rng.randint(8, 16)))
        for _ in range(n_docs)
    ]


# ----------------------------------------------------------------------------- assembly


def chunk(text: str, size: int = CHUNK_CHARS) -> list[str]:
    """Split on paragraph boundaries into pieces of at most ~size characters."""
    pieces, cur = [], ""
    for para in text.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            pieces.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
        while len(cur) > 2 * size:
            pieces.append(cur[:size])
            cur = cur[size:]
    if cur.strip():
        pieces.append(cur)
    return pieces


def build_corpus(out: Path, seed: int, small: bool) -> dict:
    """Write <out>/<split>.jsonl (all domains) and return per-split/domain counts."""
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    max_docs = 40 if small else None
    for dom in DOMAINS:
        if dom == "arith":
            n_train = 300 if small else 60_000
            n_other = {"test": 400, "val": 300, "search": 200, "calib": 200}
            if small:
                n_other = {k: 20 for k in n_other}
            for split in SPLITS:
                for text in arith_documents(n_train if split == "train" else n_other[split], seed, split):
                    rows[split].append({"text": text, "domain": dom})
            continue
        docs = code_documents() if dom == "code" else man_documents(dom)
        if max_docs:
            docs = docs[:: max(1, len(docs) // max_docs)][:max_docs]
        for key, text in docs:
            split = split_of(f"{dom}/{key}", seed)
            rows[split].extend({"text": t, "domain": dom} for t in chunk(text))
    counts = {}
    for split, rs in rows.items():
        random.Random(f"shuffle-{split}-{seed}").shuffle(rs)
        with open(out / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in rs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[split] = {d: sum(len(r["text"]) for r in rs if r["domain"] == d) for d in DOMAINS}
    (out / "counts.json").write_text(json.dumps({"seed": seed, "small": small, "chars": counts}, indent=1))
    return counts


def train_tokenizer(corpus: Path, out: Path, vocab_size: int, seed: int) -> None:
    """Byte-level BPE, one token per digit, saved as a PreTrainedTokenizerFast with bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )

    def texts():
        with open(corpus / "train.jsonl", encoding="utf-8") as f:
            for i, line in enumerate(f):
                r = json.loads(line)
                # arithmetic is highly repetitive: a sample of it is enough for the merges
                if r["domain"] != "arith" or i % 20 == 0:
                    yield r["text"]

    tok.train_from_iterator(texts(), trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        padding_side="left",
    )
    fast.model_max_length = 1024
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("testbed/work/corpus"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab-size", type=int, default=6000)
    p.add_argument("--small", action="store_true", help="few documents per domain (CI determinism check)")
    args = p.parse_args(argv)
    counts = build_corpus(args.out, args.seed, args.small)
    train_tokenizer(args.out, args.out / "tokenizer", args.vocab_size, args.seed)
    json.dump(counts, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
