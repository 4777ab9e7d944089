"""What a run cost in memory and I/O, for its summary line: peak host RSS, peak device memory and
bytes read from disk by this process."""

from __future__ import annotations

import resource
from pathlib import Path


def memory_usage() -> dict[str, float | None]:
    """``{"peak_rss_mb", "peak_device_mb", "read_mb"}`` of this process so far (None where unknown)."""
    import torch

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    device = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        device = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**20
    read = None
    io = Path("/proc/self/io")
    if io.exists():
        fields = dict(line.split(": ") for line in io.read_text().splitlines() if ": " in line)
        read = int(fields.get("read_bytes", 0)) / 2**20
    return {"peak_rss_mb": rss_kb / 1024, "peak_device_mb": device, "read_mb": read}


def memory_line(usage: dict[str, float | None]) -> str:
    """``peak RSS 812 MB, read 33 MB from disk`` (device memory when a GPU was used)."""
    parts = [f"peak RSS {usage['peak_rss_mb']:.0f} MB"]
    if usage.get("peak_device_mb") is not None:
        parts.append(f"peak device {usage['peak_device_mb']:.0f} MB")
    if usage.get("read_mb") is not None:
        parts.append(f"read {usage['read_mb']:.0f} MB from disk")
    return ", ".join(parts)
