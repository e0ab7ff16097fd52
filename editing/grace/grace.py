"""GRACE (Hartvigsen et al., 2023): a codebook at one layer's MLP output; the model's weights stay as they are.

1. key: the MLP output projection's input at the prompt's last token (where the answer is predicted);
2. codebook rules, in the batch's order, against the nearest entry (distance d, radius r, ε₀ the initial radius):
   - a re-edit of a fact the codebook holds (same subject and prompt) replaces that entry's key and value;
   - d > r + ε₀: a new entry with radius ε₀;
   - otherwise, the same target: the entry's radius grows to d (the new prompt joins it, no new value);
   - otherwise, a conflicting target: a split, both radii become d / 2;
3. value: the projection's output there plus a vector trained so the model emits target_new (all new values of
   the batch jointly, editing/targets.py at that single position, no context templates);
4. write: changed rows of the codebooks already installed as row deltas, new rows into free ones, and a new,
   larger codebook around a full one (editing/grace/codebook.py).

Which fact and target each entry holds (hashed) is the editor's state, saved with every version.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from editing.base import EditError, Editor, register
from editing.keys import read_at_subject
from editing.patches import Dense, LowRank
from editing.targets import optimize_targets
from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize

from .codebook import Codebook, codebooks
from .hparams import GRACEHyperParams

ADD, GROW, SPLIT, REPLACE = 0, 1, 2, 3  # what a request did to the codebook (diagnostics["action"])


def hash64(text: str) -> int:
    """A stable 64-bit id of a string, for editor state that must be tensors."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little", signed=True)


def slot_id(r: EditRequest) -> int:
    return hash64("\x1f".join(r.slot))


def label_id(r: EditRequest) -> int:
    return hash64(normalize(r.target_new))


def at_last_token(requests: list[EditRequest]) -> list[EditRequest]:
    """The same facts with the whole prompt as the 'subject': its last token is where the answer is predicted."""
    return [EditRequest(r.id, r.text, "{}", r.target_new) for r in requests]


@dataclasses.dataclass
class _Book:
    """The codebook as a flat working copy: entries of every installed codebook, innermost first."""

    keys: torch.Tensor  # (n, d_in) fp32
    values: torch.Tensor  # (n, d_out) fp32
    radii: torch.Tensor  # (n,) fp32
    slots: torch.Tensor  # (n,) int64
    labels: torch.Tensor  # (n,) int64

    def append(self, key, radius, slot, label) -> int:
        """A new entry; its value is trained afterwards (``_train_values``) and starts at zero."""
        self.keys = torch.cat([self.keys, key[None]])
        self.values = torch.cat([self.values, self.values.new_zeros(1, self.values.shape[-1])])
        self.radii = torch.cat([self.radii, radius.reshape(1)])
        self.slots = torch.cat([self.slots, torch.tensor([slot])])
        self.labels = torch.cat([self.labels, torch.tensor([label])])
        return len(self.radii) - 1


