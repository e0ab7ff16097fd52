"""BalancEdit (Guo et al., ICML 2025), text version: a codebook whose scope is learned per fact; weights stay.

1. key: the MLP output projection's input at the subject's last token (ROME's key: `kedit bench keys` finds
   a fact's rephrasings nearer there than other subjects, where GRACE's prompt-last-token key has none);
2. samples (samples.py): positives, the prompt after the model's own prefixes and in other frames;
   negatives, every other token of those prompts, the prompt about the batch's other subjects, the
   keys of every other fact in the codebook or the batch, and every token of some ordinary text (the
   background, read once per editor);
3. scope: the radius sits between the farthest positive still nearer than the nearest negative (p*) and that
   negative (n*): r = p* + balance (n* - p*). Where two keys' scopes overlap, the nearer key answers;
4. value: the projection's output at the subject plus ROME's target vector (context templates, KL on the
   subject's essence), trained in place (it replaces the output at the subject in every row, as it will in any
   context), so a hit at the subject's token makes the model state target_new. It may be written at a later
   block than its key (``value_layer``: a split codebook, editing/grace/codebook.py), where it trains on fewer
   blocks in fewer steps;
5. write: as GRACE's codebook (editing/grace/memory.py); a re-edit of a fact the codebook holds (same
   subject and prompt) replaces its entry.

The text version keys on a hidden state of any layer: an image-conditioned key is another input to step 1.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from editing.base import EditError, register
from editing.grace.grace import ADD, REPLACE, at_last_token
from editing.grace.memory import Book, CodebookEditor
from editing.ids import label_id, slot_id
from editing.keys import context_templates, locate, read_at_subject, read_every_position, read_tokens
from editing.stats import Corpus, corpus_from_model, windows
from editing.targets import optimize_targets
from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize

from .hparams import BalancEditHyperParams
from .samples import positives, substitutions

log = logging.getLogger(__name__)


_SAME_KEY = 1e-3  # a key within this share of its norm of another fact's is the same key (numerics aside)


def _in_order(done: list[tuple[list[int], dict[str, list[float]]]], n: int) -> dict[str, list[float]]:
    """The rounds' diagnostics, each for its own requests (their indices), as one value per request in order."""
    out: dict[str, list[float]] = {}
    for idx, diag in done:
        for name, values in diag.items():
            merged = out.setdefault(name, [float("nan")] * n)
            for i, v in zip(idx, values):
                merged[i] = v
    return out


def _naming(subject: str) -> re.Pattern:
    """The subject as a whole word or words in normalized text."""
    return re.compile(rf"(?<!\w){re.escape(normalize(subject))}(?!\w)")


@dataclass(frozen=True)
class Background:
    states: torch.Tensor  # (M, d_in) the key layer's input at each token of the text
    owner: torch.Tensor  # (M,) the window each token belongs to
    texts: tuple[str, ...]  # (W,) each window's text, normalized


