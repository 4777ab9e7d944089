"""Whether a model fits the device it should run on, and the model a command runs: loaded whole, or
executed layer by layer (`layerwise.LayerwiseModel`) when asked to or when it does not fit."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..surgery.checkpoint import _read_config
from ..surgery.streaming import local_checkpoint, read_header, weight_files
from .weights import resolve_dtype


def checkpoint_bytes(source: str | Path) -> int | None:
    """Bytes of a local safetensors checkpoint's weights (None when it is not one)."""
    root = local_checkpoint(source)
    if root is None:
        return None
    return sum(f.stat().st_size for f in weight_files(root))


def memory_budget(device: str | torch.device) -> int:
    """Bytes a model may take on `device`: a GPU's total memory, or the host's available memory
    (``MOEPRUNE_MEMORY_BUDGET`` overrides both, e.g. to test the automatic choice)."""
    env = os.environ.get("MOEPRUNE_MEMORY_BUDGET")
    if env:
        from ..surgery.checkpoint import shard_bytes

        return shard_bytes(env)
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)[1]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable", info["MemTotal"])
    except (OSError, KeyError):
        return 1 << 62


def fits_in_memory(source: str | Path, device: str = "cpu", dtype: str = "auto") -> tuple[bool, int, int]:
    """(whether the model loads whole on `device`, bytes it needs, bytes the device has): its weights
    (scaled when `dtype` widens them) must take at most 80% of the budget (the rest: activations)."""
    size = checkpoint_bytes(source)
    if size is None:
        return True, 0, 0
    if dtype == "float32":
        root = local_checkpoint(source)
        stored = read_header(weight_files(root)[0])
        size = size * 4 // max(resolve_dtype("auto", _read_config(root), stored).itemsize, 1)
    budget = memory_budget(device)
    return size <= 0.8 * budget, size, budget


def layers_notice(source: str | Path, device: str = "cpu", dtype: str = "auto") -> str | None:
    """None when the model fits `device` (or runs over an accelerate device map), else the one-line
    notice that it runs layer by layer."""
    if device.startswith("auto"):
        return None
    fits, need, budget = fits_in_memory(source, device, dtype)
    if fits:
        return None
    return (
        f"note: the model needs ~{need / 1e9:.1f} GB and {device} has {budget / 1e9:.1f} GB: running it "
        "layer by layer (mode: layers)"
    )


def open_model(source: str | Path, device: str = "cpu", dtype: str | None = None, offload_folder=None):
    """`source` ready to run (`observe`, `evaluate`): loaded on `device` (`recipe.placement`), or, for
    ``DEVICE:layers`` or a model that does not fit the device (with the notice on stderr), a
    `layerwise.LayerwiseModel` of its checkpoint."""
    from ..recipe import placement, split_device
    from ..surgery import load
    from .layerwise import LayerwiseModel

    device, layers = split_device(device)
    where = placement(device, dtype or "auto", offload_folder=offload_folder)
    if not layers and local_checkpoint(source) is not None:
        notice = layers_notice(source, device, dtype or "auto")
        if notice is not None:
            print(notice, file=sys.stderr)
            layers = True
    if layers:
        return LayerwiseModel(source, device=where.get("device_map", "cpu"), dtype=dtype or "auto")
    return load(source, **where)
