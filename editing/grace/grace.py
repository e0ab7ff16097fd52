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

from pathlib import Path

import torch

from editing.base import register
from editing.ids import label_id, slot_id
from editing.keys import read_at_subject
from editing.targets import optimize_targets
from kedit.core.facts import EditRequest

from .hparams import GRACEHyperParams
from .memory import Book, CodebookEditor

ADD, GROW, SPLIT, REPLACE = 0, 1, 2, 3  # what a request did to the codebook (diagnostics["action"])


def at_last_token(requests: list[EditRequest]) -> list[EditRequest]:
    """The same facts with the whole prompt as the 'subject': its last token is where the answer is predicted."""
    return [EditRequest(r.id, r.text, "{}", r.target_new) for r in requests]


@register
class GRACE(CodebookEditor):
    name = "grace"
    hparams_cls = GRACEHyperParams
    method_dir = Path(__file__).parent

    # ------------------------------------------------------------------ the method, in the paper's order

    def _edit(self, requests: list[EditRequest]) -> None:
        at = at_last_token(requests)
        keys = read_at_subject(self.model, self.tok, at, ("{}",), [self.path()], "input")[self.path()]  # (n, d_in)
        book = self._working_copy()
        plan = self._place(book, keys, requests)
        self._train_values(book, plan, at)
        self._write(book, self.hparams.codebook.capacity)

    def _place(self, book: Book, keys: torch.Tensor, requests: list[EditRequest]) -> dict[int, int]:
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

    def _train_values(self, book: Book, plan: dict[int, int], at: list[EditRequest]) -> None:
        if not plan:
            return
        idx = sorted(plan)
        path = self.path()
        # a value replaces the layer's output where its key is hit; over the prompt alone that is the same as adding δ
        hp = self.hparams
        requests = [at[i] for i in idx]
        t = optimize_targets(self.model, self.tok, self.spec, requests, ("{}",), [path], hp.layer, hp.value, replace=True)
        values = (t.originals[path] + t.deltas[path]).cpu()  # (m, d_out): the output the model should have there
        book.values[torch.tensor([plan[i] for i in idx])] = values
        nll = torch.full((len(at),), float("nan"))  # a request that joined an entry trained no value
        nll[torch.tensor(idx)] = t.nll.cpu()
        steps = torch.zeros(len(at))
        steps[torch.tensor(idx)] = t.steps.float()
        self.diagnostics |= {"value_nll": nll.tolist(), "value_steps": steps.tolist()}
