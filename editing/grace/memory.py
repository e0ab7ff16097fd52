"""The codebook as an editor reads and writes it (``CodebookEditor``): a flat working copy of every installed
codebook's entries (innermost first), and the write that turns a changed copy back into patches.

Shared by the codebook editors (GRACE, BalancEdit): they differ in where a key is read, how its radius is
set and how a value is trained, not in how entries are stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from editing.base import EditError, Editor
from editing.patches import Dense, Installable, LowRank

from .codebook import Answers, Codebook, Scope, codebooks


@dataclasses.dataclass
class Book:
    """Entries of every installed codebook at one path, innermost first."""

    keys: torch.Tensor  # (n, d_in) fp32
    values: torch.Tensor  # (n, d_out) fp32
    radii: torch.Tensor  # (n,) fp32
    slots: torch.Tensor  # (n,) int64: which fact each entry holds (hashed)
    labels: torch.Tensor  # (n,) int64: which target

    def append(self, key, radius, slot, label) -> int:
        """A new entry; its value is trained afterwards and starts at zero."""
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, self.values.new_zeros(1, self.values.shape[-1])])
        self.radii = torch.cat([self.radii, torch.as_tensor(radius, dtype=self.radii.dtype).reshape(1)])
        self.slots = torch.cat([self.slots, torch.tensor([slot])])
        self.labels = torch.cat([self.labels, torch.tensor([label])])
        return len(self.radii) - 1


def _write_rows(
    parts: list[tuple[str, nn.Module]], capacity: int, book: Book, start: int, stop: int, apply: Callable[[str, object], None]
) -> None:
    """Rows start..stop of the book into one codebook, whose tensors ``parts`` hold between them: (prefix,
    module) pairs, one codebook, or a split codebook's scope (keys, radii) and answers (values)."""
    held = {name: (prefix, m) for prefix, m in parts for name in m.rows}
    new = {name: getattr(book, name)[start:stop] for name in Codebook.rows}
    old = {name: getattr(m, name)[: stop - start].detach().float().cpu() for name, (_, m) in held.items()}
    changed = (new["keys"] != old["keys"]).any(-1) | (new["values"] != old["values"]).any(-1) | (new["radii"] != old["radii"])
    rows = changed.nonzero().flatten()  # (m,)
    if not len(rows):
        return
    onehot = F.one_hot(rows, capacity).T.float()  # (C, m): the update touches these rows only
    for name in ("keys", "values"):  # each its own one-hot: a saved patch stores every tensor once
        apply(f"{held[name][0]}.{name}", LowRank(onehot.clone(), (new[name] - old[name])[rows]))
    radii = torch.zeros(capacity)
    radii[rows] = (new["radii"] - old["radii"])[rows]
    apply(f"{held['radii'][0]}.radii", Dense(radii))


def _layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out): nn.Linear keeps (d_out, d_in), GPT-2's Conv1D (d_in, d_out)."""
    return tuple(layer.weight.shape[::-1] if isinstance(layer, nn.Linear) else layer.weight.shape)


