"""Checks on a run's inputs that need no weights, run before any weight loads: is the model a local
folder or a hub id, are its weight files there and whole, how many positions does it take, and the
fingerprints that identify a model or a statistics folder (the identity of a resumable search).

Each failure is one `MoepruneError` line saying what is wrong and how to fix it.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

from .errors import MoepruneError, UnsupportedModelError

# a hub repository id: "name" or "namespace/name" (letters, digits, '-', '_', '.'; no '--' or '..')
_HUB_ID = re.compile(r"^(?:[\w][\w.-]{0,95}/)?[\w][\w.-]{0,95}$")
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model*.bin")
_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def is_hub_id(name: str) -> bool:
    """Whether `name` can be a hub repository id (else it can only be a local path)."""
    return bool(_HUB_ID.match(name)) and ".." not in name and "--" not in name


def model_source(name: str | Path) -> Path | None:
    """The local folder of `name`, or None for a hub id; a path that does not exist (and cannot be a
    hub id) is refused here instead of reading as a malformed hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UnsupportedModelError(
                f"model {name} is a file; give the checkpoint's folder (config.json + weights) or a hub id"
            )
        if not (path / "config.json").is_file():
            raise UnsupportedModelError(
                f"model folder {name} has no config.json (is it a checkpoint folder?)"
            )
        return path
    if not is_hub_id(str(name)):
        raise UnsupportedModelError(f"model {name}: no such directory (and not a hub id like 'org/name')")
    return None


def check_weights(folder: Path) -> list[Path]:
    """The weight files of a local checkpoint folder, after checking that there are some and that
    every safetensors file is whole (its header parses and its data is as long as the header says)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise UnsupportedModelError(
                f"{index} is unreadable ({type(e).__name__}); re-download it"
            ) from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise UnsupportedModelError(
                f"model folder {folder} lacks {missing[0]} ({len(missing)} of {len(shards)} weight shards "
                "missing); finish the download"
            )
        files = [folder / s for s in shards]
    else:
        files = sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)})
    if not files:
        raise UnsupportedModelError(
            f"model folder {folder} holds no weights (model.safetensors or pytorch_model.bin); "
            "is the download complete?"
        )
    for file in files:
        if file.suffix == ".safetensors":
            check_safetensors(file)
    return files


def check_safetensors(path: Path) -> None:
    """One line when `path` is not a whole safetensors file (truncated, corrupt header)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a header")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        end = 0
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            begin, stop = entry["data_offsets"]
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            itemsize = _DTYPE_BYTES.get(entry["dtype"])
            if itemsize is not None and stop - begin != count * itemsize:
                raise ValueError(f"tensor {name} has {stop - begin} bytes for shape {entry['shape']}")
            end = max(end, stop)
        if 8 + n + end > size:
            raise ValueError(f"truncated: {size} of {8 + n + end} bytes")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e) or type(e).__name__
        if isinstance(e, json.JSONDecodeError | UnicodeDecodeError):
            reason = "its header is not valid JSON"
        raise UnsupportedModelError(
            f"weight file {path} is corrupt or incomplete ({reason}); re-download or re-save the model"
        ) from None


def max_positions(config) -> int | None:
    """The positions the model takes (``max_position_embeddings``), or None when unknown."""
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def model_fingerprint(name: str, config) -> dict:
    """What identifies a model: its config and, for a local folder, its weight files (name, size, first
    and last MiB); a hub model: its id and the commit the config came from."""
    canon = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    out = {"config": _sha(json.dumps(canon, sort_keys=True, default=str).encode())}
    folder = Path(name).expanduser()
    if folder.is_dir():
        out["weights"] = {p.name: _file_sample(p) for p in check_weights(folder)}
    else:
        out["hub"] = {"id": str(name), "commit": getattr(config, "_commit_hash", None)}
    return out


def _file_sample(path: Path, span: int = 2**20) -> str:
    """sha256 (16 hex) of a file's size, first and last MiB: tells weight files apart without reading
    them whole (a safetensors file starts with its header: names, shapes, offsets)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(span))
        if size > span:
            f.seek(max(span, size - span))
            h.update(f.read(span))
    return h.hexdigest()[:16]


def folder_fingerprint(folder: str | Path) -> str:
    """sha256 (16 hex) of the names and bytes of the files in `folder` (expert statistics: small)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file()):
        h.update(path.name.encode() + b"\x00")
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def check_readable_file(path: str | Path, what: str) -> Path:
    """`path` as a readable file, or one line saying why not (missing, a directory, unreadable)."""
    p = Path(path)
    if p.is_dir():
        raise MoepruneError(f"{what} {p} is a directory; give the file")
    if not p.exists():
        raise MoepruneError(f"{what} {p} does not exist")
    return p
