"""WISE's side memory: an installable module around one layer's MLP output projection (the value matrix W_v).

It holds, as differences from the wrapped layer's weight (W' - W, laid out (d_out, d_in) whatever the layer's own
layout): the merged side memory, and the knowledge shards edits are written into until they are merged. At every
token the router compares how far each memory would move the layer's output there, Δact = ‖(W' - W) a‖ for the
layer's input a, and the memory that moves it most answers when its Δact exceeds the threshold ε (``act_ratio``
times the smallest Δact an edit reached on one of its own tokens); everywhere else the output is the wrapped
layer's, bit for bit.

WISE routes a whole input on its mean Δact. The installed rule (``mode``) is ``token``, a token routed on its own
Δact; ``mean``, a token routed on each memory's mean Δact over its sequence up to and including it (a causal form
of WISE's rule); or ``max``, the running maximum. A token's route never depends on tokens after it, so decoding
from a cache routes as a full forward does. Sequences come from ``kedit.core.routing`` (packed scoring rows,
decoding).

The shard count is fixed per module, so every later edit changes existing tensors (weight deltas) rather than
installing anything; a merge is one more such change (the shards' TIES merge into ``memory``, the shards zeroed).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from peft.utils.merge_utils import ties
from torch import nn
from torch.nn import functional as F

from editing.patches import Installable
from editing.patches.modules import register_module_type
from kedit.core.routing import Running, causal

MEMORY = 0  # row of ``edits``: the merged side memory; shard i is row i + 1
MODES = ("token", "mean", "max")  # the router's rule: a token on its own Δact, or its sequence's mean or max so far


def layer_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of the projection: nn.Linear keeps (d_out, d_in), GPT-2's Conv1D (d_in, d_out)."""
    w = layer.weight
    return tuple(w.shape) if isinstance(layer, nn.Linear) else tuple(w.shape[::-1])


@register_module_type
class SideMemory(Installable):
    type_name: ClassVar[str] = "wise-side-memory"

    def __init__(self, original: nn.Module, shards: int, d_in: int, d_out: int, act_ratio: float, mode: str = "token"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"a side memory routes by one of {MODES}, not {mode!r}")
        w = next(original.parameters())
        self.original = original
        self.n_shards, self.d_in, self.d_out = int(shards), int(d_in), int(d_out)
        self.act_ratio = float(act_ratio)  # ε = act_ratio × min_act: the router's rule is part of what is installed
        self.mode = mode
        self.layout: Running | None = None  # the forward's sequences (kedit.core.routing), modes "mean" and "max"

        def frozen(*shape: int, dtype: torch.dtype = w.dtype) -> nn.Parameter:
            # parameters, not buffers: later edits change them through weight deltas like any weight's
            return nn.Parameter(torch.zeros(shape, dtype=dtype, device=w.device), requires_grad=False)

        self.memory = frozen(self.d_out, self.d_in)  # (d_out, d_in): the merged side memory, W' - W
        self.shards = nn.ParameterList([frozen(self.d_out, self.d_in) for _ in range(self.n_shards)])
        # counts and min_act stay fp32 in a bf16 model: a count of 257 is not a bf16 number
        self.edits = frozen(1 + self.n_shards, dtype=torch.float32)  # (1 + S,) edits each memory holds
        self.min_act = frozen(1, dtype=torch.float32)  # (1,) the smallest Δact an edit reached on one of its tokens

    @classmethod
    def from_config(cls, config: dict[str, Any], original: nn.Module) -> SideMemory:
        # a memory installed before routing modes existed routed per token
        mode = config.get("mode", "token")
        return cls(original, config["shards"], config["d_in"], config["d_out"], config["act_ratio"], mode)

    def config(self) -> dict[str, Any]:
        out = {"shards": self.n_shards, "d_in": self.d_in, "d_out": self.d_out, "act_ratio": self.act_ratio}
        return out | ({"mode": self.mode} if self.mode != "token" else {})

    def threshold(self) -> torch.Tensor:
        """(1,) ε: a token whose largest Δact exceeds it reads that memory."""
        return self.act_ratio * self.min_act

    def slots(self) -> list[torch.Tensor]:
        """The memories in ``edits`` order: the merged one, then each shard: (d_out, d_in) each."""
        return [self.memory, *self.shards]

    def n_entries(self) -> int:  # kedit.core.routing.Router: the edits the side memory holds
        return int(self.edits.sum())

    def active(self) -> torch.Tensor:
        """Indices of the memories that hold an edit."""
        return (self.edits > 0).nonzero().flatten()

    def activations(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., d_in) -> each active memory's output difference (..., k, d_out) and its Δact (..., k), fp32."""
        idx = self.active().tolist()
        stacked = torch.cat([self.slots()[i] for i in idx])  # (k d_out, d_in): one matmul for every memory
        sides = F.linear(x.float(), stacked.float()).view(*x.shape[:-1], len(idx), self.d_out)
        return sides, torch.linalg.vector_norm(sides, dim=-1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, d_in), or one sequence (T, d_in): per token, whether a memory answers (B, T) / (T,), and that
        memory's output difference (..., d_out). The memory is the one whose Δact (in modes "mean" and "max", its
        sequence's mean or max Δact so far) is largest, and it answers when that exceeds ε."""
        seqs = x if x.dim() == 3 else x[None]
        sides, act = self.activations(seqs)  # (B, T, k, d_out), (B, T, k)
        if self.mode != "token":
            act = (self.layout or causal)(act, self.mode)
        best, which = act.max(-1)  # (B, T)
        chosen = sides.gather(-2, which[..., None, None].expand(*which.shape, 1, self.d_out)).squeeze(-2)
        return (best > self.threshold()).view(x.shape[:-1]), chosen.view(*x.shape[:-1], self.d_out)

    def routed(self, x: torch.Tensor) -> torch.Tensor:  # kedit.core.routing.Router
        if not self.n_entries():
            return torch.zeros(x.shape[:-1], dtype=torch.bool, device=x.device)
        return self.route(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)  # (B, T, d_out)
        if not self.n_entries():
            return out
        hit, chosen = self.route(x)
        if not bool(hit.any()):
            return out
        return torch.where(hit[..., None], out + chosen.to(out.dtype), out)


def merge(parts: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES (Yadav et al., 2023): trim each (d_out, d_in) difference to its ``density`` largest magnitudes, elect
    each element's sign by the summed mass, and average the values that agree with it (equal weights)."""
    return ties([p.float() for p in parts], torch.ones(len(parts)), density)


def shard_mask(shape: tuple[int, int], ratio: float, seed: int, device: torch.device) -> torch.Tensor:
    """(d_out, d_in) bool: the elements one shard may write, drawn from ``seed`` (so a chain is reproducible)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < ratio).to(device)