@register
class GRACE(Editor):
    name = "grace"
    hparams_cls = GRACEHyperParams
    method_dir = Path(__file__).parent

    def __init__(self, model, tokenizer, hparams=None):
        super().__init__(model, tokenizer, hparams)
        self.slots = torch.zeros(0, dtype=torch.int64)  # (n,) which fact each entry holds, innermost codebook first
        self.labels = torch.zeros(0, dtype=torch.int64)  # (n,) which target

    def path(self) -> str:
        return self.spec.module_path("mlp_out", self.hparams.layer)

    def state_dict(self) -> dict[str, Any]:
        return {"slots": self.slots.clone(), "labels": self.labels.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"slots", "labels"} or state["slots"].shape != state["labels"].shape:
            raise EditError(f"grace state holds 'slots' and 'labels' of one length, got {sorted(state)}")
        self.slots, self.labels = state["slots"].clone(), state["labels"].clone()

    # ------------------------------------------------------------------ the method, in the paper's order

    def _edit(self, requests: list[EditRequest]) -> None:
        at = at_last_token(requests)
        keys = read_at_subject(self.model, self.tok, at, ("{}",), [self.path()], "input")[self.path()]  # (n, d_in)
        book = self._working_copy(keys.shape[-1])
        plan = self._place(book, keys, requests)
        self._train_values(book, plan, at)
        self._write(book)
        self.slots, self.labels = book.slots, book.labels

    def _working_copy(self, d_in: int) -> _Book:
        books, layer = codebooks(self.model.get_submodule(self.path()))
        # nn.Linear keeps (d_out, d_in), GPT-2's Conv1D (d_in, d_out)
        d_out = layer.out_features if isinstance(layer, torch.nn.Linear) else layer.weight.shape[1]
        n = sum(b.n_entries() for b in books)
        if n != len(self.slots):
            raise EditError(f"grace: the model holds {n} codebook entries at {self.path()}, the editor's state {len(self.slots)}")
        used = [b for b in books if b.n_entries()]

        def cat(name: str, width: int | None) -> torch.Tensor:
            parts = [getattr(b, name)[: b.n_entries()].detach().float().cpu() for b in used]
            empty = torch.zeros((0, width) if width is not None else (0,))
            return torch.cat(parts) if parts else empty

        return _Book(cat("keys", d_in), cat("values", d_out), cat("radii", None), self.slots.clone(), self.labels.clone())

    def _place(self, book: _Book, keys: torch.Tensor, requests: list[EditRequest]) -> dict[int, int]:
        """Apply the codebook rules request by request (each sees the ones before it); request -> entry
        index for the requests that need a trained value. Records each request's action and distance."""
        eps = torch.tensor(self.hparams.codebook.radius)
        plan: dict[int, int] = {}
        actions, distances = [], []
        for i, (r, key) in enumerate(zip(requests, keys.cpu())):
            slot, label = slot_id(r), label_id(r)
            same = (book.slots == slot).nonzero().flatten()
            if len(book.radii):
                d = torch.linalg.vector_norm(book.keys - key, dim=-1)  # (n,)
                j = int(d.argmin())
                dist = d[j]
            else:
                j, dist = -1, torch.tensor(float("nan"))  # an empty codebook: nothing is near
            if len(same):
                j = int(same[0])
                book.keys[j], book.labels[j] = key, label
                plan[i], action = j, REPLACE
            elif j < 0 or dist > book.radii[j] + eps:
                plan[i], action = book.append(key, eps, slot, label), ADD
            elif book.labels[j] == label:
                book.radii[j] = torch.maximum(book.radii[j], dist)
                action = GROW
            else:
                book.radii[j] = dist / 2
                plan[i], action = book.append(key, dist / 2, slot, label), SPLIT
            actions.append(float(action))
            distances.append(float(dist))
        self.diagnostics |= {"action": actions, "nearest_distance": distances}
        return plan

    def _train_values(self, book: _Book, plan: dict[int, int], at: list[EditRequest]) -> None:
        if not plan:
            return
        idx = sorted(plan)
        path = self.path()
        t = optimize_targets(
            self.model, self.tok, self.spec, [at[i] for i in idx], ("{}",), [path], self.hparams.layer, self.hparams.value
        )
        values = (t.originals[path] + t.deltas[path]).cpu()  # (m, d_out): the output the model should have there
        book.values[torch.tensor([plan[i] for i in idx])] = values
        nll = torch.full((len(at),), float("nan"))  # a request that joined an entry trained no value
        nll[torch.tensor(idx)] = t.nll.cpu()
        steps = torch.zeros(len(at))
        steps[torch.tensor(idx)] = t.steps.float()
        self.diagnostics |= {"value_nll": nll.tolist(), "value_steps": steps.tolist()}

    def _write(self, book: _Book) -> None:
        """Changed rows of installed codebooks as row deltas (before any install: _apply refuses names inside one),
        then the rows that do not fit into a new codebook twice as large around the full one."""
        path = self.path()
        books, _ = codebooks(self.model.get_submodule(path))
        start = 0
        for i, cb in enumerate(books):  # innermost first, as the entries are numbered
            depth = len(books) - 1 - i  # the outermost sits at path, the one inside it at path.original, ...
            stop = min(start + cb.capacity, len(book.radii))
            if stop > start:
                self._write_rows(path + ".original" * depth, cb, book, start, stop)
            start += cb.capacity
        # entries fill the codebooks innermost first, so rows past the installed capacity (start) are all new
        if start < len(book.radii):
            spill = len(book.radii) - start
            capacity = max(2 * books[-1].capacity if books else self.hparams.codebook.capacity, spill)
            cb = Codebook(self.model.get_submodule(path), capacity, book.keys.shape[-1], book.values.shape[-1])
            with torch.no_grad():
                for name in ("keys", "values", "radii"):
                    getattr(cb, name)[:spill] = getattr(book, name)[start:].to(getattr(cb, name))
            self._install(path, cb)

    def _write_rows(self, prefix: str, cb: Codebook, book: _Book, start: int, stop: int) -> None:
        new = {name: getattr(book, name)[start:stop] for name in ("keys", "values", "radii")}
        old = {name: getattr(cb, name)[: stop - start].detach().float().cpu() for name in ("keys", "values", "radii")}
        changed = (new["keys"] != old["keys"]).any(-1) | (new["values"] != old["values"]).any(-1) | (new["radii"] != old["radii"])
        rows = changed.nonzero().flatten()  # (m,)
        if not len(rows):
            return
        onehot = F.one_hot(rows, cb.capacity).T.float()  # (C, m): the update touches these rows only
        for name in ("keys", "values"):  # each its own one-hot: a saved patch stores every tensor once
            self._apply(f"{prefix}.{name}", LowRank(onehot.clone(), (new[name] - old[name])[rows]))
        radii = torch.zeros(cb.capacity)
        radii[rows] = (new["radii"] - old["radii"])[rows]
        self._apply(f"{prefix}.radii", Dense(radii))
