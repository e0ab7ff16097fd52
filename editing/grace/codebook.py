"""GRACE's codebook: an installable module around one layer's MLP output projection.

Each entry is a key (the projection's input at an edited prompt's last token), a value (the output the
model should have there) and a deferral radius. For every token position, the input is compared with
the keys; where the nearest key lies within its radius, that key's value replaces the projection's
output, and everywhere else the output is the wrapped module's, bit for bit. Empty rows have radius -1.

The capacity is fixed per module, so that later edits change rows (a weight delta of a few rows) rather
than reallocating; a full codebook is wrapped by a new, larger one, and where both hold a matching key
the outer (newer) one wins.

A codebook may also be split in two: a ``Scope`` (keys and radii) around one block's projection, which
finds the hits and leaves that block's output as it is, and its ``Answers`` (values) around a later block's,
which replaces that block's output at the tokens its scope hit in the same forward. The key stays where a
fact's rephrasings lie near it; the value is written where it is cheap to train (fewer blocks above it).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from editing.patches import Installable, PatchIntegrityError
from editing.patches.modules import register_module_type

EMPTY = -1.0  # the radius of an unused row: no distance is below it


def _rows(original: nn.Module, *shape: int, fill: float = 0.0) -> nn.Parameter:
    """A frozen tensor in the wrapped layer's dtype and device: parameters, not buffers, so that later edits
    change rows through weight deltas like any weight's."""
    w = next(original.parameters())
    return nn.Parameter(torch.full(shape, fill, dtype=w.dtype, device=w.device), requires_grad=False)


@register_module_type
class Codebook(Installable):
    type_name: ClassVar[str] = "grace-codebook"
    rows: ClassVar[tuple[str, ...]] = ("keys", "values", "radii")  # the per-entry tensors this module holds

    def __init__(self, original: nn.Module, capacity: int, d_in: int, d_out: int):
        super().__init__()
        self.original = original
        self.capacity, self.d_in, self.d_out = int(capacity), int(d_in), int(d_out)
        self.keys = _rows(original, self.capacity, self.d_in)  # (C, d_in)
        self.values = _rows(original, self.capacity, self.d_out)  # (C, d_out)
        self.radii = _rows(original, self.capacity, fill=EMPTY)  # (C,)

    @classmethod
    def from_config(cls, config: dict[str, Any], original: nn.Module) -> Codebook:
        return cls(original, config["capacity"], config["d_in"], config["d_out"])

    def config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "d_in": self.d_in, "d_out": self.d_out}

    def n_entries(self) -> int:  # kedit.core.routing.Router
        return int((self.radii >= 0).sum())

    def routed(self, x: torch.Tensor) -> torch.Tensor:  # kedit.core.routing.Router
        """(..., d_in) -> (...) bool: the tokens this codebook answers (none while it is empty)."""
        return self.lookup(x.reshape(-1, x.shape[-1]))[1].view(x.shape[:-1])

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of x (N, d_in): the nearest used key's index and whether x lies within its radius."""
        return nearest_within(x, self.keys, self.radii)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)  # (..., d_out)
        if not bool((self.radii >= 0).any()):
            return out
        idx, hit = self.lookup(x.reshape(-1, x.shape[-1]))  # (N,) over every position
        if not bool(hit.any()):
            return out
        flat = out.reshape(-1, out.shape[-1])
        return torch.where(hit[:, None], self.values[idx].to(out.dtype), flat).view_as(out)


@register_module_type
class Scope(Installable):
    """The key half of a split codebook: keys and radii around one block's projection, whose output it returns
    unchanged. Each forward records, per token, the nearest key and whether the token lies within its radius
    (``found``), which the ``Answers`` bound to it reads later in the same forward."""

    type_name: ClassVar[str] = "codebook-scope"
    rows: ClassVar[tuple[str, ...]] = ("keys", "radii")

    def __init__(self, original: nn.Module, capacity: int, d_in: int):
        super().__init__()
        self.original = original
        self.capacity, self.d_in = int(capacity), int(d_in)
        self.keys = _rows(original, self.capacity, self.d_in)  # (C, d_in)
        self.radii = _rows(original, self.capacity, fill=EMPTY)  # (C,)
        self.found: tuple[torch.Tensor, torch.Tensor] | None = None  # (...,) index, (...,) hit: this forward's

    @classmethod
    def from_config(cls, config: dict[str, Any], original: nn.Module) -> Scope:
        return cls(original, config["capacity"], config["d_in"])

    def config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "d_in": self.d_in}

    # the key half's lookup is the whole codebook's (they read only keys and radii)
    n_entries = Codebook.n_entries
    routed = Codebook.routed
    lookup = Codebook.lookup

    def forget(self) -> None:
        self.found = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((self.radii >= 0).any()):
            idx, hit = self.lookup(x.reshape(-1, x.shape[-1]))  # (N,) over every position
            self.found = idx.view(x.shape[:-1]), hit.view(x.shape[:-1])
        else:
            self.found = None
        return self.original(x)


