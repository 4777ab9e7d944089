"""Reversible patches of a loaded model, safe under accelerate's device-map hooks.

Every module that changes a model for a while (observer, masks, layer replay, merged weights, fewer
active experts) does it through one `Patches` stack: attribute swaps, wrapped forwards and torch hooks
are recorded as they are made and undone in reverse order on exit, even on error.

Accelerate already patches modules when a model is loaded with ``device_map=...``:
``add_hook_to_module`` stores the module's forward in ``module._old_forward`` and sets
``module.forward`` to a wrapper (an instance attribute) that runs ``module._hf_hook.pre_forward``
(inputs to the execution device; for offloaded modules, the real weights from ``hook.weights_map``
into the module's meta tensors), then ``module._old_forward``, then ``post_forward`` (weights back to
meta). Those belong to accelerate: a patch here never pops or replaces them.

- `Patches.wrap_forward` wraps ``_old_forward`` on a hooked module, so accelerate's onload still runs
  around the wrapper, and ``forward`` otherwise.
- `Patches.setattr` remembers where the attribute lived (instance dict, submodule, parameter, buffer,
  or nowhere: a class attribute) and restores exactly that; if something else replaced the patched
  value in the meantime, that value is left alone (with a warning).
- Offloaded tensors (meta on the module, real in the hook's ``weights_map``): `onloaded` brings a
  module's real weights in for a block of code through the hook's own pre/post forward, and
  `offloaded_source` / `WeightsOverlay` read or transform them where accelerate reads them.

This lives in ``arch/`` because it is knowledge of how a loaded model is laid out (accelerate's hook
attributes, where offloaded weights are), and every layer above arch needs it; it imports nothing
from moeprune.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

_ABSENT = object()
_CONTAINERS = ("_modules", "_parameters", "_buffers")


def _where(obj: object, name: str) -> tuple[str, object]:
    """(container, value) of attribute `name` of `obj`: "__dict__", a module container, "absent"
    (a module's class attribute or nothing), or "attr" (an object whose attribute lives elsewhere,
    e.g. a config key behind its ``attribute_map``)."""
    if name in vars(obj):
        return "__dict__", vars(obj)[name]
    if isinstance(obj, nn.Module):
        for container in _CONTAINERS:
            values = getattr(obj, container)
            if name in values:
                return container, values[name]
        return "absent", _ABSENT
    return "attr", getattr(obj, name, _ABSENT)


class Patches:
    """A stack of reversible changes to a model; ``with Patches() as p: ...`` undoes them all on exit.

    >>> with Patches() as p:
    ...     p.setattr(layer, "self_attn", stand_in)
    ...     p.wrap_forward(router, lambda inner: my_forward(inner))
    ...     p.forward_hook(router, record)
    """

    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def __enter__(self) -> Patches:
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def restore(self) -> None:
        """Undo every change, newest first (all are attempted; the first failure is raised after)."""
        failure: BaseException | None = None
        while self._undo:
            undo = self._undo.pop()
            try:
                undo()
            except Exception as e:  # noqa: BLE001 - keep undoing the rest
                failure = failure or e
        if failure is not None:
            raise failure

    def setattr(self, obj: object, name: str, value: object) -> None:
        """``setattr(obj, name, value)`` now; on restore, exactly what was there before."""
        container, old = _where(obj, name)
        setattr(obj, name, value)

        def undo() -> None:
            now_in, now = _where(obj, name)
            if container == "attr":  # set and read through the object's own accessors
                now_in, now = "attr", getattr(obj, name, _ABSENT)
            if now is not value:
                warnings.warn(
                    f"{type(obj).__name__}.{name} was replaced while moeprune had it patched; "
                    "leaving the newer value in place",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return
            if container == "attr":
                if old is _ABSENT:
                    delattr(obj, name)
                else:
                    setattr(obj, name, old)
                return
            if now_in == "__dict__":
                del vars(obj)[name]
            elif now_in != "attr":
                del getattr(obj, now_in)[name]
            if container == "__dict__":
                vars(obj)[name] = old
            elif container != "absent":
                getattr(obj, container)[name] = old

        self._undo.append(undo)

    def wrap_forward(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Make the module compute ``make(inner)(*args, **kwargs)``, where ``inner`` is what it ran
        before. On an accelerate-hooked module this wraps ``_old_forward`` (inside the hook's
        pre/post forward: inputs on the execution device, offloaded weights onloaded)."""
        name = "_old_forward" if is_hooked(module) else "forward"
        self.setattr(module, name, make(getattr(module, name)))

    def forward_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        self._undo.append(module.register_forward_hook(hook, **kwargs).remove)

    def forward_pre_hook(self, module: nn.Module, hook: Callable, **kwargs) -> None:
        self._undo.append(module.register_forward_pre_hook(hook, **kwargs).remove)

    def on_restore(self, undo: Callable[[], None]) -> None:
        """Run `undo` on restore (in stack order with the other changes)."""
        self._undo.append(undo)


