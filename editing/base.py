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

from kedit.core.arch import ArchSpec, spec_for
from kedit.core.errors import KeditError
from kedit.core.facts import EditRequest

from .delta import LowRank, Undo, WeightDelta
from .hparams import load_preset

log = logging.getLogger(__name__)


class EditError(KeditError):
    pass


@dataclass
class _Step:
    undo: Undo
    state: dict[str, Any]


class Editor(ABC):
    """Edits a batch of requests in place and returns the WeightDelta it applied.

    Subclasses set ``name`` and ``hparams_cls`` and implement ``_edit``, which must change
    weights only through ``self._apply`` (so the returned delta reproduces them exactly).
    State that must survive between batches goes in ``state_dict`` / ``load_state_dict``.
    """

    name: ClassVar[str]
    hparams_cls: ClassVar[type]
    method_dir: ClassVar[Path]

    def __init__(self, model: nn.Module, tokenizer, hparams=None):
        self.model = model
        self.tok = tokenizer
        self.spec: ArchSpec = spec_for(model)
        self.hparams = hparams if hparams is not None else self.preset(model)
        self._history: list[_Step] = []

    @classmethod
    def preset(cls, model: nn.Module, overrides: dict[str, Any] | None = None):
        """The preset for the model's family, with optional dotted overrides (validated the same way)."""
        return load_preset(cls.hparams_cls, cls.method_dir, model.config.model_type, overrides)

    # ------------------------------------------------------------------ public API

    def edit(self, requests: Sequence[EditRequest]) -> WeightDelta:
        if not requests:
            raise EditError("no requests to edit")
        self.check(requests)
        state = self.state_dict()
        self._pending = WeightDelta(meta={"editor": self.name, "request_ids": [r.id for r in requests]})
        self._undo = Undo({})
        try:
            self._edit(list(requests))
        except BaseException:
            self._undo.restore(self.model)
            self.load_state_dict(state)
            raise
        self._history.append(_Step(self._undo, state))
        return self._pending

    def revert(self) -> None:
        """Undo the last edit: weights bit for bit, and the editor's state."""
        if not self._history:
            raise EditError("nothing to revert")
        step = self._history.pop()
        step.undo.restore(self.model)
        self.load_state_dict(step.state)

    def commit(self) -> None:
        """Forget the undo information of past edits (their snapshots cost memory)."""
        self._history.clear()

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """Compute what is expensive and reused across batches (key statistics) ahead of the first edit."""

    def check(self, requests: Sequence[EditRequest]) -> None:  # noqa: B027 - optional hook
        """Reject requests this method cannot handle, with a clear message."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise EditError(f"{self.name} keeps no state, got keys {sorted(state)}")

    # ------------------------------------------------------------------ for subclasses

    @abstractmethod
    def _edit(self, requests: list[EditRequest]) -> None: ...

    def _apply(self, name: str, update) -> None:
        """Apply one parameter's update now and record it in the pending delta.

        A parameter updated twice in one edit is reset and given the accumulated update in one
        addition, exactly as applying the stored delta to the base will do.
        """
        self._pending.add(name, update)
        if name in self._undo.saved:
            Undo({name: self._undo.saved[name]}).restore(self.model)
            WeightDelta({name: self._pending.parts[name]}).apply(self.model)
        else:
            self._undo.saved.update(WeightDelta({name: update}).apply(self.model).saved)

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


def weight_as_out_in(module: nn.Module) -> torch.Tensor:
    """The module's weight as (d_out, d_in) fp32."""
    w = module.weight.detach().float()
    return w if isinstance(module, nn.Linear) else w.T


# ---------------------------------------------------------------------- registry

EDITORS: dict[str, type[Editor]] = {}


def register(cls: type[Editor]) -> type[Editor]:
    if cls.name in EDITORS:
        raise ValueError(f"editor {cls.name!r} is already registered ({EDITORS[cls.name].__module__})")
    EDITORS[cls.name] = cls
    return cls


def get_editor(name: str) -> type[Editor]:
    if name not in EDITORS:
        raise EditError(f"unknown editor {name!r}; available: {', '.join(sorted(EDITORS))}")
    return EDITORS[name]


def make_editor(name: str, model: nn.Module, tokenizer, overrides: dict[str, Any] | None = None, corpus=None) -> Editor:
    """Build a registered editor with its family preset (plus overrides); ``corpus`` goes to editors that take one."""
    cls = get_editor(name)
    kwargs = {"corpus": corpus} if "corpus" in cls.__init__.__code__.co_varnames else {}
    return cls(model, tokenizer, cls.preset(model, overrides or None), **kwargs)
