"""MEND (Mitchell et al., 2022): a trained editor network turns an edit's fine-tuning gradient into a weight update.

The edit, in the paper's order:
1. the edit loss: the new target's NLL after the prompt, teacher-forced (``edit_loss``);
2. its gradient at each edited weight, as the rank-one factors (u_t, δ_t) per token (``gradient_factors``);
3. the network maps them to (ũ_t, δ̃_t) and the update is ΔW = -α_w Σ_t δ̃_t ũ_tᵀ, a low-rank weight delta.

The network is trained once per base model (``kedit train mend``, editing/mend/training.py) and reaches the
editor as its asset ``network``: a ``MENDNetwork`` loaded and verified for this base by the pipeline.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from editing.base import EditError, Editor, linear_update, register
from editing.finetune import model_device, target_batch
from editing.hooks import frozen, start_at_block, swapped
from editing.stem import FrozenCopy, LowPrecisionStem
from kedit.core.arch import ArchSpec, spec_for
from kedit.core.facts import EditRequest
from kedit.core.precision import low_precision

from .files import load_network, save_network
from .gradients import gradient_factors, kept, target_nll
from .hparams import MENDHyperParams
from .network import HyperNet
from .training import train, trainable


@dataclass
class MENDNetwork:
    """A network and where it comes from: what a version names (registered name, version, sha256 of its file)."""

    net: HyperNet
    provenance: dict[str, str]
    trained_on: frozenset[str] = frozenset()  # ids of the facts it was trained (and validated) on


def edited_weights(model: nn.Module, spec: ArchSpec, hp: MENDHyperParams) -> dict[str, tuple[int, int]]:
    """Module path -> (d_in, d_out) of every weight MEND edits, in forward order."""
    out = {}
    for layer in hp.layers:
        for kind in hp.kinds:
            path = spec.module_path(kind, layer)
            module = model.get_submodule(path)
            # nn.Linear stores (d_out, d_in); GPT-2's Conv1D (d_in, d_out)
            rows, cols = module.weight.shape
            out[path] = (cols, rows) if isinstance(module, nn.Linear) else (rows, cols)
    return out


def edit_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean NLL of the target tokens, each predicted from its true prefix."""
    ids, mask, pos, rows, cols, labels, _ = batch
    keep, where = kept(cols)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits  # (B, K, V)
    return target_nll(logits, rows, where, labels).mean()