@contextmanager
def patched(obj: object, name: str, value: object) -> Iterator[object]:
    """``obj.name = value`` within the block; exactly the previous state after it, even on error."""
    with Patches() as p:
        p.setattr(obj, name, value)
        yield obj


# ------------------------------------------------------------------ accelerate's offload hooks
def is_hooked(module: nn.Module) -> bool:
    """Whether accelerate's `add_hook_to_module` wrapped this module's forward."""
    return getattr(module, "_hf_hook", None) is not None and "_old_forward" in vars(module)


def _hooks(module: nn.Module) -> list:
    """The accelerate hooks on `module` itself (a SequentialHook's members unrolled)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    return list(getattr(hook, "hooks", None) or [hook])


def _offload_hooks(module: nn.Module) -> list:
    return [h for h in _hooks(module) if getattr(h, "offload", False) and h.weights_map is not None]


def is_offloaded(model: nn.Module) -> bool:
    """Whether any weight of `model` lives off the module (meta) in an accelerate weights map."""
    return any(_offload_hooks(m) for m in model.modules())


@contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Within the block, the offloaded weights of `module` and its submodules are real tensors on
    their execution device (through the hooks' own pre_forward/post_forward); no-op without offload."""
    done: list[tuple[object, nn.Module]] = []
    try:
        for m in module.modules():
            for hook in _offload_hooks(m):
                hook.pre_forward(m)
                done.append((hook, m))
        yield module
    finally:
        for hook, m in reversed(done):
            hook.post_forward(m, None)


def offloaded_source(root: nn.Module, path: str) -> tuple[object, str] | None:
    """(hook, key) such that ``hook.weights_map[key]`` holds the real value of the (meta) tensor at
    `path` below `root`; None when the tensor is not offloaded by a hook at or below `root`."""
    parts = path.split(".")
    module: nn.Module = root
    for i in range(len(parts)):
        key = ".".join(parts[i:])
        for hook in _offload_hooks(module):
            if key in hook.weights_map:
                return hook, key
        if i < len(parts) - 1:
            module = getattr(module, parts[i])
    return None


class WeightsOverlay(Mapping):
    """An accelerate weights map seen through per-key transforms, applied lazily at every read (so
    nothing offloaded is held in memory): ``overlay[key] = transforms[key](base[key])``."""

    def __init__(self, base: Mapping, transforms: dict[str, Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.base = base
        self.transforms = transforms

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.base[key]
        transform = self.transforms.get(key)
        return transform(value) if transform is not None else value

    def __contains__(self, key: object) -> bool:
        return key in self.base

    def __iter__(self):
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def transform_offloaded(
    hook: object, key: str, transform: Callable[[torch.Tensor], torch.Tensor], patches: Patches | None
) -> None:
    """Make `hook` read ``transform(real value)`` for `key` from now on (until `patches` restores,
    when given; permanently otherwise)."""
    overlay = WeightsOverlay(hook.weights_map, {key: transform})  # type: ignore[attr-defined]
    if patches is None:
        hook.weights_map = overlay  # type: ignore[attr-defined]
    else:
        patches.setattr(hook, "weights_map", overlay)


def input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs go: the execution device of its input embeddings under an accelerate
    device map (their weights may sit on the meta device, offloaded), else its first parameter's."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    hook = getattr(embed, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    for p in model.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")
