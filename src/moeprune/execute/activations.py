"""Hidden states of a layer-by-layer pass, on the host, spilled to files past a byte budget."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch


class Activations:
    """Hidden states of a pass, on the host; past `max_bytes` in memory, further ones go to files in
    `folder` (a temporary directory by default) and are read back when used."""

    def __init__(self, max_bytes: int | None = None, folder: str | Path | None = None) -> None:
        self.max_bytes, self.folder = max_bytes, folder
        self.bytes = 0  # held in memory
        self.spilled = 0  # bytes written to files so far
        self._items: dict[int, torch.Tensor | Path] = {}
        self._next = 0
        self._dir: tempfile.TemporaryDirectory | None = None

    def put(self, tensor: torch.Tensor) -> int:
        tensor = tensor.detach().to("cpu")
        key, self._next = self._next, self._next + 1
        size = tensor.numel() * tensor.element_size()
        if self.max_bytes is None or self.bytes + size <= self.max_bytes:
            self._items[key] = tensor
            self.bytes += size
            return key
        if self._dir is None:
            if self.folder is not None:
                Path(self.folder).mkdir(parents=True, exist_ok=True)
            self._dir = tempfile.TemporaryDirectory(prefix="moeprune-activations-", dir=self.folder)
        path = Path(self._dir.name) / f"{key}.pt"
        torch.save(tensor.clone(), path)
        self.spilled += size
        self._items[key] = path
        return key

    def get(self, key: int) -> torch.Tensor:
        item = self._items[key]
        return item if isinstance(item, torch.Tensor) else torch.load(item, mmap=True, weights_only=True)

    def drop(self, key: int) -> None:
        item = self._items.pop(key)
        if isinstance(item, torch.Tensor):
            self.bytes -= item.numel() * item.element_size()
        else:
            item.unlink(missing_ok=True)

    def close(self) -> None:
        for key in list(self._items):
            self.drop(key)
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