@register
class MEND(Editor):
    name = "mend"
    hparams_cls = MENDHyperParams
    method_dir = Path(__file__).parent
    assets = ("network",)  # a MENDNetwork trained for this base model (the pipeline resolves it)
    trains = "network"

    def __init__(self, model, tokenizer, hparams=None, network: MENDNetwork | None = None):
        super().__init__(model, tokenizer, hparams)
        self.network = network
        self.weights = edited_weights(model, self.spec, self.hparams)
        self._copies: dict[torch.dtype, LowPrecisionStem] = {}  # by dtype: the stem's and the head's precision may differ
        if network is not None:
            self._check(network.net)

    def _check(self, net: HyperNet) -> None:
        want = [(p, tuple(s)) for p, s in self.weights.items()]
        have = [(p, tuple(s)) for p, s in net.weights.items()]
        if have != want:  # in order: the order gives each weight its edit rate
            raise EditError(
                f"the MEND network edits {have} (module path, (d_in, d_out)), in that order; this model and preset need {want}"
            )

    @classmethod
    def new_network(cls, model: nn.Module, hp: MENDHyperParams) -> HyperNet:
        """An untrained network for this model: every map the identity, every edit rate ``hp.edit_lr``."""
        n = hp.network
        return HyperNet(edited_weights(model, spec_for(model), hp), n.rank, n.n_hidden, n.norm, hp.edit_lr, hp.train.seed)

    @classmethod
    def trainable_facts(cls, facts):
        return trainable(facts)

    @classmethod
    def train_asset(
        cls, model, tokenizer, hparams, train_facts, val_facts, checkpoints, out, fingerprint, info, on_metrics, max_seconds
    ):
        net = cls.new_network(model, hparams)
        progress = train(
            model, tokenizer, spec_for(model), net, train_facts, val_facts, hparams, checkpoints, on_metrics, max_seconds
        )
        if progress.best_step:  # the best validated network so far (a sitting cut short by time has one too)
            meta = {"hparams": hparams.model_dump(mode="json"), "trained_steps": progress.step, "best_step": progress.best_step}
            save_network(net, out, fingerprint, {**meta, "stopped": progress.stopped, **info})
        return asdict(progress)

    @classmethod
    def open_asset(cls, name: str, directory: Path, fingerprint: str, provenance: dict[str, str]) -> MENDNetwork:
        if name != "network":
            return super().open_asset(name, directory, fingerprint, provenance)
        net, manifest = load_network(directory, fingerprint)
        return MENDNetwork(net, dict(provenance), frozenset(manifest.get("training_ids", ())))

    def trained_on(self) -> frozenset[str]:
        return self.network.trained_on if self.network else frozenset()

    def provenance(self) -> dict[str, str]:
        return dict(self.network.provenance) if self.network else {}

    def require_supported(self, requests) -> None:
        if self.network is None:
            raise EditError("mend needs a network trained for this base model; train one with: kedit train mend --model MODEL")

    def _frozen_copies(self) -> dict[str, FrozenCopy | None]:
        """The fresh low-precision copies the stem and the head run in (None: the model's own precision).

        Each copy's freshness is checked once, before either is used: inside the stem's context the blocks below
        the edit are passthroughs, and a check there would see other parameters (and rebuild every edit)."""
        fresh: dict[torch.dtype, FrozenCopy] = {}
        out: dict[str, FrozenCopy | None] = {}
        for part, precision in (("stem", self.hparams.stem_dtype), ("head", self.hparams.head_dtype)):
            dtype = low_precision(precision, self.model)
            if dtype is not None and dtype not in fresh:
                if dtype not in self._copies:
                    self._copies[dtype] = LowPrecisionStem(self.model, self.spec, min(self.hparams.layers), dtype)
                fresh[dtype] = self._copies[dtype].fresh()
            out[part] = None if dtype is None else fresh[dtype]
        return out

    def _stem_input(self, stem: FrozenCopy | None, batch):
        """Where the edit's forward starts: block ``min(layers)`` with the stem's hidden states, or the embeddings."""
        if stem is None:
            return nullcontext()
        hidden, returns_tuple = stem.hidden(*batch[:3])
        return start_at_block(self.model, self.spec.blocks, stem.first, hidden, returns_tuple)

    def _head(self, head: FrozenCopy | None):
        """The output head the edit loss runs through: the model's, or its low-precision copy."""
        return nullcontext() if head is None else swapped(self.model, self.spec.lm_head, head.head())

    def _factors(self, batch, starts, head):
        """The edit loss's gradient factors at each edited weight: forward from ``starts`` through ``head``, and back."""
        with frozen(self.model), starts, head:
            return gradient_factors(self.model, list(self.weights), lambda: edit_loss(self.model, batch), batch[1])

    def _edit(self, requests: list[EditRequest]) -> None:
        net = self.network.net.eval()
        batch = target_batch(self.tok, requests, model_device(self.model))
        copies = self._frozen_copies()
        starts = self._stem_input(copies["stem"], batch)  # the frozen copy's forward runs here
        factors = self._factors(batch, starts, self._head(copies["head"]))
        with torch.no_grad():
            for path, (out, inp) in net.updates(factors).items():
                module = self.model.get_submodule(path)
                out = out * self.hparams.edit_scale  # (d_out, T_w)
                self._apply(f"{path}.weight", linear_update(module, out.contiguous(), inp.contiguous()))
