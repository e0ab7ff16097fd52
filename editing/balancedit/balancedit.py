"""BalancEdit (Guo et al., ICML 2025), text version: a codebook whose scope is learned per fact; weights stay.

1. key: the MLP output projection's input at the subject's last token (ROME's key: `kedit bench keys` finds
   a fact's rephrasings nearer there than other subjects, where GRACE's prompt-last-token key has none);
2. samples (samples.py): positives, the prompt after the model's own prefixes and in other frames;
   negatives, every other token of those prompts, the prompt about the batch's other subjects, and the
   keys of every other fact in the codebook or the batch;
3. scope: the radius sits between the farthest positive still nearer than the nearest negative (p*) and that
   negative (n*): r = p* + balance (n* - p*). Where two keys' scopes overlap, the nearer key answers;
4. value: the projection's output at the subject plus ROME's target vector (context templates, KL on the
   subject's essence), trained in place (it replaces the output at the subject in every row, as it will in any
   context), so a hit at the subject's token makes the model state target_new;
5. write: as GRACE's codebook (editing/grace/memory.py); a re-edit of a fact the codebook holds (same
   subject and prompt) replaces its entry.

The text version keys on a hidden state of any layer: an image-conditioned key is another input to step 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from editing.base import EditError, register
from editing.grace.grace import ADD, REPLACE
from editing.grace.memory import Book, CodebookEditor
from editing.ids import label_id, slot_id
from editing.keys import context_templates, read_at_subject, read_every_position
from editing.targets import optimize_targets
from kedit.core.facts import EditRequest

from .hparams import BalancEditHyperParams
from .samples import positives, substitutions


@register
class BalancEdit(CodebookEditor):
    name = "balancedit"
    hparams_cls = BalancEditHyperParams
    method_dir = Path(__file__).parent

    def __init__(self, model, tokenizer, hparams=None):
        super().__init__(model, tokenizer, hparams)
        self._templates: tuple[str, ...] | None = None

    def require_supported(self, requests) -> None:
        for r in requests:
            if not r.subject.strip() or not self.tok(r.subject, add_special_tokens=False)["input_ids"]:
                raise EditError(f"{self.name} keys a fact at its subject's last token: request {r.id!r} has no subject token")

    def templates(self) -> tuple[str, ...]:
        if self._templates is None:
            t = self.hparams.templates
            self._templates = context_templates(self.model, self.tok, t.count, t.length)
        return self._templates

    # ------------------------------------------------------------------ the method, in the paper's order

    def _edit(self, requests: list[EditRequest]) -> None:
        path = self.path()
        keys = read_at_subject(self.model, self.tok, requests, ("{}",), [path], "input")[path].cpu()  # (n, d_in)
        book = self._working_copy()
        radii = self.scope(requests, keys, book)
        plan = self._place(book, requests, keys, radii)
        self._train_values(book, plan, requests)
        self._write(book, self.hparams.scope.capacity)

    def scope(self, requests: list[EditRequest], keys: torch.Tensor, book: Book) -> torch.Tensor:
        """(n,) each fact's radius, from its positive and negative samples' distances to its key (n, d_in), with
        the facts ``book`` holds as negatives too. Records the samples and the distances in the diagnostics."""
        n = len(requests)
        path = self.path()
        pos, pos_owner = positives(requests, self.templates() + self.hparams.frames, self.held_out)
        subs, sub_owner = substitutions(requests)
        self.samples = [q.text for q in pos]
        # one forward for every row: the prompts themselves (their subject's token is the key, distance 0) and
        # their positives, whose subject's token should be taken in and every other token left out; then the
        # prompts about the batch's other subjects, whose subject's token must be left out
        rows = list(requests) + pos + subs
        owner = torch.tensor(list(range(n)) + pos_owner + sub_owner, dtype=torch.long)  # (R,)
        states, at, real = read_every_position(self.model, self.tok, rows, path)  # (R, T, d_in), (R,), (R, T)
        d = torch.linalg.vector_norm(states.cpu() - keys[owner][:, None], dim=-1)  # (R, T)
        ar = torch.arange(len(rows))
        at, real = at.cpu(), real.cpu()
        is_sub = ar >= n + len(pos)  # (R,)
        d_at = d[ar, at]  # (R,) the subject's token
        negative = real.clone()
        negative[is_sub] = False  # of a prompt about another subject, only that subject's token is a negative
        negative[ar, at] = is_sub
        nearest_neg = torch.full((n,), float("inf")).scatter_reduce(
            0, owner, d.masked_fill(~negative, float("inf")).amin(-1), "amin"
        )
        d_pos, owner = d_at[~is_sub], owner[~is_sub]  # the prompts and their positives
        nearest_neg = torch.minimum(nearest_neg, self._nearest_other_fact(requests, keys, book))
        # p*: the farthest positive that is still nearer than the nearest negative (0: the key alone)
        inside = d_pos < nearest_neg[owner]
        farthest = torch.zeros(n).scatter_reduce(0, owner, d_pos.masked_fill(~inside, 0.0), "amax")
        radius = farthest + self.hparams.scope.balance * (nearest_neg - farthest)
        # a fact with no negative at all (a one-token prompt alone in an empty codebook): its positives bound it
        far_all = torch.zeros(n).scatter_reduce(0, owner, d_pos, "amax")
        radius = torch.where(nearest_neg.isinf(), far_all, radius)
        n_pos = torch.bincount(owner, minlength=n) - 1
        self.diagnostics |= {
            "radius": radius.tolist(),
            "farthest_positive": far_all.tolist(),
            "nearest_negative": nearest_neg.tolist(),
            "separable": (far_all < nearest_neg).float().tolist(),
            "positives": n_pos.float().tolist(),
        }
        return radius

    def _nearest_other_fact(self, requests: list[EditRequest], keys: torch.Tensor, book: Book) -> torch.Tensor:
        """(n,) the distance to the nearest key of another fact: the codebook's and the batch's."""
        slots = torch.tensor([slot_id(r) for r in requests])  # (n,)
        all_keys = torch.cat([book.keys, keys])  # (m + n, d_in)
        all_slots = torch.cat([book.slots, slots])
        d = torch.cdist(keys, all_keys)  # (n, m + n)
        # the batch's own keys are among them, so d has a column per request: never empty
        return d.masked_fill(slots[:, None] == all_slots[None], float("inf")).amin(-1)

    def _place(self, book: Book, requests: list[EditRequest], keys: torch.Tensor, radii: torch.Tensor) -> dict[int, int]:
        """request -> entry: a re-edit of a fact the codebook holds replaces its entry, any other fact adds one."""
        plan, actions = {}, []
        for i, r in enumerate(requests):
            same = (book.slots == slot_id(r)).nonzero().flatten()
            if len(same):
                j = int(same[0])
                book.keys[j], book.radii[j], book.labels[j] = keys[i], radii[i], label_id(r)
                plan[i], action = j, REPLACE
            else:
                plan[i], action = book.append(keys[i], radii[i], slot_id(r), label_id(r)), ADD
            actions.append(float(action))
        self.diagnostics["action"] = actions
        return plan

    def _train_values(self, book: Book, plan: dict[int, int], requests: list[EditRequest]) -> None:
        path = self.path()
        hp = self.hparams
        # trained where the scope reaches: after the generated prefixes and in the question frames
        templates = self.templates() + hp.frames
        # the value replaces the output at the subject in every context, so it is trained as it will act
        t = optimize_targets(self.model, self.tok, self.spec, requests, templates, [path], hp.layer, hp.value, replace=True)
        # (n, d_out): the output the model should have at the subject; a later request of one slot wins
        values = (t.originals[path] + t.deltas[path]).cpu()
        last = {j: i for i, j in plan.items()}  # entry -> the batch's last request for it
        book.values[torch.tensor(list(last))] = values[torch.tensor(list(last.values()))]
        self.diagnostics |= {"value_nll": t.nll.cpu().tolist(), "value_steps": t.steps.float().tolist()}
