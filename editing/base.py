"""The editor interface, the registry, and helpers shared by every method (none named here)."""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from kedit.core import registry
from kedit.core.arch import ArchSpec, spec_for
from kedit.core.errors import KeditError
from kedit.core.facts import EditRequest

from .hparams import load_preset
from .patches import Installable, InstalledModule, LowRank, ModulePatch, PatchSet, Undo, WeightDelta, install, module_type

log = logging.getLogger(__name__)


class EditError(KeditError):
    pass


@dataclass
class _Step:
    undo: Undo
    state: dict[str, Any]


class Editor(ABC):
    """Edits a batch of requests in place and returns the PatchSet it applied.

    Subclasses set ``name`` and ``hparams_cls`` and implement ``_edit``, which must change the
    model only through ``self._apply`` (updates of existing parameters) and ``self._install``
    (modules put at a path in place of the module there), so the returned patches reproduce the
    edit exactly. State that must survive between batches goes in ``state_dict`` / ``load_state_dict``.
    What an edit measures about itself per request (a target's final NLL, the optimizer steps it took)
    goes in ``self.diagnostics``: name -> one float per request of the last ``edit``, in order.
    Texts an edit generated and read besides the requests' own prompts (an editor's positive samples) go in
    ``self.samples``; ``held_out`` names texts (normalized) no edit may use, so that a benchmark can keep what
    it scores out of everything the editor sees (``kedit.app.bench`` sets it and checks ``samples``).

    ``assets`` names inputs that are not weights (a text corpus for key statistics; later a trained
    network): each is a keyword argument of ``__init__``, and ``make_editor`` passes only the ones
    a class declares. What an editor derives from an asset and caches on disk is keyed by the
    base model's weights it depends on (key statistics hash those tensors and the corpus, see
    editing/stats.py), so a cache is never reused for another base.
    """

    name: ClassVar[str]
    hparams_cls: ClassVar[type]
    method_dir: ClassVar[Path]
    assets: ClassVar[tuple[str, ...]] = ()
    trains: ClassVar[str | None] = None  # the asset this method trains itself (kedit train NAME), if any
    # whether its per-fact targets can be looked up and shared (editing/exchange.py): set ``exchange`` to use it
    shares_targets: ClassVar[bool] = False
    # whether its edits install memories (modules that answer some inputs from their own store: kedit.core.routing)
    installs_memories: ClassVar[bool] = False

    def __init__(self, model: nn.Module, tokenizer, hparams=None):
        self.model = model
        self.tok = tokenizer
        self.spec: ArchSpec = spec_for(model)
        self.hparams = hparams if hparams is not None else self.preset(model)
        self._history: list[_Step] = []
        self.diagnostics: dict[str, list[float]] = {}
        self.samples: list[str] = []
        self.held_out: frozenset[str] = frozenset()

    @classmethod
    def preset(cls, model: nn.Module, overrides: dict[str, Any] | None = None):
        """The preset for the model's family, with optional dotted overrides (validated the same way)."""
        return load_preset(cls.hparams_cls, cls.method_dir, model.config.model_type, overrides)

    # ------------------------------------------------------------------ public API

    def edit(self, requests: Sequence[EditRequest]) -> PatchSet:
        """Edit in place; returns the patches of this edit: its WeightDelta, then its ModulePatch, each if non-empty."""
        if not requests:
            raise EditError("no requests to edit")
        self.require_supported(requests)
        state = self.state_dict()
        meta = {"editor": self.name, "request_ids": [r.id for r in requests]}
        if self.provenance():
            meta["assets"] = self.provenance()
        self._pending = WeightDelta(meta=meta)
        self._installed: list[tuple[str, Installable]] = []
        self._undo = Undo()
        self.diagnostics = {}
        self.samples = []
        try:
            self._edit(list(requests))
            # recorded after _edit: an installed module may be trained after its install
            modules = ModulePatch([InstalledModule.snapshot(p, m) for p, m in self._installed], dict(meta))
        except BaseException:
            self._undo.restore(self.model)
            self.load_state_dict(state)
            raise
        self._history.append(_Step(self._undo, state))
        # weights first: their names are the model's before this edit's installs (_apply refuses names inside them)
        parts = [p for p in (self._pending, modules) if not p.is_empty()]
        return PatchSet(parts, dict(meta))

    def revert(self) -> None:
        """Undo the last edit: weights bit for bit, the very module objects its installs replaced, and the editor's state."""
        if not self._history:
            raise EditError("nothing to revert")
        step = self._history.pop()
        step.undo.restore(self.model)
        self.load_state_dict(step.state)

    def commit(self) -> None:
        """Forget the undo information of past edits (their snapshots cost memory); the edits since the last
        commit are now in a version (``version_state`` starts over)."""
        self._history.clear()

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Compute what is expensive and reused across batches (key statistics) ahead of the first edit."""

    def require_supported(self, requests: Sequence[EditRequest]) -> None:  # noqa: B027 - optional hook
        """Reject requests this method cannot handle, with a clear message."""

    @classmethod
    def trainable_facts(cls, facts: Sequence[EditRequest]) -> list[EditRequest]:
        """Of ``facts``, those the method's training can use (a trained method overrides this)."""
        return []

    @classmethod
    def train_asset(
        cls, model, tokenizer, hparams, train, val, checkpoints: Path, out: Path, fingerprint: str, info, on_metrics, max_seconds
    ):
        """Train the asset ``trains`` names into ``out`` (resuming from ``checkpoints``); returns a summary with
        ``step``, ``best_step`` and ``stopped``. Only methods with ``trains`` set implement it."""
        raise EditError(f"{cls.name} has nothing to train")

    @classmethod
    def open_asset(cls, name: str, directory: Path, fingerprint: str, provenance: dict[str, str]) -> Any:
        """Load the file asset ``name`` (a trained network) from ``directory`` for the base model ``fingerprint``,
        verified; ``provenance`` says where it was fetched from. Editors with such an asset override this."""
        raise EditError(f"{cls.name} has no file asset {name!r}")

    def trained_on(self) -> frozenset[str]:
        """Ids of the facts a trained asset of this editor learned from: a benchmark refuses to score them."""
        return frozenset()

    def provenance(self) -> dict[str, str]:
        """Where the assets an edit depends on come from (a trained network's registered name, version and
        sha256): recorded in each patch's meta and in each version made with this editor."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise EditError(f"{self.name} keeps no state, got keys {sorted(state)}")

    def version_state(self) -> dict[str, Any]:
        """What a version stores of the editor's state: all of it (``state_dict``), unless the editor keeps a
        state that grows with every edit and stores only what the edits since the last commit added."""
        return self.state_dict()

    @classmethod
    def state_at(cls, stored: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """The editor's state (``state_dict``) at the last of a run of versions it made, from what each of them
        stored (``version_state``), oldest first: the last one's, for an editor that stores all of it."""
        return dict(stored[-1]) if stored else {}

    # ------------------------------------------------------------------ for subclasses

    @abstractmethod
    def _edit(self, requests: list[EditRequest]) -> None: ...

    def _apply(self, name: str, update) -> None:
        """Apply one parameter's update now and record it in the pending delta.

        A parameter updated twice in one edit is reset and given the accumulated update in one
        addition, exactly as applying the stored delta to the base will do.
        """
        inside = [p for p, _ in self._installed if name.startswith(p + ".")]
        if inside:
            # rebuilt, the delta applies before this edit's installs, when this name does not exist yet
            raise EditError(f"{name} lies inside {inside[0]}, installed in this edit: set its value before _install")
        self._pending.add(name, update)
        old = self._undo.first_snapshot(name)
        if old is not None:
            Undo.of_tensors({name: old}).restore(self.model)
            WeightDelta({name: self._pending.parts[name]}).apply(self.model)
        else:
            self._undo.extend(WeightDelta({name: update}).apply(self.model))

    def _install(self, path: str, module: Installable) -> None:
        """Put ``module`` (a registered installable type holding the module now at ``path`` as ``.original``)
        at ``path`` and record it in the pending module patch; its tensors are recorded when ``_edit`` returns."""
        if not isinstance(module, Installable) or module_type(module.type_name) is not type(module):
            raise EditError(f"{path}: {type(module).__name__} is not a registered installable module type")
        self._undo.extend(install(self.model, path, module))
        self._installed.append((path, module))

    def module(self, kind: str, layer: int) -> nn.Module:
        return self.model.get_submodule(self.spec.module_path(kind, layer))

    def weight_name(self, kind: str, layer: int) -> str:
        return f"{self.spec.module_path(kind, layer)}.weight"


