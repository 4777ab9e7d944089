"""Checkpoint tensors read into memory that goes back to the operating system when freed.

`read_stored` reads one safetensors tensor with ``preadv`` into a fresh anonymous buffer: no file
pages are mapped into the process (reading through ``safe_open`` maps the file, and the mapped
pages it touched count in the process's RSS until the handle goes).
"""

from __future__ import annotations

import os

import torch

from ..errors import MoepruneError
from ..surgery.streaming import Stored

TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def read_stored(t: Stored, fd: int | None = None) -> torch.Tensor:
    """One checkpoint tensor, read into fresh (anonymous) memory with ``preadv``."""
    dtype = TORCH_DTYPES.get(t.dtype)
    if dtype is None:
        raise MoepruneError(f"tensor dtype {t.dtype} in {t.file.name} is not supported layer by layer")
    buf = torch.empty(t.nbytes, dtype=torch.uint8)
    own = fd is None
    fd = os.open(t.file, os.O_RDONLY) if own else fd
    try:
        read_into(fd, t, memoryview(buf.numpy()))
    finally:
        if own:
            os.close(fd)
    return buf.view(dtype).reshape(t.shape)


def read_into(fd: int, t: Stored, view: memoryview) -> None:
    """Checkpoint tensor `t`'s bytes from the open file `fd` into `view` (t.nbytes long), by ``preadv``."""
    done = 0
    while done < t.nbytes:
        n = os.preadv(fd, [view[done:]], t.start + done)
        if n == 0:
            raise MoepruneError(f"unexpected end of {t.file} while reading a tensor")
        done += n


def resolve_dtype(
    dtype: str | torch.dtype | None, config, stored: dict[str, Stored] | None = None
) -> torch.dtype:
    """`dtype`; for ``auto`` the config's, else (as ``from_pretrained`` does) the checkpoint's first
    floating-point tensor's, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        found = getattr(config, "dtype", None) or getattr(config.get_text_config(), "dtype", None)
        if isinstance(found, str):
            found = getattr(torch, found, None)
        if isinstance(found, torch.dtype):
            return found
        for t in (stored or {}).values():
            kind = TORCH_DTYPES.get(t.dtype)
            if kind is not None and kind.is_floating_point and kind.itemsize >= 2:
                return kind
        return torch.float32
    return getattr(torch, dtype)
