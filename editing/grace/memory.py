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
from editing.patches import Dense, LowRank

from .codebook import Codebook, codebooks


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


def _write_rows(prefix: str, cb: Codebook, book: Book, start: int, stop: int, apply: Callable[[str, object], None]) -> None:
    new = {name: getattr(book, name)[start:stop] for name in ("keys", "values", "radii")}
    old = {name: getattr(cb, name)[: stop - start].detach().float().cpu() for name in ("keys", "values", "radii")}
    changed = (new["keys"] != old["keys"]).any(-1) | (new["values"] != old["values"]).any(-1) | (new["radii"] != old["radii"])
    rows = changed.nonzero().flatten()  # (m,)
    if not len(rows):
        return
    onehot = F.one_hot(rows, cb.capacity).T.float()  # (C, m): the update touches these rows only
    for name in ("keys", "values"):  # each its own one-hot: a saved patch stores every tensor once
        apply(f"{prefix}.{name}", LowRank(onehot.clone(), (new[name] - old[name])[rows]))
    radii = torch.zeros(cb.capacity)
    radii[rows] = (new["radii"] - old["radii"])[rows]
    apply(f"{prefix}.radii", Dense(radii))


class CodebookEditor(Editor):
    """An editor whose facts live in a codebook at one block's MLP output projection (``hparams.layer``).

    Its state is which fact (``slots``) and which target (``labels``) each entry holds, hashed, innermost
    codebook first: saved with every version, it is what a later stream resumes from."""

    installs_memories = True

    def __init__(self, model, tokenizer, hparams=None):
        super().__init__(model, tokenizer, hparams)
        self.slots = torch.zeros(0, dtype=torch.int64)  # (n,)
        self.labels = torch.zeros(0, dtype=torch.int64)  # (n,)

    def path(self) -> str:
        return self.spec.module_path("mlp_out", self.hparams.layer)

    def state_dict(self) -> dict:
        return {"slots": self.slots.clone(), "labels": self.labels.clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"slots", "labels"} or state["slots"].shape != state["labels"].shape:
            raise EditError(f"{self.name} state holds 'slots' and 'labels' of one length, got {sorted(state)}")
        self.slots, self.labels = state["slots"].clone(), state["labels"].clone()

    def _working_copy(self) -> Book:
        """The entries installed at ``path()`` with the record of what each holds; they must agree in number."""
        path = self.path()
        books, layer = codebooks(self.model.get_submodule(path))
        # nn.Linear keeps (d_out, d_in), GPT-2's Conv1D (d_in, d_out)
        d_in, d_out = layer.weight.shape[::-1] if isinstance(layer, nn.Linear) else layer.weight.shape
        n = sum(b.n_entries() for b in books)
        if n != len(self.slots):
            raise EditError(f"the model holds {n} codebook entries at {path}, the editor's state {len(self.slots)}")
        used = [b for b in books if b.n_entries()]

        def cat(name: str, width: int | None) -> torch.Tensor:
            parts = [getattr(b, name)[: b.n_entries()].detach().float().cpu() for b in used]
            empty = torch.zeros((0, width) if width is not None else (0,))
            return torch.cat(parts) if parts else empty

        return Book(cat("keys", d_in), cat("values", d_out), cat("radii", None), self.slots.clone(), self.labels.clone())

    def _write(self, book: Book, first_capacity: int) -> None:
        """Changed rows of installed codebooks as row deltas (before any install: ``_apply`` refuses names inside a
        module installed in the same edit), then the rows that do not fit into a new codebook twice as large
        around the full one; the book's record of what each entry holds becomes the editor's state."""
        path = self.path()
        books, _ = codebooks(self.model.get_submodule(path))
        start = 0
        for i, cb in enumerate(books):  # innermost first, as the entries are numbered
            depth = len(books) - 1 - i  # the outermost sits at path, the one inside it at path.original, ...
            stop = min(start + cb.capacity, len(book.radii))
            if stop > start:
                _write_rows(path + ".original" * depth, cb, book, start, stop, self._apply)
            start += cb.capacity
        # entries fill the codebooks innermost first, so rows past the installed capacity (start) are all new
        if start < len(book.radii):
            spill = len(book.radii) - start
            capacity = max(2 * books[-1].capacity if books else first_capacity, spill)
            cb = Codebook(self.model.get_submodule(path), capacity, book.keys.shape[-1], book.values.shape[-1])
            with torch.no_grad():
                for name in ("keys", "values", "radii"):
                    getattr(cb, name)[:spill] = getattr(book, name)[start:].to(getattr(cb, name))
            self._install(path, cb)
        self.slots, self.labels = book.slots, book.labels