def linear_update(module: nn.Module, out_factor: torch.Tensor, in_factor: torch.Tensor) -> LowRank:
    """ΔW = out_factor @ in_factor, (d_out, r) @ (r, d_in), laid out like the module's weight.

    nn.Linear stores (d_out, d_in); GPT-2's Conv1D stores (d_in, d_out).
    """
    w = module.weight
    if isinstance(module, nn.Linear):
        return LowRank(out_factor.to(w.device), in_factor.to(w.device))
    return LowRank(in_factor.T.contiguous().to(w.device), out_factor.T.contiguous().to(w.device))


# ---------------------------------------------------------------------- registry

EDITORS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    return registry.add(EDITORS, cls.name, cls, "editor")


def get_editor(name: str) -> type[Editor]:
    return registry.lookup(EDITORS, name, "editor", EditError)


def make_editor(
    name: str,
    model: nn.Module,
    tokenizer,
    overrides: dict[str, Any] | None = None,
    *,
    assets: dict[str, Any] | None = None,
) -> Editor:
    """Build a registered editor with its family preset (plus overrides) and the assets its class declares.

    ``assets`` maps asset names to values; names no registered editor declares raise, and the ones
    this editor does not declare are left out (a stream passes its corpus whatever the editor).
    """
    cls = get_editor(name)
    given = dict(assets or {})
    known = {a for c in EDITORS.values() for a in c.assets}
    unknown = sorted(set(given) - known)
    if unknown:
        raise EditError(f"unknown editor asset(s) {unknown}; editors declare: {sorted(known) or 'none'}")
    kwargs = {k: v for k, v in given.items() if k in cls.assets}
    return cls(model, tokenizer, cls.preset(model, overrides or None), **kwargs)
