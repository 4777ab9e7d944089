"""The client side of `benchmarks/clients.py`, run by the clients' own Python (never imports moeprune).

    PY worker convert --llama-cpp DIR --model M --outtype f16 --outfile F.gguf
    PY worker llama   --gguf F.gguf --job job.json --out PREFIX
    PY worker llmc    --model M --job job.json --scheme W4A16 --workdir D --out PREFIX

`job.json` (written by clients.py) holds token ids made by the transformers tokenizer, so both sides see
the same tokens: ``windows`` (held-out text, for logits), ``prompts`` (generation prompts),
``prompt_texts``/``texts`` (to also run llama.cpp's own tokenizer), ``max_new_tokens``, ``eos_id`` and,
for llm-compressor, ``calibration`` (token-id lists). Each run writes ``PREFIX.npy`` (the next-token
logits of every window, concatenated, float32) and ``PREFIX.json`` (greedy continuations as token ids
and anything else measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import runpy
import sys
import time
from pathlib import Path

import numpy as np


def _is_starcoder_pretokenizer(pre: dict | None) -> bool:
    """HF pre-tokenizer = isolated single digits, then GPT-2's byte-level regex: StarCoder's scheme,
    which llama.cpp implements as the ``starcoder`` pre-tokenizer."""
    if not pre or pre.get("type") != "Sequence":
        return False
    steps = pre.get("pretokenizers", [])
    return (
        len(steps) == 2
        and steps[0].get("type") == "Digits"
        and steps[0].get("individual_digits") is True
        and steps[1].get("type") == "ByteLevel"
        and steps[1].get("use_regex", True) is True
        and steps[1].get("add_prefix_space") is False
    )


def convert(args) -> None:
    """Run llama.cpp's own `convert_hf_to_gguf.py`. A BPE tokenizer whose hash the converter does not
    list (the testbed's own tokenizer) is accepted only when its pre-tokenizer is exactly the
    ``starcoder`` one; every hub model's tokenizer is recognized by the converter unchanged."""
    root = Path(args.llama_cpp).resolve()
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"no convert_hf_to_gguf.py under {root}")
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base  # llama.cpp's converter package

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            tok = Path(self.dir_model) / "tokenizer.json"
            pre = json.loads(tok.read_text()).get("pre_tokenizer") if tok.is_file() else None
            if not _is_starcoder_pretokenizer(pre):
                raise
            print("clients_worker: unlisted BPE tokenizer with StarCoder's pre-tokenizer -> 'starcoder'")
            return "starcoder"

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [str(script), str(args.model), "--outtype", args.outtype, "--outfile", str(args.outfile)]
    runpy.run_path(str(script), run_name="__main__")


def _write(prefix: str, logits: list[np.ndarray], info: dict) -> None:
    np.save(prefix + ".npy", np.concatenate(logits, axis=0).astype(np.float32))
    Path(prefix + ".json").write_text(json.dumps(info))


def llama(args) -> None:
    from llama_cpp import Llama

    job = json.loads(Path(args.job).read_text())
    n_ctx = max(max(len(w) for w in job["windows"]), 64) + 64
    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(args.gguf),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        **({"type_k": 0, "type_v": 0} if args.kv_f32 else {}),  # GGML_TYPE_F32 KV cache (default: f16)
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    logits = []
    for w in job["windows"]:
        llm.reset()
        llm.eval(w)
        logits.append(np.array(llm.scores[: len(w)], dtype=np.float32))
    logits_s = time.perf_counter() - t0

    def greedy(ids: list[int]) -> list[int]:
        llm.reset()
        llm.eval(ids)
        new: list[int] = []
        for _ in range(job["max_new_tokens"]):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            new.append(nxt)
            if nxt == job["eos_id"]:
                break
            llm.eval([nxt])
        return new

    t0 = time.perf_counter()
    gen = [greedy(p) for p in job["prompts"]]
    gen_s = time.perf_counter() - t0
    # llama.cpp's own tokenizer, end to end: its token ids for the same texts, and greedy text out
    own_prompt_ids = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in job["prompt_texts"]]
    own_text_ids = [llm.tokenize(t.encode(), add_bos=True, special=False) for t in job["texts"]]
    own_gen = [greedy(ids) for ids in own_prompt_ids]
    own_gen_text = [llm.detokenize(g).decode("utf-8", errors="replace") for g in own_gen]
    info = {
        "gen": gen,
        "own_prompt_ids": own_prompt_ids,
        "own_text_ids": own_text_ids,
        "own_gen_text": own_gen_text,
        "load_s": load_s,
        "logits_s": logits_s,
        "gen_s": gen_s,
        "n_expert": _meta(llm, "expert_count"),
        "file_bytes": Path(args.gguf).stat().st_size,
    }
    _write(args.out, logits, info)


