"""Streaming surgery: rewrite a safetensors checkpoint into a pruned (or EEP-merged) one, tensor by
tensor, without building the model.

The checkpoint's on-disk names are mapped to the model's in-memory names with transformers' own
conversion mapping (the one ``from_pretrained`` applies), so both on-disk layouts are understood:

- per-expert tensors (``…experts.{i}.gate_proj.weight``, what most hub checkpoints ship and what
  ``save_pretrained`` writes back): a removed expert's tensors are dropped, kept ones renumbered
  ``0..k-1`` in their original order;
- fused tensors (``…experts.gate_up_proj``, (E, …)): the kept experts' rows are copied.

Router rows and per-expert router biases (the family's ``router_tensors``) are sliced on their expert
dim. Everything else is copied byte for byte. The result equals what in-memory surgery
(`remove_experts_` + `save_pruned`) writes, tensor for tensor, in the input's layout and dtype.

Block-scaled FP8 (``X`` in float8 with ``X_scale_inv``, e.g. DeepSeek-V3, Kimi-K2 and most ``-FP8``
releases): a per-expert tensor and its scales are selected together; merging experts of an FP8
checkpoint is refused (it would need dequantising and requantising).

Memory: tensor bytes that are only selected go from file to file (``os.copy_file_range``), never
through the process; only sliced router tensors off dim 0 and merged experts are materialised (a
merge holds one layer's stack of one expert tensor). The config, the model card and the non-uniform
remote code come from a meta-device skeleton of the model pruned by `remove_experts_`, exactly as
the in-memory path does it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from ..arch import family_of, moe_layers
from ..errors import MoepruneError, UnsupportedModelError
from ..plan import ExpertPlan, validate_plan
from .checkpoint import CARD, MANIFEST, REMOTE_CODE_FILE, shard_bytes, skeleton, write_checkpoint
from .prune import remove_experts_

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Block-scaled FP8: ``X_scale_inv`` holds the (ceil(out/128), ceil(in/128)) scales of float8 ``X``
# (for fused expert tensors, (E, ...) scales with the expert on dim 0 like ``X``).
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
# bytes per element of every safetensors dtype this module may meet
ITEMSIZE = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
# files never carried over from the input: weights in any format (they would be the unpruned
# model's) and what the rewrite writes itself
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".npz")
_REWRITTEN = ("config.json", MANIFEST, CARD, REMOTE_CODE_FILE)

MergeSpec = Mapping[int, object]  # layer -> LayerMerge-like (.anchors, .weights) or (anchors, M (k, E))


# --- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One tensor of an input shard, located without reading its data."""

    file: Path
    dtype: str  # safetensors dtype name, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: Path) -> dict[str, Stored]:
    """Tensors of one ``.safetensors`` file, in data order (the header only is read)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    base = 8 + size
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {
        name: Stored(
            path,
            h["dtype"],
            tuple(h["shape"]),
            base + h["data_offsets"][0],
            h["data_offsets"][1] - h["data_offsets"][0],
        )
        for name, h in items
    }


def weight_files(root: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory (index order), or one ``model.safetensors``."""
    index = root / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / SINGLE).is_file():
        return [root / SINGLE]
    raise MoepruneError(f"{root} holds no safetensors weights ({SINGLE} or {INDEX}); streaming needs them")


def local_checkpoint(name_or_path: str | Path) -> Path | None:
    """The local directory of a safetensors checkpoint: the directory itself, or a hub id's snapshot
    already in the local cache; None when there is none (the in-memory path downloads it)."""
    path = Path(name_or_path)
    if not path.is_dir():
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(str(name_or_path), local_files_only=True))
        except Exception:  # not a hub id, or not (fully) cached
            return None
    try:
        weight_files(path)
    except MoepruneError:
        return None
    return path


# --- which on-disk tensor is what ----------------------------------------------------------------


@dataclass(frozen=True)
class Role:
    """What an on-disk tensor is to surgery (tensors with no role are copied as they are)."""

    layer: int  # decoder layer index
    dim: int  # the expert dim (per-expert tensors: -1, they hold one expert)
    router: bool  # a router row/bias tensor (else an expert weight, or its FP8 scales)
    expert: int | None = None  # per-expert tensors: the expert id in the key
    position: int | None = None  # per-expert tensors: index of the id among the key's "."-parts
    group: str | None = None  # per-expert tensors: the key with the id as "*" (merged together)


