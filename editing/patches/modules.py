"""ModulePatch: modules installed at named paths in place of the modules they wrap, plus their tensors.

An installable module holds the module it replaces as ``self.original`` (and usually calls it).
To rebuild without the editor that made it, each installable type is registered by name with a
``from_config(config, original)`` constructor and a JSON-able ``config()``; its tensors are its own
state_dict minus the wrapped original's (which the base, or earlier patches, already provide).

On disk (format ``kedit-module-patch/1``): ``modules.safetensors`` (tensors keyed
``<index>::<name>``, in their own dtype) and ``modules.json`` (per module: path, type, config,
tensor names; the tensors' sha256; a hash of the manifest's own content).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kedit.core import registry

from .base import ModuleSwap, Patch, PatchIntegrityError, Undo, load_tensors, register_patch_kind, save_tensors

FORMAT = "kedit-module-patch/1"
TENSORS = "modules.safetensors"
MANIFEST = "modules.json"
ORIGINAL = "original"


class Installable(nn.Module):
    """A module that takes the place of ``original`` at its path; subclasses register with ``register_module_type``."""

    type_name: ClassVar[str]
    original: nn.Module

    @classmethod
    def from_config(cls, config: dict[str, Any], original: nn.Module) -> Installable:
        """A module of this type around ``original``, its own tensors allocated (values come from the patch)."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """What ``from_config`` needs besides the original, JSON-able."""
        raise NotImplementedError

    def bind(self, model: nn.Module) -> None:
        """Called once installed in ``model``: a module that reads another installed module's per-forward state
        (a split codebook's answers, its scope's hits) finds it here. Most need nothing."""

    def forget(self) -> None:
        """Drop what this module recorded in the last forward for modules later in it (``start_at_block``
        runs forwards that skip it). Most record nothing."""

    def own_state(self) -> dict[str, torch.Tensor]:
        """The state_dict without the wrapped original's entries: what a patch must store."""
        prefix = ORIGINAL + "."
        return {k: v for k, v in self.state_dict(keep_vars=True).items() if not k.startswith(prefix)}


MODULE_TYPES: dict[str, type[Installable]] = {}


def register_module_type(cls: type[Installable]) -> type[Installable]:
    return registry.add(MODULE_TYPES, cls.type_name, cls, "module type")


def module_type(name: str) -> type[Installable]:
    return registry.lookup(MODULE_TYPES, name, "module type", PatchIntegrityError)


@dataclass
class InstalledModule:
    """One install: at ``path``, a ``type`` built from ``config`` around what was there, with these tensors."""

    path: str
    type: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    @classmethod
    def snapshot(cls, path: str, module: Installable) -> InstalledModule:
        """Copies, so training the live module later does not change what this edit recorded."""
        tensors = {k: v.detach().clone() for k, v in module.own_state().items()}
        return cls(path, module.type_name, module.config(), tensors)

    def build(self, original: nn.Module) -> Installable:
        module = module_type(self.type).from_config(self.config, original)
        own = module.own_state()
        if set(own) != set(self.tensors):
            raise PatchIntegrityError(f"{self.path}: {self.type} holds {sorted(own)}, the patch stores {sorted(self.tensors)}")
        with torch.no_grad():
            for k, t in own.items():
                want = self.tensors[k]
                if t.shape != want.shape:
                    have, stored = tuple(t.shape), tuple(want.shape)
                    raise PatchIntegrityError(f"{self.path}.{k}: the module holds {have}, the patch stores {stored}")
                # in the module's dtype, as a WeightDelta lands in its parameter's: a chain made in bf16 on a GPU
                # rebuilds on an fp32 CPU base (and bit for bit wherever the dtypes match)
                t.copy_(want.to(t.dtype))
        return module


def install(model: nn.Module, path: str, module: Installable) -> Undo:
    """Put ``module`` at ``path`` (it must wrap the module there now); the Undo puts the very same original back."""
    original = _submodule(model, path)
    if getattr(module, ORIGINAL, None) is not original:
        raise PatchIntegrityError(f"{path}: an installed module must hold the module it replaces as .{ORIGINAL}")
    model.set_submodule(path, module)
    undo = Undo([ModuleSwap(path, original)])
    try:
        module.bind(model)
    except BaseException:
        undo.restore(model)
        raise
    return undo


@contextmanager
def bypassed(model: nn.Module) -> Iterator[None]:
    """The model without its installed modules: each outermost one swapped for the module it wraps innermost
    (the layer as the base has it), all put back after. Weight deltas stay: they cost nothing at inference.
    What an install costs a forward is the difference (``kedit bench``'s latency ratio)."""
    outermost = [path for path, m in model.named_modules() if isinstance(m, Installable)]
    outermost = [p for p in outermost if not any(p.startswith(q + ".") for q in outermost)]
    undo = Undo()
    try:
        for path in outermost:
            inner = model.get_submodule(path)
            while isinstance(inner, Installable):
                inner = getattr(inner, ORIGINAL)
            undo.steps.append(ModuleSwap(path, model.get_submodule(path)))
            model.set_submodule(path, inner)
        yield
    finally:
        undo.restore(model)


@register_patch_kind
@dataclass
class ModulePatch(Patch):
    """Installs, in order (a later one at the same path wraps the earlier one)."""

    kind: ClassVar[str] = "module-patch"
    files: ClassVar[tuple[str, ...]] = (TENSORS, MANIFEST)

    modules: list[InstalledModule] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def apply(self, model: nn.Module) -> Undo:
        """Build each module around what its path holds now and install it; all or nothing."""
        with Undo.all_or_nothing(model) as undo:
            for m in self.modules:
                undo.extend(install(model, m.path, m.build(_submodule(model, m.path))))
        return undo

    def is_empty(self) -> bool:
        return not self.modules

    def describe(self) -> dict[str, Any]:
        mods = [
            {"path": m.path, "type": m.type, "config": m.config, "numel": sum(t.numel() for t in m.tensors.values())}
            for m in self.modules
        ]
        size = sum(t.numel() * t.element_size() for m in self.modules for t in m.tensors.values())
        return {"kind": self.kind, "paths": [m.path for m in self.modules], "modules": mods, "bytes": size}

    def save(self, directory: str | Path) -> Path:
        tensors = {f"{i}::{k}": t.detach().cpu().contiguous() for i, m in enumerate(self.modules) for k, t in m.tensors.items()}
        entries = [{"path": m.path, "type": m.type, "config": m.config, "tensors": sorted(m.tensors)} for m in self.modules]
        save_tensors(Path(directory), TENSORS, MANIFEST, {"format": FORMAT, "modules": entries, "meta": self.meta}, tensors)
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path) -> ModulePatch:
        """Checks the manifest and the tensors' sha256, and that every type is known, before building anything."""
        d = Path(directory)
        manifest, tensors = load_tensors(d, TENSORS, MANIFEST, FORMAT)
        modules = []
        for i, e in enumerate(manifest["modules"]):
            module_type(e["type"])
            missing = [k for k in e["tensors"] if f"{i}::{k}" not in tensors]
            if missing:
                raise PatchIntegrityError(f"{d / TENSORS}: no tensors {missing} for {e['path']}")
            modules.append(InstalledModule(e["path"], e["type"], e["config"], {k: tensors[f"{i}::{k}"] for k in e["tensors"]}))
        return cls(modules, manifest.get("meta", {}))


def _submodule(model: nn.Module, path: str) -> nn.Module:
    if not path:
        raise PatchIntegrityError("a module patch cannot replace the model itself")
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PatchIntegrityError(f"the model has no module {path!r}") from None