@register_module_type
class Answers(Installable):
    """The value half of a split codebook: around a later block's projection, its output at the tokens its
    ``Scope`` (installed before it at ``config['scope']``) hit in this forward becomes the hit key's value;
    everywhere else it is the wrapped module's, bit for bit. A forward that starts above the scope (the target
    steps' ``start_at_block``, which forgets what the scope found) gets no hits: the scope never saw its tokens.
    The hits pass through the scope's ``found`` between the two halves: one forward at a time per model, as
    every forward kedit runs is."""

    type_name: ClassVar[str] = "codebook-answers"
    rows: ClassVar[tuple[str, ...]] = ("values",)

    def __init__(self, original: nn.Module, capacity: int, d_out: int, scope: str):
        super().__init__()
        self.original = original
        self.capacity, self.d_out, self.scope_path = int(capacity), int(d_out), str(scope)
        self.values = _rows(original, self.capacity, self.d_out)  # (C, d_out)
        self._scope: tuple[Scope, ...] = ()  # a tuple, not an attribute nn.Module would register as a child

    @classmethod
    def from_config(cls, config: dict[str, Any], original: nn.Module) -> Answers:
        return cls(original, config["capacity"], config["d_out"], config["scope"])

    def config(self) -> dict[str, Any]:
        return {"capacity": self.capacity, "d_out": self.d_out, "scope": self.scope_path}

    def bind(self, model: nn.Module) -> None:
        """Installed: the scope is the one at the same depth of the stack at its path (innermost first) as this
        one in its own stack, whether the pairs were installed pair by pair (a chain) or every scope first (a
        squashed chain installs path by path)."""
        scopes, _ = codebooks(model.get_submodule(self.scope_path), Scope)
        depth = len(codebooks(self.original, Answers)[0])  # the answers this one wraps
        if depth >= len(scopes) or scopes[depth].capacity != self.capacity:
            raise PatchIntegrityError(f"{self.scope_path}: no {self.capacity}-entry scope at depth {depth} for these answers")
        self._scope = (scopes[depth],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.original(x)  # (..., d_out)
        if not self._scope:
            raise PatchIntegrityError(f"answers for {self.scope_path} were never bound to their scope")
        found = self._scope[0].found
        if found is None:
            return out
        idx, hit = found
        if hit.shape != x.shape[:-1]:
            raise RuntimeError(f"the scope at {self.scope_path} saw {tuple(hit.shape)} tokens, its answers {tuple(x.shape[:-1])}")
        if not bool(hit.any()):
            return out
        return torch.where(hit[..., None], self.values[idx].to(out.dtype), out)


def nearest_within(x: torch.Tensor, keys: torch.Tensor, radii: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (N, d_in): the nearest key's index among keys (C, d_in) with a radius >= 0, and whether x
    lies within that key's radius: where the nearer of two overlapping scopes answers."""
    dist = torch.cdist(x.float(), keys.float())  # (N, C)
    dist = dist.masked_fill(radii < 0, float("inf"))
    nearest, idx = dist.min(-1)  # (N,)
    return idx, nearest <= radii.float()[idx]


def codebooks(module: nn.Module, kind: type[Installable] = Codebook) -> tuple[list, nn.Module]:
    """The codebooks (or scopes, or answers) stacked at a path, innermost first (each full one wrapped by the
    next), and the layer they wrap."""
    out: list = []
    while isinstance(module, kind):
        out.append(module)
        module = module.original
    return out[::-1], module