def _meta(llm, key: str):
    for k, v in llm.metadata.items():
        if k.endswith("." + key):
            return int(v)
    return None


@contextlib.contextmanager
def _without_broken_aliases():
    """transformers' `apply_patches` (used by llm-compressor's `load_quantizable_moe`) calls dir() on
    every loaded transformers module; the legacy alias `transformers.image_processing_utils_fast` then
    imports image processors that need torchvision, whose CPU build is not on PyPI. Hide such alias
    modules (those whose dir() fails to import) while loading; put them back afterwards."""
    hidden = {}
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers") and getattr(mod, "__file__", 1) is None:
            try:
                dir(mod)
            except ImportError:
                hidden[name] = sys.modules.pop(name)
    try:
        yield sorted(hidden)
    finally:
        sys.modules.update(hidden)


def llmc(args) -> None:
    """One-shot quantization with llm-compressor on the CPU, saved as compressed-tensors, reloaded with
    transformers the way llm-compressor documents for MoE models, and the same job run on it."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modeling.moe.linearize import load_quantizable_moe
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    job = json.loads(Path(args.job).read_text())
    work = Path(args.workdir)
    t0 = time.perf_counter()
    # fused 3-D experts -> one Linear per expert, so every expert is calibrated and quantized
    with _without_broken_aliases() as hidden, load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")
    ignore = ["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"]
    modifier = (
        GPTQModifier(targets="Linear", scheme=args.scheme, ignore=ignore)
        if args.algorithm == "gptq"
        else QuantizationModifier(targets="Linear", scheme=args.scheme, ignore=ignore)
    )
    calib = [{"input_ids": ids, "attention_mask": [1] * len(ids)} for ids in job["calibration"]]
    oneshot(
        model=model,
        dataset=Dataset.from_list(calib),
        recipe=[modifier],
        max_seq_length=max(len(c) for c in job["calibration"]),
        num_calibration_samples=len(calib),
    )
    out_dir = work / "compressed"
    model.save_pretrained(out_dir, save_compressed=True)
    quant_s = time.perf_counter() - t0
    del model

    t0 = time.perf_counter()
    with _without_broken_aliases(), load_quantizable_moe():
        model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    logits, gen = [], []
    with torch.inference_mode():
        for w in job["windows"]:
            logits.append(model(torch.tensor([w])).logits[0].float().numpy())
        for p in job["prompts"]:
            ids = torch.tensor([p])
            new: list[int] = []
            for _ in range(job["max_new_tokens"]):
                nxt = int(model(ids).logits[0, -1].argmax())
                new.append(nxt)
                if nxt == job["eos_id"]:
                    break
                ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
            gen.append(new)
    cfg = json.loads((out_dir / "config.json").read_text()).get("quantization_config", {})
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    _write(
        args.out,
        logits,
        {
            "gen": gen,
            "quant_s": quant_s,
            "load_s": load_s,
            "format": cfg.get("format"),
            "quant_method": cfg.get("quant_method"),
            "file_bytes": size,
            "hidden_aliases": hidden,
            "expert_module": type(model.model.layers[0].mlp.experts).__name__,
        },
    )


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert")
    c.add_argument("--llama-cpp", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--outtype", required=True)
    c.add_argument("--outfile", required=True)
    g = sub.add_parser("llama")
    g.add_argument("--gguf", required=True)
    g.add_argument("--job", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--threads", type=int, default=2)
    g.add_argument("--kv-f32", action="store_true", help="f32 KV cache instead of llama.cpp's default f16")
    q = sub.add_parser("llmc")
    q.add_argument("--model", required=True)
    q.add_argument("--job", required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--workdir", required=True)
    q.add_argument("--scheme", default="W8A8")
    q.add_argument("--algorithm", choices=["gptq", "rtn"], default="gptq")
    q.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    {"convert": convert, "llama": llama, "llmc": llmc}[args.cmd](args)


if __name__ == "__main__":
    main()
