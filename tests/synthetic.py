"""Random-weight checkpoints of any size, written one shard at a time (tests and benchmarks/scale.py).

The tensor names and shapes are what transformers' ``save_pretrained`` writes for the config: the
model is built on the meta device and its state dict reverted through the family's conversion
mapping, so a Qwen3-MoE checkpoint comes out with per-expert tensors as on the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.core_model_loading import revert_weight_conversion


def qwen3_moe_config(layers: int, experts: int, hidden: int, intermediate: int, top_k: int = 8, **kw):
    return AutoConfig.for_model(
        "qwen3_moe",
        num_hidden_layers=layers,
        num_experts=experts,
        num_experts_per_tok=top_k,
        hidden_size=hidden,
        moe_intermediate_size=intermediate,
        intermediate_size=4 * hidden,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=hidden // 8,
        vocab_size=kw.pop("vocab_size", 32000),
        tie_word_embeddings=False,
        **kw,
    )


def write_synthetic_checkpoint(out: Path, config, *, shard_bytes: int, dtype=torch.bfloat16, seed=0) -> Path:
    """Write `config` with random weights (windows of one N(0, 0.02) draw; norms 1) to `out` in shards of at most
    `shard_bytes`, with ``model.safetensors.index.json``; holds at most one shard in memory."""
    out.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in revert_weight_conversion(model, model.state_dict()).items()}
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(dtype)  # values drawn once, reused
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, weight_map, names = 0, {}, []

    def flush() -> None:
        name = f"model-{len(names) + 1:05d}.safetensors"  # renamed once the count is known
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1] = {}

    itemsize = torch.empty((), dtype=dtype).element_size()
    for key, shape in shapes.items():
        nbytes = itemsize * torch.Size(shape).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        if "norm" in key:
            tensor = torch.ones(shape, dtype=dtype)
        else:  # a random window of the pool (tiled when the tensor is larger)
            n = torch.Size(shape).numel()
            if n <= pool.numel():
                start = int(torch.randint(0, pool.numel() - n + 1, (), generator=gen))
                flat = pool[start : start + n]
            else:
                flat = pool.repeat(-(-n // pool.numel()))[:n]
            tensor = flat.reshape(shape).clone()
        shards[-1][key] = tensor
        size += nbytes
    flush()
    final = {n: f"model-{i + 1:05d}-of-{len(names):05d}.safetensors" for i, n in enumerate(names)}
    for old, new in final.items():
        (out / old).rename(out / new)
    total = sum((out / n).stat().st_size for n in final.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = str(dtype).removeprefix("torch.")
    config.architectures = [type(model).__name__]
    config.save_pretrained(out)
    return out


def over_the_cap_checkpoint(out: Path, cap: int = 400_000_000) -> tuple[Path, int, dict]:
    """(checkpoint, cap, env): a ~600 MB synthetic Qwen3-MoE checkpoint, more than 1.5x `cap` bytes,
    and the environment of a capped child process (one thread, two malloc arenas, moeprune importable)."""
    import os

    import moeprune

    config = qwen3_moe_config(layers=8, experts=64, hidden=512, intermediate=384, vocab_size=1024)
    src = write_synthetic_checkpoint(out, config, shard_bytes=50_000_000)
    assert sum(f.stat().st_size for f in src.glob("*.safetensors")) > 1.5 * cap
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(moeprune.__file__).parents[1]), env.get("PYTHONPATH", "")])
    return src, cap, env
