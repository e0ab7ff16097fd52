"""WISE (Wang et al., 2024): a side memory beside one layer's value matrix, a router, and knowledge shards.

1. side memory: a copy of the MLP output projection W_v at ``layer``, kept as its difference from W_v (memory.py),
   installed on the first edit; the model's own weights stay as they are;
2. shard: edits are written into the open knowledge shard, through a random mask of ``mask_ratio`` of its elements
   (drawn per shard), so that shards hold mostly disjoint parameters;
3. train: SGD on the shard's masked elements for the new target's NLL after the prompt in every context template,
   plus the routing margins on Δact = ‖(W' - W) a‖ (WISE's activation loss): the edit's tokens above ``edit_min``,
   the model's own unrelated generations below ``irrelevant_max``, and an edit's mean above an unrelated text's
   (and above every other memory's Δact on the edit's tokens) by ``gap``, while the shard's earlier edits keep
   their outputs (their tokens' inputs are kept: WISE's replay); each element within ``norm_constraint``;
   with ``null_space``, the change reads only the directions of the layer's input where general text carries
   the least energy (AlphaEdit's null space of the corpus's E[a aᵀ]), so an unrelated token moves no memory
   much and the router leaves it alone (kedit's addition: the paper's router leaked here, docs/benchmarks.md);
4. threshold: ε = act_ratio × the smallest Δact any edit reached on one of its own tokens (WISE takes each edit's
   mean over its tokens; a token routed on its own Δact needs every edited token above ε);
5. close and merge: a shard that holds ``shard_edits`` edits closes and the next opens; when all ``shards`` are
   closed they are TIES-merged into the side memory and emptied.

The edit's tokens are where the answer is read: the prompt's last token and the target's (teacher-forced) tokens.
Training applies the open shard there and the main memory everywhere else, as the router will at inference.
The layer's input below the side memory does not depend on it, so it is read once per edit and Δact is a matmul.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from editing.base import EditError, Editor, register
from editing.hooks import capture, frozen, output_kind, start_at_block, stop_after
from editing.ids import slot_id
from editing.keys import average_by_owner, context_templates
from editing.patches import Dense, Installable
from editing.stats import Corpus, corpus_from_model, low_energy_projector, second_moments
from kedit.core.facts import EditRequest
from kedit.core.facts.schema import normalize
from kedit.core.lm import encode_pairs, encode_prompts, greedy_generate, logits_at, model_device, pad_batch, pad_id_of
from kedit.core.routing import causal

from .hparams import WISEHyperParams
from .memory import MEMORY, SideMemory, layer_shape, merge, shard_mask

log = logging.getLogger(__name__)


@dataclass
class Rows:
    """Edit rows (each request in each template, target appended) then unrelated rows, padded to one batch."""

    input_ids: torch.Tensor  # (R, T)
    mask: torch.Tensor
    positions: torch.Tensor
    t_rows: torch.Tensor  # (N,) the edit's tokens: row, predicting column, label
    t_cols: torch.Tensor
    t_labels: torch.Tensor
    t_owner: torch.Tensor  # (N,) request of each
    u_rows: torch.Tensor  # (M,) every real token of the unrelated rows
    u_cols: torch.Tensor
    n_edit_rows: int


@dataclass
class State:
    """The side memory's tensors as fp32 working copies (what the edit writes back as patches)."""

    slots: list[torch.Tensor]  # 1 + S of (d_out, d_in): memory, shards
    edits: torch.Tensor  # (1 + S,)
    min_act: torch.Tensor  # (1,)


def _seed(base: int, merged_edits: int, shard: int) -> int:
    """A shard's mask seed: the preset's seed, how many edits the side memory held when the shard opened, and
    which shard it is, so two shards (in one cycle or across merges) never draw the same mask."""
    digest = hashlib.sha256(f"{base}:{merged_edits}:{shard}".encode()).digest()
    return int.from_bytes(digest[:7], "little")


