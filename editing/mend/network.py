"""MEND's editor network: per edited weight, a map of the rank-one gradient factors (u, δ) to (ũ, δ̃).

A linear layer's gradient over a sequence is Σ_t δ_t u_tᵀ, u_t its input and δ_t the loss's gradient at
its output (MEND's decomposition). The network never sees the (d_out, d_in) gradient, only the 2·T
vectors of its factors; the update it makes is ΔW = -α_w Σ_t δ̃_t ũ_tᵀ, rank ≤ T, with α_w learned per
weight. Weights of one shape share a map, told apart by a learned scale and shift per weight ("mode").
"""

from __future__ import annotations

import torch
from torch import nn


class RunningNorm(nn.Module):
    """Standardizes vectors with a mean and variance gathered while training (then frozen with the network)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))  # Σ (x - mean)², merged batch by batch (Chan et al.)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:  # x: (n, dim)
        n = x.shape[0]
        if n == 0:
            return
        mean_b = x.mean(0)
        m2_b = ((x - mean_b) ** 2).sum(0)
        total = self.count + n
        delta = mean_b - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2_b + delta**2 * (self.count * n / total)
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.count < 2:
            return x
        std = (self.m2 / (self.count - 1)).sqrt()
        return (x - self.mean) / (std + 1e-7)


class ResidualLowRank(nn.Module):
    """x + relu(s_m ⊙ (B A x + b) + t_m): B starts at zero, so the layer starts as the identity."""

    def __init__(self, dim: int, rank: int, n_modes: int, generator: torch.Generator):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, dim, generator=generator) / dim**0.5)  # A: (r, dim)
        self.up = nn.Parameter(torch.zeros(dim, rank))  # B: (dim, r)
        self.bias = nn.Parameter(torch.zeros(dim))
        self.scale = nn.Parameter(torch.ones(n_modes, dim))
        self.shift = nn.Parameter(torch.zeros(n_modes, dim))

    def forward(self, x: torch.Tensor, mode: int | torch.Tensor) -> torch.Tensor:  # x: (n, dim); mode: one, or (n,) per row
        pre = (x @ self.down.T) @ self.up.T + self.bias
        # clamp, not relu: at B = 0 the pre-activation is exactly 0, where relu's gradient is 0 and clamp's is 1
        return x + (pre * self.scale[mode] + self.shift[mode]).clamp(min=0)


class GradientMap(nn.Module):
    """[u; δ] -> [ũ; δ̃] for the weights of one shape (d_in, d_out)."""

    def __init__(self, d_in: int, d_out: int, n_modes: int, rank: int, n_hidden: int, norm: bool, generator: torch.Generator):
        super().__init__()
        self.d_in, self.d_out, self.norm = d_in, d_out, norm
        self.norm_u, self.norm_d = RunningNorm(d_in), RunningNorm(d_out)
        dim = d_in + d_out
        self.layers = nn.ModuleList(ResidualLowRank(dim, min(rank, dim), n_modes, generator) for _ in range(n_hidden + 1))

    def forward(self, u: torch.Tensor, d: torch.Tensor, mode: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, d = u.float(), d.float()  # (T, d_in), (T, d_out); mode: one for all rows, or (T,) per row
        if self.norm:
            if self.training:
                self.norm_u.update(u)
                self.norm_d.update(d)
            u, d = self.norm_u(u), self.norm_d(d)
        x = torch.cat([u, d], -1)
        for layer in self.layers:
            x = layer(x, mode)
        return x[:, : self.d_in], x[:, self.d_in :]


def shape_key(d_in: int, d_out: int) -> str:
    return f"{d_in}x{d_out}"


class HyperNet(nn.Module):
    """The maps for every edited weight (``weights``: module path -> (d_in, d_out), in order) and their edit rates."""

    def __init__(self, weights: dict[str, tuple[int, int]], rank: int, n_hidden: int, norm: bool, edit_lr: float, seed: int = 0):
        super().__init__()
        self.weights = dict(weights)
        # a list, not a mapping: the order gives each weight its edit rate and mode, and manifests are written with
        # sorted keys (a mapping came back alphabetical: up and down projections swapped their edit rates)
        self.config = {"weights": [[k, *v] for k, v in weights.items()], "rank": rank, "n_hidden": n_hidden, "norm": norm}
        groups: dict[str, list[str]] = {}
        for name, (d_in, d_out) in self.weights.items():
            groups.setdefault(shape_key(d_in, d_out), []).append(name)
        self.mode = {name: names.index(name) for names in groups.values() for name in names}
        gen = torch.Generator().manual_seed(seed)
        self.maps = nn.ModuleDict(
            {key: GradientMap(*self.weights[names[0]], len(names), rank, n_hidden, norm, gen) for key, names in groups.items()}
        )
        self.edit_lrs = nn.Parameter(torch.full((len(self.weights),), float(edit_lr)))
        self.index = {name: i for i, name in enumerate(self.weights)}

    @classmethod
    def from_config(cls, config: dict) -> HyperNet:
        if not isinstance(config["weights"], list):
            raise ValueError("weights must be a list of [module path, d_in, d_out] in forward order")
        weights = {str(k): (int(a), int(b)) for k, a, b in config["weights"]}
        return cls(weights, int(config["rank"]), int(config["n_hidden"]), bool(config["norm"]), edit_lr=0.0)

    def updates(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per module path in ``factors`` (path -> (u (T_w, d_in), δ (T_w, d_out))), its update ΔW = out @ inp in
        nn.Linear's layout: out (d_out, T_w) = -α_w δ̃ᵀ, inp (T_w, d_in) = ũ.

        The weights of one shape go through their map as one stack of rows, each row with its weight's mode: a map
        runs once per shape, not once per weight (its matmuls read the map's weights once for all of them)."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, gmap in self.maps.items():
            names = [n for n in factors if shape_key(*self.weights[n]) == key]
            if not names:
                continue
            us, ds = zip(*(factors[n] for n in names))
            counts = [len(u) for u in us]
            modes = torch.repeat_interleave(
                torch.tensor([self.mode[n] for n in names], device=us[0].device), torch.tensor(counts, device=us[0].device)
            )  # (Σ T_w,)
            u_t, d_t = gmap(torch.cat(us), torch.cat(ds), modes)
            for name, u_w, d_w in zip(names, u_t.split(counts), d_t.split(counts)):
                out[name] = (-self.edit_lrs[self.index[name]] * d_w.T, u_w)
        return {n: out[n] for n in factors}
