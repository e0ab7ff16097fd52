"""What an edit leaves behind, as patches of registered kinds (see base.py for the protocol)."""

from .adapter import LinearAdapter
from .base import (
    PATCH_KINDS,
    ModuleSwap,
    Patch,
    PatchIntegrityError,
    TensorSnapshot,
    Undo,
    patch_kind,
    register_patch_kind,
)
from .modules import (
    MODULE_TYPES,
    Installable,
    InstalledModule,
    ModulePatch,
    bypassed,
    install,
    module_type,
    register_module_type,
)
from .patchset import PatchSet
from .values import WeightValues
from .weights import Dense, LowRank, WeightDelta

__all__ = [
    "bypassed",
    "MODULE_TYPES",
    "PATCH_KINDS",
    "PatchIntegrityError",
    "Dense",
    "Installable",
    "InstalledModule",
    "LinearAdapter",
    "LowRank",
    "ModulePatch",
    "ModuleSwap",
    "Patch",
    "PatchSet",
    "TensorSnapshot",
    "Undo",
    "WeightDelta",
    "WeightValues",
    "install",
    "module_type",
    "patch_kind",
    "register_module_type",
    "register_patch_kind",
]
