"""Installed memories: modules that answer some inputs from their own store instead of the weights.

Memory editors (GRACE's codebook, a side memory behind a router) install such a module in the model. This
protocol lets a measurement ask, without knowing the method, how full the memories are and which inputs they
answer: what the issue calls the router's hit rate, which on unrelated prompts should stay near 0.

A router may decide on a sequence rather than a token (WISE routes an input on its mean activation). A module
sees only its input (B, T, d_in): where a forward's rows hold several sequences (kedit's packed scoring rows) or
continue earlier calls (decoding from a cache), whoever runs the forward says so with ``sequences`` or
``decoding``, and every such router reads it. Without either, each row is one sequence starting at column 0
(right padding, a single text, lm-eval's loglikelihood batches).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Router(Protocol):
    def routed(self, x: torch.Tensor) -> torch.Tensor:
        """(..., T, d_in) inputs of the module -> (..., T) bool: answered from the memory."""
        ...

    def n_entries(self) -> int:
        """How many entries (keys, edits) the memory holds."""
        ...


@runtime_checkable
class SequenceRouter(Router, Protocol):
    """A router whose decision at a token depends on the tokens of its sequence before it."""

    layout: Running | None  # set by ``sequences`` / ``decoding`` for the forwards inside them


def routers(model: torch.nn.Module) -> dict[str, Router]:
    """Every installed memory of the model by module path (nested ones included: each answers for itself)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Router)}


STATISTICS = ("mean", "max")  # what a sequence router may take over a sequence's tokens so far


class Running:
    """Per token, a statistic (``mean`` or ``max``) of a per-token quantity (B, T, k) over its own sequence up to
    and including it.

    ``visible`` (B, T, T) bool: the tokens each token's sequence holds up to it, for one forward (an attention
    pattern without padding). ``mask`` (B, T): a prefill of left- or right-padded rows, after which every further
    call appends tokens to each row (decoding from a cache); the running sums (or maxima) carry over between calls.
    """

    def __init__(self, visible: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if (visible is None) == (mask is None):
            raise ValueError("a running statistic takes either visible (one forward) or mask (a prefill and decoding)")
        self.visible, self.mask = visible, mask
        self.acc: torch.Tensor | None = None  # (B, k) each row's sum (mean) or maximum (max) so far, while decoding
        self.counts: torch.Tensor | None = None  # (B, 1) tokens so far, while decoding

    def __call__(self, values: torch.Tensor, how: str = "mean") -> torch.Tensor:
        if how not in STATISTICS:
            raise ValueError(f"a running statistic is one of {STATISTICS}, not {how!r}")
        if self.visible is not None:
            return self._over_visible(values, how)
        if self.acc is None:  # the prefill: padding counts for nothing
            real = self.mask[:, : values.shape[1], None].bool()  # (B, T, 1)
            if how == "max":
                acc = values.masked_fill(~real, float("-inf")).cummax(1).values
                counts = real.cumsum(1).to(values)
            else:
                acc, counts = (values * real).cumsum(1), real.cumsum(1).to(values)
        else:  # decoding: every new token is real
            steps = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype)[None, :, None]
            counts = self.counts[:, None] + steps
            if how == "max":
                acc = torch.maximum(self.acc[:, None], values.cummax(1).values)
            else:
                acc = self.acc[:, None] + values.cumsum(1)
        self.acc, self.counts = acc[:, -1], counts[:, -1]
        return acc if how == "max" else acc / counts.clamp(min=1)

    def _over_visible(self, values: torch.Tensor, how: str) -> torch.Tensor:
        if self.visible.shape[:2] != values.shape[:2]:
            laid, got = tuple(self.visible.shape[:2]), tuple(values.shape[:2])
            raise ValueError(f"sequences laid out for {laid} rows and tokens, the input has {got}")
        if how == "max":  # (B, T, T, k): each token's visible tokens' values, the others -inf
            return values[:, None].masked_fill(~self.visible[..., None], float("-inf")).amax(2)
        w = self.visible.to(values)  # (B, T, T)
        return (w @ values) / w.sum(-1, keepdim=True).clamp(min=1)


def causal(values: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """(B, T, k) -> (B, T, k): each row one sequence from column 0 (no layout given)."""
    if how == "max":
        return values.cummax(1).values
    steps = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype)
    return values.cumsum(1) / steps[None, :, None]


def _sequence_routers(model: torch.nn.Module) -> list[SequenceRouter]:
    # runs around every scoring batch and generation: a plain attribute test per module (the protocol's isinstance
    # costs milliseconds over a model's few hundred modules)
    return [m for m in model.modules() if "layout" in m.__dict__ and isinstance(m, SequenceRouter)]


@contextmanager
def _laid_out(model: torch.nn.Module, make) -> Iterator[None]:
    found = _sequence_routers(model)
    for m in found:  # one per router: each carries its own sums while decoding
        m.layout = make()
    try:
        yield
    finally:
        for m in found:
            m.layout = None


def sequences(model: torch.nn.Module, visible: Callable[[], torch.Tensor]) -> AbstractContextManager[None]:
    """For the forwards inside: ``visible()`` (B, T, T) bool, the tokens each token's sequence holds up to it; called
    once, and only where the model holds a router that takes it (most scoring batches need no such tensor)."""
    made: list[torch.Tensor] = []

    def running() -> Running:
        if not made:
            made.append(visible())
        return Running(visible=made[0])

    return _laid_out(model, running)


def decoding(model: torch.nn.Module, mask: torch.Tensor) -> AbstractContextManager[None]:
    """For one generation: the first forward inside is the prefill of these (B, T) rows, each later one appends."""
    return _laid_out(model, lambda: Running(mask=mask))