@register
class BalancEdit(CodebookEditor):
    name = "balancedit"
    hparams_cls = BalancEditHyperParams
    method_dir = Path(__file__).parent
    assets = ("corpus",)  # ordinary text for the background negatives; None: sampled from the model

    def __init__(self, model, tokenizer, hparams=None, corpus: Corpus | None = None):
        super().__init__(model, tokenizer, hparams)
        self.corpus = corpus
        self._templates: tuple[str, ...] | None = None
        self._background: Background | None = None

    def prepare(self) -> None:
        self.background()

    def value_layer(self) -> int:
        v = self.hparams.value_layer
        if v is None:
            return self.hparams.layer
        last = len(self.model.get_submodule(self.spec.blocks)) - 1
        if not self.hparams.layer <= v < last:
            # at the last block a value changes only its own token's output: no later token (the answer) reads it
            blocks = f"from its key's ({self.hparams.layer}) to {last - 1}"
            raise EditError(f"{self.name}: a value replaces the output of a block {blocks}, not {v}")
        return v

    def require_supported(self, requests) -> None:
        for r in requests:
            if not r.subject.strip() or not self.tok(r.subject, add_special_tokens=False)["input_ids"]:
                raise EditError(f"{self.name} keys a fact at its subject's last token: request {r.id!r} has no subject token")

    def templates(self) -> tuple[str, ...]:
        if self._templates is None:
            t = self.hparams.templates
            self._templates = context_templates(self.model, self.tok, t.count, t.length)
        return self._templates

    def background(self) -> Background:
        """Ordinary text's states at the key's layer: negatives of every fact whose subject the text does not name.
        Read once, on the model as it is when first asked (the base, where a stream prepares its editor); the
        codebook wraps the layer's output, so its own entries never change these states."""
        if self._background is None:
            hp = self.hparams.scope
            self._background = self._read_background(hp.background_tokens, hp.background_window)
        return self._background

    @torch.no_grad()
    def _read_background(self, n_tokens: int, window: int) -> Background:
        if n_tokens == 0:
            return Background(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), ())
        n_windows = -(-n_tokens // window)
        corpus = self.corpus or corpus_from_model(self.model, self.tok, n_windows, window)
        rows = windows(self.tok, corpus, n_windows, window)
        parts = []
        for s in range(0, len(rows), 32):
            states, real = read_tokens(self.model, self.tok, rows[s : s + 32], self.path())  # (b, T, d_in), (b, T)
            parts.append(states[real].cpu())
        lengths = torch.tensor([len(r) for r in rows])
        owner = torch.repeat_interleave(torch.arange(len(rows)), lengths)  # (M,) the window of each token
        texts = tuple(normalize(t) for t in self.tok.batch_decode(rows, skip_special_tokens=True))
        out = Background(torch.cat(parts)[:n_tokens], owner[:n_tokens], texts)
        log.info("%s: %d background tokens from %s", self.name, len(out.states), corpus.name)
        return out

    # ------------------------------------------------------------------ the method, in the paper's order

    def _edit(self, requests: list[EditRequest]) -> None:
        keys = self._keys(requests)  # (n, d_in)
        book = self._working_copy()
        at_end = self._at_prompt_end(requests, keys, book)  # (n,)
        done, samples = [], []
        for chosen, moved in ((~at_end, False), (at_end, True)):  # the facts keyed at their prompt's end go in last
            idx = chosen.nonzero().flatten().tolist()
            if not idx:
                continue
            facts = [requests[i] for i in idx]
            asked = at_last_token(facts) if moved else facts
            k = self._keys(asked) if moved else keys[idx]
            self.diagnostics = {}
            radii = self.scope(facts, k, book, asked)
            plan = self._place(book, facts, k, radii)
            self._train_values(book, plan, asked)
            done.append((idx, self.diagnostics))
            samples += self.samples
        self.samples = samples
        self.diagnostics = {"keyed_at_prompt_end": at_end.float().tolist()} | _in_order(done, len(requests))
        self._write(book, self.hparams.scope.capacity)

    def _keys(self, asked: list[EditRequest]) -> torch.Tensor:
        """(n, d_in) the key layer's input at each request's subject's last token."""
        path = self.path()
        return read_at_subject(self.model, self.tok, asked, ("{}",), [path], "input")[path].cpu()

    def _at_prompt_end(self, requests: list[EditRequest], keys: torch.Tensor, book: Book) -> torch.Tensor:
        """(n,) bool: facts the subject's key (n, d_in) cannot hold, keyed instead where their prompt ends (GRACE's
        key, the whole prompt as the subject). A causal model's state at the subject sees only the tokens up to it:
        - two prompts that open with one subject ("{} owner", "{} was created in") read one key, and where keys
          coincide neither entry is nearer: a key within ``_SAME_KEY`` of another fact's (the codebook's, or an
          earlier one of the batch) is taken;
        - a subject that is the prompt's first token (no BOS before it) is read where nothing precedes it: that
          state is the token's alone, the one later tokens read least, and every text's first token lies near it."""
        slots = torch.tensor([slot_id(r) for r in requests])  # (n,)
        d_book = torch.cdist(keys, book.keys).masked_fill(slots[:, None] == book.slots[None], float("inf"))  # (n, m)
        earlier = torch.ones(len(keys), len(keys), dtype=torch.bool).tril(-1) & (slots[:, None] != slots[None])
        d_batch = torch.cdist(keys, keys).masked_fill(~earlier, float("inf"))  # (n, n)
        nearest = torch.cat([d_book, d_batch], dim=-1).amin(-1)  # inf where no other fact is there
        taken = nearest <= _SAME_KEY * torch.linalg.vector_norm(keys, dim=-1)
        first = torch.tensor(locate(self.tok, requests, ("{}",)).subject_pos) == 0
        return taken | first

    def scope(
        self, requests: list[EditRequest], keys: torch.Tensor, book: Book, asked: list[EditRequest] | None = None
    ) -> torch.Tensor:
        """(n,) each fact's radius, from its positive and negative samples' distances to its key (n, d_in), with
        the facts ``book`` holds as negatives too. ``asked``: the requests as keyed, where the key is not at the
        fact's own subject but at its prompt's end (the whole prompt as their subject). Records the samples and
        the distances in the diagnostics."""
        n = len(requests)
        path = self.path()
        asked = asked or requests
        pos, pos_owner = positives(asked, self.templates() + self.hparams.frames, self.held_out)
        subs, sub_owner = substitutions(asked)
        self.samples = [q.text for q in pos]
        # one forward for every row: the prompts themselves (their subject's token is the key, distance 0) and
        # their positives, whose subject's token should be taken in and every other token left out; then the
        # prompts about the batch's other subjects, whose subject's token must be left out
        rows = list(asked) + pos + subs
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
        background = self._nearest_background(requests, keys)
        nearest_neg = torch.minimum(nearest_neg, background)
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
            "nearest_background": background.tolist(),
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

    def _nearest_background(self, requests: list[EditRequest], keys: torch.Tensor) -> torch.Tensor:
        """(n,) the distance from each key (n, d_in) to the nearest background token in a window that does not name
        the fact's subject (text about the subject is not unrelated to it); inf where there is none."""
        bg = self.background()
        if not len(bg.states):
            return torch.full((len(keys),), float("inf"))
        names = torch.tensor([[bool(_naming(r.subject).search(t)) for t in bg.texts] for r in requests])  # (n, W)
        d = torch.cdist(keys, bg.states)  # (n, M)
        return d.masked_fill(names[:, bg.owner], float("inf")).amin(-1)

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
        path = self.value_path()
        hp = self.hparams
        # trained where the scope reaches: after the generated prefixes and in the question frames
        templates = self.templates() + hp.frames
        # the value replaces the output at the subject in every context, so it is trained as it will act
        layer = self.value_layer()
        t = optimize_targets(self.model, self.tok, self.spec, requests, templates, [path], layer, hp.value, replace=True)
        # (n, d_out): the output the model should have at the subject; a later request of one slot wins
        values = (t.originals[path] + t.deltas[path]).cpu()
        last = {j: i for i, j in plan.items()}  # entry -> the batch's last request for it
        book.values[torch.tensor(list(last))] = values[torch.tensor(list(last.values()))]
        self.diagnostics |= {"value_nll": t.nll.cpu().tolist(), "value_steps": t.steps.float().tolist()}