class OnDiskLayout:
    """Maps checkpoint keys to roles through transformers' conversion mapping of the model."""

    def __init__(self, model, layers) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming

        transforms = get_model_conversion_mapping(model)
        self._renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        self._converters = [t for t in transforms if isinstance(t, WeightConverter)]
        self._prefix = model.base_model_prefix
        self._state = dict.fromkeys(model.state_dict())
        names = {id(m): n for n, m in model.named_modules()}
        family = family_of(model.config)
        # in-memory name -> (layer, expert dim, router?) for every router and expert tensor
        self.targets: dict[str, tuple[int, int, bool]] = {}
        for layer in layers:
            block = names[id(layer.block)]
            tensors = [(p, d, True) for p, d in family.router_tensors]
            tensors += [(p, 0, False) for p in family.expert_tensors]
            for path, dim, router in tensors:
                name = f"{block}.{path}" if block else path
                if name in self._state:
                    self.targets[name] = (layer.index, dim, router)
        self._positions: dict[str, int] = {}

    def in_memory_name(self, key: str) -> tuple[str, str | None]:
        """(the model's name for checkpoint `key`, the converter source pattern that matched it)."""
        from transformers.core_model_loading import rename_source_key

        return rename_source_key(key, self._renamings, self._converters, self._prefix, self._state)

    def role(self, key: str) -> tuple[Role | None, str]:
        """(role of checkpoint `key`, its in-memory name); FP8 scales take their tensor's role."""
        base = key.removesuffix(SCALE_SUFFIX)
        target, pattern = self.in_memory_name(base)
        hit = self.targets.get(target)
        if hit is None:
            return None, target
        layer, dim, router = hit
        if pattern is None or "*" not in pattern:
            return Role(layer, dim, router), target
        position = self._expert_position(base, target)
        parts = key.split(".")
        expert = int(parts[position])
        parts[position] = "*"
        return Role(layer, -1, router, expert, position, ".".join(parts)), target

    def _expert_position(self, key: str, target: str) -> int:
        """Which numeric part of a per-expert key is the expert id: the one that can change while
        the key still converts into the same fused tensor (the layer index cannot)."""
        parts = key.split(".")
        shape = ".".join("#" if p.isdigit() else p for p in parts)
        if shape not in self._positions:
            found = [
                i
                for i, p in enumerate(parts)
                if p.isdigit()
                and self.in_memory_name(".".join(parts[:i] + [str(int(p) + 1)] + parts[i + 1 :]))[0] == target
            ]
            if len(found) != 1:
                raise UnsupportedModelError(
                    f"cannot tell which part of checkpoint key '{key}' is the expert id"
                )
            self._positions[shape] = found[0]
        return self._positions[shape]


# --- the rewrite ---------------------------------------------------------------------------------


@dataclass
class Output:
    """One tensor of the pruned checkpoint: copied byte ranges of the input, or computed."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    ranges: list[tuple[Path, int, int]] = field(default_factory=list)  # (file, start, nbytes)
    make: Callable[[], torch.Tensor] | None = None

    @property
    def nbytes(self) -> int:
        n = ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def _merge_spec(
    merges: MergeSpec, num_experts: dict[int, int]
) -> dict[int, tuple[tuple[int, ...], torch.Tensor]]:
    out = {}
    for layer, merge in merges.items():
        anchors, weights = (merge.anchors, merge.weights) if hasattr(merge, "anchors") else merge
        anchors = tuple(int(a) for a in anchors)
        weights = torch.as_tensor(weights)
        if int(layer) not in num_experts:
            raise MoepruneError(f"merge for layer {layer}, which is not an MoE layer")
        if list(anchors) != sorted(set(anchors)):
            raise MoepruneError(
                f"layer {layer}: merge anchors must be sorted and distinct, got {list(anchors)}"
            )
        if tuple(weights.shape) != (len(anchors), num_experts[int(layer)]):
            raise MoepruneError(
                f"layer {layer}: merging matrix of shape {tuple(weights.shape)}, expected "
                f"({len(anchors)}, {num_experts[int(layer)]})"
            )
        out[int(layer)] = (anchors, weights)
    return out


def merged(weights: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """EEP merge of one expert tensor, as `merge.merging` computes it in memory:
    new_j = Σ_i M[j, i] W_i, i.e. (k, E) x (E, ...) -> (k, ...), in the tensor's dtype."""
    return torch.tensordot(weights.to(tensor.dtype), tensor, dims=([1], [0]))


