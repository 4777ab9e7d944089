"""Process-wide memory settings for layer-by-layer runs: what the C libraries under torch keep.

Measured on a synthetic Qwen3-MoE checkpoint on a CPU (benchmarks/scale.py --passes; notes in
docs/layers.md):

- glibc keeps freed memory in its heap, and its adaptive mmap threshold (up to 32 MiB) puts freed
  layers' tensors there too, where they fragment it (~half a layer more per layer). Fixing the
  threshold at 1 MiB for good keeps them out but costs 30-60% more CPU per layer: every forward
  intermediate is then mmapped and faulted in anew. So the threshold is 1 MiB only while a unit's
  weights are allocated (`weights_mmapped`) and 32 MiB while it runs; and `trim` hands the heap's
  free pages back to the operating system when a unit is freed (a checkpoint's per-expert tensors
  are below 1 MiB: they are heap chunks, freed once fused).
- oneDNN (torch's CPU kernels for bf16/fp16 matmuls) builds one primitive per distinct shape,
  ~0.56 MB each whatever the weights' size, and keeps up to 1024 of them in each of two caches
  (oneDNN's and ideep's). The experts' matmuls have one shape per token count, which changes with
  every batch and every mask: a search fills both caches (~0.6 GB that stays, on a model of any
  size; the experts of one 12-layer stream alone had ~500 distinct shapes). `prepare_process` caps
  them at `CACHE_ENTRIES` each: ~0.55 GB less at the peak for ~15% more CPU time in a search (every
  primitive is built anew: a 12-layer search, one thread, 15.7 s vs 13.4 s of CPU). Setting both
  variables to 1024 before the run trades the memory back for the time.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

CACHE_ENTRIES = 16
WEIGHTS_MMAP = 1 << 20  # glibc's mmap threshold while a unit's weights are allocated
COMPUTE_MMAP = 32 << 20  # and while it runs (the most glibc's adaptive threshold reaches)
_CACHES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")  # oneDNN's, ideep's (torch)
_libc = None
_prepared = False


def _glibc():
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018  (glibc, not another libc)
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def prepare_process() -> None:
    """oneDNN's caches capped (module docstring). Their variables are read when the process creates
    its first oneDNN primitive: set before that (a `LayerwiseModel` is built before any forward),
    and left alone when the user has set them."""
    global _prepared
    if not _prepared:
        for name in _CACHES:
            os.environ.setdefault(name, str(CACHE_ENTRIES))
        _prepared = True


def trim() -> None:
    """Return the free pages of glibc's heap to the operating system (``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@contextmanager
def weights_mmapped() -> Iterator[None]:
    """Within the block, allocations of `WEIGHTS_MMAP` bytes and more are mmapped: a unit's weights
    go back to the operating system whole when freed and never fragment the heap; after it, the
    threshold is `COMPUTE_MMAP`, so that a forward's intermediates are served from the heap."""
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, WEIGHTS_MMAP)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, COMPUTE_MMAP)


_M_MMAP_THRESHOLD = -3