@register
class WISE(Editor):
    name = "wise"
    hparams_cls = WISEHyperParams
    installs_memories = True
    method_dir = Path(__file__).parent

    assets = ("corpus",)  # unrelated passages the router must leave alone; None: text the model generates

    def __init__(self, model, tokenizer, hparams=None, corpus: Corpus | None = None):
        super().__init__(model, tokenizer, hparams)
        self.corpus = corpus
        self._templates: tuple[str, ...] | None = None
        self._irrelevant: list[str] | None = None
        self._returns_tuple: bool | None = None
        self._null: torch.Tensor | None = None  # null_space's projector (the base's statistics, not state)
        # the edited tokens' inputs of every edit in a shard not yet merged, and its shard: what a later edit of
        # the same shard must keep (the editor's state, saved with every version)
        self.keys = torch.zeros(0, 0)  # (n, d_in)
        self.key_shard = torch.zeros(0, dtype=torch.int64)  # (n,)
        self.key_slot = torch.zeros(0, dtype=torch.int64)  # (n,) which fact (hashed subject and prompt)

    def path(self) -> str:
        return self.spec.module_path("mlp_out", self.hparams.layer)

    def state_dict(self) -> dict:
        return {"keys": self.keys.clone(), "key_shard": self.key_shard.clone(), "key_slot": self.key_slot.clone()}

    def load_state_dict(self, state: dict) -> None:
        names = ("keys", "key_shard", "key_slot")
        if set(state) != set(names) or len({len(state[k]) for k in names}) != 1:
            raise EditError(f"{self.name} state holds {', '.join(names)} of one length, got {sorted(state)}")
        self.keys, self.key_shard, self.key_slot = (state[k].clone() for k in names)

    def templates(self) -> tuple[str, ...]:
        if self._templates is None:
            t = self.hparams.templates
            self._templates = context_templates(self.model, self.tok, t.count, t.length)
        return self._templates

    def irrelevant(self) -> list[str]:
        """Text no edit is about (found once per editor): the model's own continuations of the preset's seeds, and
        corpus passages spread evenly over the corpus."""
        if self._irrelevant is None:
            hp = self.hparams.irrelevant
            seeds = list(hp.seeds)
            gens = greedy_generate(self.model, self.tok, seeds, max_new_tokens=hp.length)
            corpus = self.corpus or corpus_from_model(self.model, self.tok, hp.passages, hp.max_tokens)
            step = max(1, len(corpus.texts) // max(1, hp.passages))
            self._irrelevant = [s + g for s, g in zip(seeds, gens)] + list(corpus.texts[::step][: hp.passages])
        return self._irrelevant

    # ------------------------------------------------------------------ the method, in the paper's order

    def _edit(self, requests: list[EditRequest]) -> None:
        installed = self._side_memory()
        state = self._working_copy(installed)
        shard = self._open_shard(state)
        rows = self._rows(requests)
        a, h = self._read(rows)
        state.slots[shard], edit_act = self._train(state, shard, rows, a, h, installed, requests)
        self._set_threshold(state, edit_act)
        state.edits[shard] += len(requests)
        merged = self._close_and_merge(state, shard)
        self._write(state, installed)
        self._keep(requests, rows, a, shard, merged)

    def _side_memory(self) -> SideMemory | None:
        """The side memory at ``path()``, or None before the first edit; one built with other settings is refused."""
        module = self.model.get_submodule(self.path())
        if isinstance(module, SideMemory):
            hp = self.hparams
            installed = (module.n_shards, module.act_ratio, module.mode)
            if installed != (hp.memory.shards, hp.router.act_ratio, hp.router.mode):
                raise EditError(
                    f"the side memory at {self.path()} has (shards, act_ratio, mode) {installed}, the preset "
                    f"{(hp.memory.shards, hp.router.act_ratio, hp.router.mode)}: a memory keeps the rule it was installed with"
                )
            return module
        if isinstance(module, Installable):
            raise EditError(f"{self.path()} holds a {module.type_name}: WISE puts its side memory beside the layer's own weight")
        return None

    def _working_copy(self, installed: SideMemory | None) -> State:
        if installed is not None:
            slots = [t.detach().float().clone() for t in installed.slots()]
            return State(slots, installed.edits.detach().clone(), installed.min_act.detach().clone())
        d_out, d_in = layer_shape(self.model.get_submodule(self.path()))
        device = model_device(self.model)
        n = self.hparams.memory.shards
        slots = [torch.zeros(d_out, d_in, device=device) for _ in range(1 + n)]
        return State(slots, torch.zeros(1 + n, device=device), torch.zeros(1, device=device))

    def _open_shard(self, state: State) -> int:
        """The first shard (row of ``edits``) still below ``shard_edits``: a full one closed, and all closed merge."""
        limit = self.hparams.memory.shard_edits
        return next(i for i in range(1, len(state.slots)) if state.edits[i] < limit)

    def _rows(self, requests: list[EditRequest]) -> Rows:
        """The edit's rows (its prompt after each context prefix, target appended) and the unrelated rows; texts a
        benchmark holds out are never among them, and the ones used besides the prompts are ``self.samples``."""
        texts, targets, owner = [], [], []
        for t in self.templates():
            for i, r in enumerate(requests):
                text = t.replace("{}", r.text, 1)
                if t != "{}" and normalize(text) in self.held_out:
                    continue
                texts.append(text)
                targets.append(r.target_new)
                owner.append(i)
        unrelated = [u for u in self.irrelevant() if normalize(u) not in self.held_out]
        own = {normalize(r.text) for r in requests}
        self.samples = [t for t in texts if normalize(t) not in own] + unrelated
        enc = encode_pairs(self.tok, texts, targets)
        ids = enc.ids + [u[: self.hparams.irrelevant.max_tokens] for u in encode_prompts(self.tok, unrelated)]
        device = model_device(self.model)
        input_ids, mask, positions, _ = pad_batch(ids, pad_id_of(self.tok), "right", device)
        # the edit's tokens: target token j of row b is predicted at n_prompt[b] - 1 + j
        lens = torch.tensor(enc.n_target, device=device)
        t_rows = torch.repeat_interleave(torch.arange(len(texts), device=device), lens)
        t_cols = torch.cat([torch.arange(p - 1, p - 1 + n) for p, n in zip(enc.n_prompt, enc.n_target)]).to(device)
        u_rows, u_cols = mask[len(texts) :].nonzero(as_tuple=True)
        return Rows(
            input_ids,
            mask,
            positions,
            t_rows,
            t_cols,
            input_ids[t_rows, t_cols + 1],
            torch.tensor(owner, device=device)[t_rows],
            u_rows + len(texts),
            u_cols,
            len(texts),
        )

    @torch.no_grad()
    def _read(self, rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward up to the edited projection: its input a (R, T, d_in) fp32 at every token, which the side
        memory cannot change, and the edited block's input (R, T, d), from which every training step starts."""
        path, block = self.path(), self.spec.block(self.hparams.layer)
        with capture(self.model, [path], "input") as a, capture(self.model, [block], "input") as h, stop_after(self.model, path):
            self.model(input_ids=rows.input_ids, attention_mask=rows.mask, position_ids=rows.positions)
        return a[path].float(), h[block].detach()

    def _train(
        self,
        state: State,
        shard: int,
        rows: Rows,
        a: torch.Tensor,
        h: torch.Tensor,
        installed: SideMemory | None,
        requests: list[EditRequest],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The open shard after this edit (d_out, d_in) and each request's smallest Δact on its own tokens (n,)."""
        hp, tr, n = self.hparams, self.hparams.train, len(requests)
        start = state.slots[shard]  # (d_out, d_in)
        seed = _seed(hp.memory.seed, int(state.edits[MEMORY]), shard)
        mask = shard_mask(tuple(start.shape), hp.memory.mask_ratio, seed, start.device).float()
        a_in, a_un = a[rows.t_rows, rows.t_cols], a[rows.u_rows, rows.u_cols]  # (N, d_in), (M, d_in)
        row_own = torch.zeros(rows.n_edit_rows, dtype=torch.long, device=a.device).index_put_(  # (edit rows,) request
            (rows.t_rows,), rows.t_owner
        )
        u_row = rows.u_rows - rows.n_edit_rows  # (M,) which unrelated row
        n_un = int(u_row.max()) + 1 if len(u_row) else 0
        # every other memory that holds an edit: the open shard must move the edit's tokens more than they do
        kept = self.keys[self.key_shard == shard].reshape(-1, a.shape[-1]).to(a.device)  # (K, d_in): earlier edits' tokens
        # other facts' tokens held by other shards: there this shard must stay below their own shard by the gap,
        # or the router would send them here
        mine = torch.tensor([slot_id(r) for r in requests])
        elsewhere = (self.key_shard != shard) & ~torch.isin(self.key_slot, mine)
        theirs = self.keys[elsewhere].reshape(-1, a.shape[-1]).to(a.device)  # (E, d_in)
        their_shard = self.key_shard[elsewhere].to(a.device)
        theirs_act = torch.zeros(len(theirs), device=a.device)  # (E,) each token's Δact in its own shard
        for j in their_shard.unique().tolist():  # at most ``shards`` of them
            at = their_shard == j
            theirs_act[at] = (theirs[at] @ state.slots[j].T).norm(dim=-1)
        others = [state.slots[j] for j in range(len(state.slots)) if j != shard and state.edits[j] > 0]
        other_act = torch.stack([(a_in @ d.T).norm(dim=-1) for d in others]).amax(0) if others else None  # (N,)

        # the change the shard may make is (mask ⊙ F) R, R a symmetric projector on the layer's input: with project,
        # R leaves the shard's output on its earlier edits' tokens exactly as it was (at the cost of the mask); with
        # null_space, it reads only the directions general text barely uses (AlphaEdit's null space, for the router)
        p = self.null_projector()  # (d_in, d_in) or None
        q = None  # (d_in, K): an orthonormal basis of the kept tokens' inputs as P leaves them (inside P's range)
        if tr.project and len(kept):
            q = torch.linalg.qr((kept if p is None else kept @ p).T).Q

        def change(f: torch.Tensor) -> torch.Tensor:
            m = mask * f
            m = m if p is None else m @ p
            return m if q is None else m - (m @ q) @ q.T

        free = torch.zeros_like(start, requires_grad=True)  # (d_out, d_in): only its masked elements matter
        make = torch.optim.SGD if tr.optimizer == "sgd" else torch.optim.Adam
        opt = make([free], lr=tr.lr, weight_decay=tr.weight_decay)
        side: dict[str, torch.Tensor] = {}

        def apply_side(mod, args, out):
            # the main memory everywhere, the open shard on the edit's tokens: what the router will do
            base = mod.original(args[0]) if isinstance(mod, SideMemory) else out
            return base.index_put((rows.t_rows, rows.t_cols), side["s"].to(base.dtype), accumulate=True)

        steps, nll = 0, torch.full((n,), float("inf"))
        returns_tuple = self._block_returns_tuple()
        # only the edit rows run the blocks (the unrelated rows' Δact needs their input a alone), right padded:
        # columns past the longest edit row are padding there
        e, width = rows.n_edit_rows, int(rows.mask[: rows.n_edit_rows].sum(-1).max())
        ids, attn, pos = (t[:e, :width] for t in (rows.input_ids, rows.mask, rows.positions))
        handle = self.model.get_submodule(self.path()).register_forward_hook(apply_side)
        try:
            with frozen(self.model), start_at_block(self.model, self.spec.blocks, hp.layer, h[:e, :width], returns_tuple):
                for _ in range(tr.steps):
                    c = change(free)  # (d_out, d_in)
                    d = start + c
                    side["s"] = a_in @ d.T  # (N, d_out)
                    act_in = side["s"].norm(dim=-1)  # (N,) Δact on the edit's tokens
                    act_un = (a_un @ d.T).norm(dim=-1)  # (M,) on the unrelated tokens
                    logits = logits_at(self.model, ids, attn, pos, rows.t_rows, rows.t_cols)
                    tok_nll = torch.nn.functional.cross_entropy(logits, rows.t_labels, reduction="none")  # (N,)
                    row_nll = average_by_owner(tok_nll, rows.t_rows, rows.n_edit_rows)
                    nll = average_by_owner(row_nll, row_own, n)  # (n,)
                    margins = self._margins(act_in, act_un, rows, u_row, n_un, other_act)
                    if len(theirs):
                        margins = margins + torch.relu((theirs @ d.T).norm(dim=-1) + hp.router.gap - theirs_act).mean()
                    if len(kept):
                        margins = margins + tr.keep * ((kept @ c.T).norm(dim=-1) / hp.router.edit_min).pow(2).mean()
                    log.debug("wise step %d: NLL %s margins %.4f", steps, nll.detach().cpu().tolist(), float(margins.detach()))
                    if float(nll.detach().max()) < tr.stop_loss and float(margins.detach()) < tr.stop_loss:
                        break
                    opt.zero_grad()
                    (nll.mean() + margins).backward()
                    opt.step()
                    steps += 1
                    with torch.no_grad():  # each element within norm_constraint of zero (W' within it of W)
                        free.copy_(mask * ((start + free).clamp(-tr.norm_constraint, tr.norm_constraint) - start))
        finally:
            handle.remove()
        final = (start + change(free)).detach()
        edit_act = self._edit_act(final, rows, a, n)
        un_act = (a_un @ final.T).norm(dim=-1)
        self.diagnostics |= {
            "value_nll": nll.detach().cpu().tolist(),
            "value_steps": [float(steps)] * n,
            "edit_act": edit_act.cpu().tolist(),
            "unrelated_act_max": [float(un_act.max()) if len(un_act) else 0.0] * n,
            "shard": [float(shard)] * n,
        }
        log.info("wise: shard %d, NLL max %.3f after %d steps, edit Δact min %.2f", shard, nll.max(), steps, edit_act.min())
        return final, edit_act

    def _edit_act(self, final: torch.Tensor, rows: Rows, a: torch.Tensor, n: int) -> torch.Tensor:
        """(n,) per request, the least its shard moves one of its own tokens as the router will judge them: each
        token's own Δact (mode token), or its prompt's running mean or max up to it (modes mean and max: over the
        prompt alone, the rows without a context prefix, which are the first n), so ε can sit below every one."""
        if self.hparams.router.mode == "token":
            tok_act = (a[rows.t_rows, rows.t_cols] @ final.T).norm(dim=-1)  # (N,)
            owner = rows.t_owner
        else:
            bare = rows.t_rows < n  # the edit's tokens in the bare prompts' rows
            act = (a[:n] @ final.T).norm(dim=-1)  # (n, T) every token of the bare rows; right padded
            tok_act = causal(act[..., None], self.hparams.router.mode)[..., 0][rows.t_rows[bare], rows.t_cols[bare]]
            owner = rows.t_owner[bare]
        return torch.full((n,), float("inf"), device=a.device).scatter_reduce(0, owner, tok_act, "amin")

    def null_projector(self) -> torch.Tensor | None:
        """(d_in, d_in) projector onto the directions of the layer's input that carry the least of general text's
        energy, together at most ``null_space.leak`` of it (E[a aᵀ] over the editor's corpus); None without
        ``null_space``. The base model's statistics, found once per editor."""
        ns = self.hparams.null_space
        if ns is None:
            return None
        if self._null is None:
            corpus = self.corpus or corpus_from_model(self.model, self.tok)
            layer = self.hparams.layer
            cov = second_moments(self.model, self.tok, self.spec, [layer], corpus, ns.statistics.samples, ns.statistics.length)
            self._null = low_energy_projector(cov[layer], ns.leak).to(model_device(self.model))
        return self._null

    def _margins(self, act_in, act_un, rows: Rows, u_row, n_un: int, other_act) -> torch.Tensor:
        """WISE's activation loss: unrelated tokens below α, the edit's above β, an edit row's mean above every
        unrelated row's mean by γ, and the edit's tokens above every other memory's Δact there by γ."""
        r = self.hparams.router
        relu = torch.relu
        loss = relu(r.edit_min - act_in).mean()
        if n_un:
            loss = loss + relu(act_un - r.irrelevant_max).mean()
            mean_in = average_by_owner(act_in, rows.t_rows, rows.n_edit_rows)  # (edit rows,)
            mean_un = average_by_owner(act_un, u_row, n_un)  # (unrelated rows,)
            loss = loss + relu(mean_un[None, :] - mean_in[:, None] + r.gap).mean()
        if other_act is not None:
            loss = loss + relu(other_act + r.gap - act_in).mean()
        return loss

    def _block_returns_tuple(self) -> bool:
        """Whether a decoder block returns a tuple (GPT-2) or the hidden states (Llama): what a skipped block returns."""
        if self._returns_tuple is None:
            ids = torch.tensor([[pad_id_of(self.tok)]], device=model_device(self.model))
            path = self.spec.block(0)
            with torch.no_grad(), output_kind(self.model, path) as kind, stop_after(self.model, path):
                self.model(input_ids=ids)
            self._returns_tuple = kind["tuple"]
        return self._returns_tuple

    def _set_threshold(self, state: State, edit_act: torch.Tensor) -> None:
        """min_act: the smallest Δact any edit reached on one of its own tokens (ε is act_ratio times it)."""
        new = edit_act.min().reshape(1).to(state.min_act)
        state.min_act = torch.minimum(state.min_act, new) if bool(state.edits.sum() > 0) else new

    def _keep(self, requests: list[EditRequest], rows: Rows, a: torch.Tensor, shard: int, merged: bool) -> None:
        """Record the edit's tokens (of its prompt without a prefix: the first n rows) for later edits of its shard;
        a merge empties every shard, and what they held is no longer trained."""
        if merged:
            self.keys, self.key_shard, self.key_slot = torch.zeros(0, 0), *(torch.zeros(0, dtype=torch.int64),) * 2
            return
        own = rows.t_rows < len(requests)
        new = a[rows.t_rows[own], rows.t_cols[own]].cpu()  # (k, d_in)
        slots = torch.tensor([slot_id(r) for r in requests])[rows.t_owner[own].cpu()]  # (k,)
        keys = self.keys if len(self.keys) else torch.zeros(0, new.shape[-1])
        self.keys = torch.cat([keys, new])
        self.key_shard = torch.cat([self.key_shard, torch.full((len(new),), shard, dtype=torch.int64)])
        self.key_slot = torch.cat([self.key_slot, slots])

    def _close_and_merge(self, state: State, shard: int) -> bool:
        """A shard at ``shard_edits`` closes (the next edit opens the next); the last one closing merges them all."""
        if shard < len(state.slots) - 1 or state.edits[shard] < self.hparams.memory.shard_edits:
            return False
        parts = ([state.slots[MEMORY]] if state.edits[MEMORY] > 0 else []) + state.slots[1:]
        merged = merge(parts, self.hparams.memory.density).to(state.slots[0])
        state.slots = [merged] + [torch.zeros_like(s) for s in state.slots[1:]]
        state.edits = torch.cat([state.edits.sum().reshape(1), torch.zeros_like(state.edits[1:])])
        log.info("wise: %d shards TIES-merged into the side memory (%d edits)", len(parts), int(state.edits[MEMORY]))
        return True

    def _write(self, state: State, installed: SideMemory | None) -> None:
        """Changed tensors of an installed side memory as weight deltas; on the first edit, a new one installed."""
        path = self.path()
        names = ["memory", *(f"shards.{i}" for i in range(len(state.slots) - 1)), "edits", "min_act"]
        new = dict(zip(names, [*state.slots, state.edits, state.min_act]))
        if installed is None:
            layer = self.model.get_submodule(path)
            d_out, d_in = layer_shape(layer)
            router = self.hparams.router
            memory = SideMemory(layer, len(state.slots) - 1, d_in, d_out, router.act_ratio, router.mode)
            with torch.no_grad():
                for name, value in new.items():
                    p = memory.get_parameter(name)
                    p.copy_(value.to(p))
            self._install(path, memory)
            return
        for name, value in new.items():
            old = installed.get_parameter(name).detach().float()
            if not torch.equal(old, value):
                self._apply(f"{path}.{name}", Dense(value - old))