class CodebookEditor(Editor):
    """An editor whose facts live in a codebook at one block's MLP output projection (``hparams.layer``), or
    split: its keys there and its values at a later block's (``value_layer()``).

    Its state is which fact (``slots``) and which target (``labels``) each entry holds, hashed, innermost
    codebook first: saved with every version, it is what a later stream resumes from."""

    installs_memories = True

    def __init__(self, model, tokenizer, hparams=None):
        super().__init__(model, tokenizer, hparams)
        self.slots = torch.zeros(0, dtype=torch.int64)  # (n,)
        self.labels = torch.zeros(0, dtype=torch.int64)  # (n,)

    def path(self) -> str:
        """Where the keys are read and the codebook (or its scope) sits."""
        return self.spec.module_path("mlp_out", self.hparams.layer)

    def value_layer(self) -> int:
        """The block whose MLP output a value replaces: the key's own, unless an editor's hparams say otherwise."""
        return self.hparams.layer

    def value_path(self) -> str:
        return self.spec.module_path("mlp_out", self.value_layer())

    def split(self) -> bool:
        return self.value_layer() != self.hparams.layer

    def _stacks(self) -> list[list[tuple[str, nn.Module]]]:
        """Per installed codebook, innermost first: the (prefix, module) parts that hold its tensors; refuses a
        model whose codebooks are laid out otherwise than this editor's hparams say."""
        path, vpath = self.path(), self.value_path()
        whole, _ = codebooks(self.model.get_submodule(path))
        scopes, _ = codebooks(self.model.get_submodule(path), Scope)
        answers, _ = codebooks(self.model.get_submodule(vpath), Answers)
        layout = "split" if self.split() else "whole"
        if (whole and self.split()) or ((scopes or answers) and not self.split()) or len(scopes) != len(answers):
            raise EditError(
                f"{path} holds {len(whole)} codebooks and {len(scopes)} scopes, {vpath} {len(answers)} answers: "
                f"not the {layout} codebook this editor's layers ({self.hparams.layer}, {self.value_layer()}) make"
            )

        def prefix(p: str, depth: int) -> str:  # the outermost sits at p, the one inside it at p.original, ...
            return p + ".original" * depth

        if not self.split():
            return [[(prefix(path, len(whole) - 1 - i), cb)] for i, cb in enumerate(whole)]
        n = len(scopes)
        return [[(prefix(path, n - 1 - i), s), (prefix(vpath, n - 1 - i), a)] for i, (s, a) in enumerate(zip(scopes, answers))]

    def state_dict(self) -> dict:
        return {"slots": self.slots.clone(), "labels": self.labels.clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"slots", "labels"} or state["slots"].shape != state["labels"].shape:
            raise EditError(f"{self.name} state holds 'slots' and 'labels' of one length, got {sorted(state)}")
        self.slots, self.labels = state["slots"].clone(), state["labels"].clone()

    def _working_copy(self) -> Book:
        """The entries installed at ``path()`` (and ``value_path()``) with the record of what each holds; they
        must agree in number."""
        d_in, _ = _layer_shape(codebooks(self.model.get_submodule(self.path()), Installable)[1])
        _, d_out = _layer_shape(codebooks(self.model.get_submodule(self.value_path()), Installable)[1])
        stacks = self._stacks()
        held = [{name: getattr(m, name) for _, m in parts for name in m.rows} for parts in stacks]
        counts = [int((h["radii"] >= 0).sum()) for h in held]
        if sum(counts) != len(self.slots):
            held_n, path = sum(counts), self.path()
            raise EditError(f"the model holds {held_n} codebook entries at {path}, the editor's state {len(self.slots)}")

        def cat(name: str, width: int | None) -> torch.Tensor:
            parts = [h[name][:c].detach().float().cpu() for h, c in zip(held, counts) if c]
            empty = torch.zeros((0, width) if width is not None else (0,))
            return torch.cat(parts) if parts else empty

        return Book(cat("keys", d_in), cat("values", d_out), cat("radii", None), self.slots.clone(), self.labels.clone())

    def _write(self, book: Book, first_capacity: int) -> None:
        """Changed rows of installed codebooks as row deltas (before any install: ``_apply`` refuses names inside a
        module installed in the same edit), then the rows that do not fit into a new codebook twice as large
        around the full one (a split one: its scope, then its answers, bound to that scope); the book's record
        of what each entry holds becomes the editor's state."""
        stacks = self._stacks()
        start = 0
        capacity = 0
        for parts in stacks:  # innermost first, as the entries are numbered
            capacity = parts[0][1].capacity
            stop = min(start + capacity, len(book.radii))
            if stop > start:
                _write_rows(parts, capacity, book, start, stop, self._apply)
            start += capacity
        # entries fill the codebooks innermost first, so rows past the installed capacity (start) are all new
        if start < len(book.radii):
            spill = len(book.radii) - start
            capacity = max(2 * capacity if stacks else first_capacity, spill)
            for path, module in self._new_codebook(capacity, book, start):
                self._install(path, module)
        self.slots, self.labels = book.slots, book.labels

    def _new_codebook(self, capacity: int, book: Book, start: int) -> list[tuple[str, Installable]]:
        """Modules holding the book's rows from ``start`` on, in the order they install."""
        path, vpath = self.path(), self.value_path()
        d_in, d_out = book.keys.shape[-1], book.values.shape[-1]
        if self.split():
            modules = [(path, Scope(self.model.get_submodule(path), capacity, d_in))]
            modules.append((vpath, Answers(self.model.get_submodule(vpath), capacity, d_out, path)))
        else:
            modules = [(path, Codebook(self.model.get_submodule(path), capacity, d_in, d_out))]
        spill = len(book.radii) - start
        with torch.no_grad():
            for _, m in modules:
                for name in m.rows:
                    getattr(m, name)[:spill] = getattr(book, name)[start:].to(getattr(m, name))
        return modules