class StreamingPrune:
    """A pruned rewrite of the safetensors checkpoint `source` (directory, or cached hub id).

    ``StreamingPrune(src, plan).write(out, manifest=...)``; `kept` and `num_experts` (original ids /
    counts per MoE layer) are known after construction, before anything is written. With `merges`
    ({layer: (anchors, M (k, E))} or `LayerMerge`s) the anchors' slots receive Σ_i M[j, i] W_i and
    every other expert of those layers is removed (`plan` is then derived, leave it None).
    """

    def __init__(
        self, source: str | Path, plan: ExpertPlan | dict | None = None, *, merges: MergeSpec | None = None
    ) -> None:
        root = local_checkpoint(source)
        if root is None:
            raise MoepruneError(
                f"'{source}' is not a local safetensors checkpoint (a directory, or a hub id in the local "
                "cache); prune it in memory instead"
            )
        self.source, self.root = source, root
        self.files = weight_files(root)
        self.model = skeleton(root)  # meta device: names, shapes, config
        self.family = family_of(self.model.config)
        layers = moe_layers(self.model)
        self.num_experts = {layer.index: layer.num_experts for layer in layers}
        self.merges = _merge_spec(merges or {}, self.num_experts)
        if self.merges:
            if plan is not None:
                raise MoepruneError("give either a plan or merges: merges remove every non-anchor")
            plan = ExpertPlan.from_kept({i: a for i, (a, _) in self.merges.items()}, self.num_experts)
        if plan is None:
            raise MoepruneError("streaming surgery needs a plan (or merges)")
        if not isinstance(plan, ExpertPlan):
            plan = ExpertPlan.from_removed(plan)
        self.plan = plan
        self.kept = validate_plan(self.model, plan, layers)
        self.layout = OnDiskLayout(self.model, layers)
        self.stored: dict[str, Stored] = {}
        for file in self.files:
            self.stored.update(read_header(file))
        self.outputs = self._outputs()
        remove_experts_(self.model, plan)  # the skeleton now has the pruned counts, config included

    # --- planning --------------------------------------------------------------------------------
    def _outputs(self) -> list[Output]:
        outputs: list[Output] = []
        seen: set[str] = set()  # in-memory names found (router and expert tensors)
        experts_of: dict[str, dict[int, str]] = {}  # per-expert group -> {expert id: key}
        for key, t in self.stored.items():
            role, target = self.layout.role(key)
            if role is None:
                outputs.append(Output(key, t.dtype, t.shape, [(t.file, t.start, t.nbytes)]))
                continue
            if not key.endswith(SCALE_SUFFIX):
                seen.add(target)
            n = self.num_experts[role.layer]
            if role.expert is None:
                outputs.append(self._sliced(key, t, role, n))
            else:
                if role.router:
                    raise UnsupportedModelError(f"per-expert router tensor '{key}' is not supported")
                if not 0 <= role.expert < n:
                    raise MoepruneError(
                        f"checkpoint key '{key}' names expert {role.expert}, the layer has {n}"
                    )
                experts_of.setdefault(role.group, {})[role.expert] = key
                out = self._per_expert(key, t, role)
                if out is not None:
                    outputs.append(out)
        missing = sorted(set(self.layout.targets) - seen)
        if missing:
            raise UnsupportedModelError(
                f"the checkpoint in {self.root} has no tensor that loads into '{missing[0]}' "
                f"({len(missing)} router/expert tensors unaccounted for)"
            )
        for group, found in experts_of.items():
            layer = self.layout.role(found[min(found)])[0].layer
            if sorted(found) != list(range(self.num_experts[layer])):
                raise UnsupportedModelError(
                    f"checkpoint tensors '{group}' cover experts {sorted(found)[:8]}..., "
                    f"expected 0..{self.num_experts[layer] - 1}"
                )
        self._experts_of = experts_of
        return outputs

    def _fp8(self, key: str, t: Stored) -> bool:
        return t.dtype in FP8_DTYPES or key.endswith(SCALE_SUFFIX) or key + SCALE_SUFFIX in self.stored

    def _refuse_fp8_merge(self, key: str, t: Stored) -> None:
        if self._fp8(key, t):
            raise MoepruneError(
                f"cannot merge experts of an FP8 checkpoint ('{key}' is block-scaled FP8): prune without "
                "merging, or merge a dequantised bf16 copy"
            )

    def _sliced(self, key: str, t: Stored, role: Role, n: int) -> Output:
        """A router tensor (expert dim `role.dim`) or a fused expert tensor (dim 0): kept experts only."""
        if t.shape[role.dim] != n:
            raise UnsupportedModelError(
                f"checkpoint tensor '{key}' has shape {list(t.shape)}; expected {n} experts on dim {role.dim}"
            )
        keep = self.kept[role.layer]
        shape = t.shape[: role.dim] + (len(keep),) + t.shape[role.dim + 1 :]
        if role.router and self._fp8(key, t):
            raise UnsupportedModelError(
                f"router tensor '{key}' is block-scaled FP8; moeprune cannot slice it"
            )
        if not role.router and role.layer in self.merges:
            self._refuse_fp8_merge(key, t)
            weights = self.merges[role.layer][1]
            return Output(key, t.dtype, shape, make=lambda: merged(weights, self._tensor(key)))
        if role.dim == 0:
            row = t.nbytes // n
            return Output(key, t.dtype, shape, [(t.file, t.start + e * row, row) for e in keep])
        index = torch.tensor(keep)
        return Output(key, t.dtype, shape, make=lambda: self._tensor(key).index_select(role.dim, index))

    def _per_expert(self, key: str, t: Stored, role: Role) -> Output | None:
        """One expert's tensor: dropped, renumbered, or (merges) replaced by its anchor's merge."""
        parts = key.split(".")
        if role.layer in self.merges:
            self._refuse_fp8_merge(key, t)
            anchors, weights = self.merges[role.layer]
            if role.expert not in anchors:
                return None
            j = anchors.index(role.expert)
            parts[role.position] = str(j)
            return Output(".".join(parts), t.dtype, t.shape, make=lambda: self._merged_expert(role.group, j))
        keep = self.kept[role.layer]
        if role.expert not in keep:
            return None
        parts[role.position] = str(keep.index(role.expert))
        return Output(".".join(parts), t.dtype, t.shape, [(t.file, t.start, t.nbytes)])

    # --- reading tensors that are computed ---------------------------------------------------------
    def _tensor(self, key: str) -> torch.Tensor:
        file = self.stored[key].file
        if self._open is None or self._open[0] != file:
            self._close()
            handle = safe_open(file, framework="pt")
            self._open = (file, handle, handle.__enter__())
        return self._open[2].get_tensor(key)

    def _close(self) -> None:
        if getattr(self, "_open", None) is not None:
            self._open[1].__exit__(None, None, None)
        self._open = None

    def _merged_expert(self, group: str, j: int) -> torch.Tensor:
        """Anchor j's merged tensor of a per-expert group. The group's (k, ...) merge is computed at
        its first anchor and dropped after its last (a layer's groups may interleave on disk)."""
        if group not in self._merge_cache:
            keys = self._experts_of[group]
            layer = self.layout.role(keys[0])[0].layer
            anchors, weights = self.merges[layer]
            stack = torch.stack([self._tensor(keys[e]) for e in range(len(keys))])  # (E, ...)
            self._merge_cache[group] = [merged(weights, stack), len(anchors)]  # (k, ...), uses left
            del stack
        entry = self._merge_cache[group]
        entry[1] -= 1
        if entry[1] == 0:
            del self._merge_cache[group]
        return entry[0][j]

    # --- writing ---------------------------------------------------------------------------------
    def default_shard_size(self) -> int:
        """The input's largest weight file."""
        return max(f.stat().st_size for f in self.files)

    def write(
        self,
        out_dir: str | Path,
        *,
        manifest: dict,
        files: dict[str, str | bytes] | None = None,
        max_shard_size: int | str | None = None,
        overwrite: bool = False,
        progress: bool = False,
    ) -> Path:
        """Write the pruned checkpoint to `out_dir` (atomically, see `write_checkpoint`): weights in
        shards of at most `max_shard_size` (default: the input's largest shard) with an index when
        there are several, config, every other file of the input (tokenizer, generation config, ...),
        ``moeprune.json`` and `files` (model card, run files)."""
        limit = shard_bytes(max_shard_size) if max_shard_size is not None else self.default_shard_size()

        def weights(tmp: Path) -> None:
            _copy_other_files(self.root, tmp)
            self._write_shards(tmp, limit, progress)
            config = self.model.config
            config.architectures = [type(self.model).__name__]
            config.save_pretrained(tmp)

        return write_checkpoint(
            self.model, out_dir, weights, manifest=manifest, overwrite=overwrite, files=files
        )

    def _write_shards(self, out: Path, limit: int, progress: bool) -> None:
        shards: list[list[Output]] = [[]]
        size = 0
        for o in self.outputs:
            if shards[-1] and size + o.nbytes > limit:
                shards.append([])
                size = 0
            shards[-1].append(o)
            size += o.nbytes
        names = (
            [SINGLE]
            if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(o.nbytes for o in self.outputs), unit="B", unit_scale=True, disable=not progress)
        self._open, self._merge_cache = None, {}
        fds: dict[Path, int] = {}
        try:
            for name, shard in zip(names, shards, strict=True):
                _write_shard(out / name, shard, fds, bar)
        finally:
            self._close()
            self._merge_cache = {}
            for fd in fds.values():
                os.close(fd)
            bar.close()
        if len(shards) > 1:
            index = {
                "metadata": {
                    "total_parameters": sum(p.numel() for p in self.model.parameters()),
                    "total_size": sum(o.nbytes for o in self.outputs),
                },
                "weight_map": {o.name: n for n, shard in zip(names, shards, strict=True) for o in shard},
            }
            (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_shard(path: Path, outputs: Sequence[Output], fds: dict[Path, int], bar) -> None:
    """One safetensors file: header, then each tensor's bytes (wider dtypes first, so every tensor
    starts aligned to its element size, as safetensors itself orders them)."""
    outputs = sorted(outputs, key=lambda o: -ITEMSIZE[o.dtype])
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for o in outputs:
        header[o.name] = {
            "dtype": o.dtype,
            "shape": list(o.shape),
            "data_offsets": [offset, offset + o.nbytes],
        }
        offset += o.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb", buffering=0) as f:
        _write_all(f, struct.pack("<Q", len(raw)) + raw)
        for o in outputs:
            if o.make is None:
                for file, start, n in _coalesced(o.ranges):
                    if file not in fds:
                        fds[file] = os.open(file, os.O_RDONLY)
                    _copy_range(fds[file], f, start, n)
            else:
                tensor = o.make()
                if tuple(tensor.shape) != o.shape:
                    raise AssertionError(f"{o.name}: computed shape {tuple(tensor.shape)}, planned {o.shape}")
                data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
                if data.nbytes != o.nbytes:
                    raise AssertionError(f"{o.name}: computed {data.nbytes} bytes, planned {o.nbytes}")
                _write_all(f, memoryview(data))
                del tensor, data
            bar.update(o.nbytes)
        if f.tell() != 8 + len(raw) + offset:
            raise AssertionError(f"{path}: wrote {f.tell()} bytes, planned {8 + len(raw) + offset}")


def _coalesced(ranges: list[tuple[Path, int, int]]) -> list[tuple[Path, int, int]]:
    out: list[tuple[Path, int, int]] = []
    for file, start, n in ranges:
        if out and out[-1][0] == file and out[-1][1] + out[-1][2] == start:
            out[-1] = (file, out[-1][1], out[-1][2] + n)
        else:
            out.append((file, start, n))
    return out


def _write_all(f, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view) :]


_CHUNK = 64 << 20


def _copy_range(src: int, dst, start: int, n: int) -> None:
    """Copy `n` bytes at `start` of file descriptor `src` to the current position of `dst`, in the
    kernel where it can (``copy_file_range``), else through a bounded buffer."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < n:
                copied = os.copy_file_range(src, dst.fileno(), n - done, start + done)
                if copied == 0:
                    raise MoepruneError(f"unexpected end of a weight file while copying {n} bytes")
                done += copied
            return
        except OSError as e:
            if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
                raise
    while done < n:
        chunk = os.pread(src, min(_CHUNK, n - done), start + done)
        if not chunk:
            raise MoepruneError(f"unexpected end of a weight file while copying {n} bytes")
        _write_all(dst, chunk)
        done += len(chunk)


def _copy_other_files(root: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template, licence, ...: every file of the input except
    weights, weight indexes and what the rewrite writes itself (hidden files and folders skipped)."""
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or path.is_dir():
            continue
        name = path.name
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(".index.json") or str(rel) in _REWRITTEN:
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / rel)  # follows hub-cache symlinks
