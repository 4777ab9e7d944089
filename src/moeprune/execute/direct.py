"""Decoder layers read straight into their in-memory tensors, by a recipe learned from transformers.

transformers' loader (``convert_and_load_state_dict_in_model``) builds a layer's fused expert tensors
from the checkpoint's per-expert ones: it reads every per-expert tensor, stacks them (one copy) and
concatenates gate and up (another), through a chain of Python converter objects copied per layer.
Layer by layer that runs once per layer per stream: on a 48-layer, 65 MB-per-layer checkpoint it was
a third of a search's CPU time, and its copies held the layer twice while it loaded.

A `Recipe` says, for each in-memory tensor of a decoder layer, its shape, dtype and which checkpoint
tensors fill which element ranges of its (contiguous) storage, with the layer index as a template.
It is learned by reading the checkpoint tensors of a layer transformers has just converted and finding
where each one's values lie in the converted tensors (`learn`: a tiling of each tensor's storage by
whole source tensors, cast to its dtype); a recipe is used only after two different layers of the
same key signature gave the same one (`Recipes`). `load` then allocates each tensor once and reads
every source into its place with ``preadv`` (a cast through a temporary when the dtypes differ): the
same values as transformers' conversion, one copy of the layer, no Python converters. A layout that is
not a tiling (a transposed or interleaved conversion) has no recipe and keeps transformers' loader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..surgery.streaming import Stored
from .weights import TORCH_DTYPES, read_into, read_stored


@dataclass(frozen=True)
class Target:
    """One in-memory tensor of a layer: (checkpoint key template, element offset) per source."""

    name: str  # in-memory name, the layer index as {}
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: tuple[tuple[str, int], ...]


Recipe = tuple[Target, ...]


def template(key: str, index: int) -> str | None:
    """`key` with its first ``.index.`` part as ``.{}.`` (None when it has none)."""
    part = f".{index}."
    at = key.find(part)
    if at < 0:
        return None
    return key[:at] + ".{}." + key[at + len(part) :].replace("{", "{{").replace("}", "}}")


def signature(names: list[str], keys: list[str], index: int) -> tuple | None:
    """What two layers with the same recipe share: their templated names and checkpoint keys."""
    out = [template(k, index) for k in names + keys]
    return (
        None
        if any(t is None for t in out)
        else (tuple(sorted(out[: len(names)])), tuple(sorted(out[len(names) :])))
    )


def learn(
    tensors: dict[str, torch.Tensor], sources: dict[str, list[str]], stored: dict[str, Stored], index: int
) -> Recipe | None:
    """The recipe of layer `index` from its converted `tensors` (in-memory name -> tensor) and the
    checkpoint keys that load each (`sources`): each tensor's storage must be tiled, in order, by
    whole source tensors cast to its dtype; None when one is not."""
    targets = []
    for name in sorted(tensors):
        tensor = tensors[name]
        keys = sources.get(name)
        if not keys or not tensor.is_contiguous():
            return None
        flat = tensor.to("cpu").reshape(-1)
        if any(TORCH_DTYPES.get(stored[k].dtype) is None for k in keys):
            return None
        values = {k: read_stored(stored[k]).to(tensor.dtype).reshape(-1) for k in keys}
        left = sorted(keys, key=_natural)
        pieces, at = [], 0
        while left:
            found = next((k for k in left if _fits(flat, at, values[k])), None)
            if found is None:
                return None
            pieces.append((template(found, index), at))
            at += values[found].numel()
            left.remove(found)
        if at != flat.numel() or any(p[0] is None for p in pieces):
            return None
        targets.append(Target(template(name, index), tuple(tensor.shape), tensor.dtype, tuple(pieces)))
    return tuple(targets)


def _natural(key: str) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in key.split("."))


def _fits(flat: torch.Tensor, at: int, values: torch.Tensor) -> bool:
    n = values.numel()
    if at + n > flat.numel():
        return False
    head = min(n, 8)
    return torch.equal(flat[at : at + head], values[:head]) and torch.equal(flat[at : at + n], values)


def load(
    recipe: Recipe,
    index: int,
    stored: dict[str, Stored],
    device: torch.device | None = None,
    staged: bool = False,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Layer `index`'s tensors by `recipe`, (in-memory name, tensor) one after the other, each
    allocated once on `device` (default the CPU). On the CPU every source is read into its place; on
    another device each goes through a host buffer of its own size (the host holds one checkpoint
    tensor, not the layer; `staged`: that way on the CPU too)."""
    device = torch.device("cpu") if device is None else device
    fds: dict = {}
    try:
        for target in recipe:
            tensor = torch.empty(target.shape, dtype=target.dtype, device=device)
            flat = tensor.reshape(-1)
            in_place = device.type == "cpu" and flat.numel() > 0 and not staged
            raw = memoryview(flat.view(torch.uint8).numpy()) if in_place else None
            size = flat.element_size()
            for key_template, at in target.pieces:
                t = stored[key_template.format(index)]
                fd = fds.get(t.file)
                if fd is None:
                    fd = fds[t.file] = os.open(t.file, os.O_RDONLY)
                n = t.nbytes // TORCH_DTYPES[t.dtype].itemsize
                if in_place and TORCH_DTYPES[t.dtype] == target.dtype:
                    read_into(fd, t, raw[at * size : (at + n) * size])
                else:  # a cast (as transformers' loader casts the converted tensor) or a copy to the device
                    flat[at : at + n] = read_stored(t, fd).reshape(-1).to(target.dtype)
            yield target.name.format(index), tensor
    finally:
        for fd in fds.values():
            os.close(fd)


def keys_of(recipe: Recipe, index: int) -> set[str]:
    """The checkpoint keys `recipe` reads for layer `index`."""
    return {k.format(index) for t in recipe for k, _ in t.pieces}


class Recipes:
    """Recipes by layer signature: learned from transformers' conversion of one layer, trusted once a
    second, different layer of the signature gave the same recipe."""

    def __init__(self) -> None:
        self._seen: dict[tuple, tuple[int, Recipe | None]] = {}  # signature -> (layer, its recipe)
        self._trusted: dict[tuple, Recipe] = {}

    def get(self, sig: tuple | None) -> Recipe | None:
        return None if sig is None else self._trusted.get(sig)

    def wants(self, sig: tuple | None, index: int) -> bool:
        """Whether layer `index`, just converted by transformers, should be learned from."""
        if sig is None or sig in self._trusted:
            return False
        seen = self._seen.get(sig)
        return seen is None or (seen[0] != index and seen[1] is not None)

    def add(self, sig: tuple, index: int, recipe: Recipe | None) -> None:
        seen = self._seen.get(sig)
        if seen is None:
            self._seen[sig] = (index, recipe)
        elif recipe is not None and recipe == seen[1]:
            self._trusted[sig] = recipe
        else:
            self._seen[sig] = (seen[0], None)  # two layers disagree: transformers' loader for good
