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

from collections.abc import Iterator
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

    layout: RunningMean | None  # set by ``sequences`` / ``decoding`` for the forwards inside them


def routers(model: torch.nn.Module) -> dict[str, Router]:
    """Every installed memory of the model by module path (nested ones included: each answers for itself)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Router)}


class RunningMean:
    """Per token, the mean of a per-token quantity (B, T, k) over its own sequence up to and including it.

    ``visible`` (B, T, T) bool: the tokens each token's sequence holds up to it, for one forward (an attention
    pattern without padding). ``mask`` (B, T): a prefill of left- or right-padded rows, after which every further
    call appends tokens to each row (decoding from a cache); the sums carry over between calls.
    """

    def __init__(self, visible: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        if (visible is None) == (mask is None):
            raise ValueError("a running mean takes either visible (one forward) or mask (a prefill and decoding)")
        self.visible, self.mask = visible, mask
        self.sums: torch.Tensor | None = None  # (B, k) over each row's tokens so far (decoding)
        self.counts: torch.Tensor | None = None  # (B, 1)

    def __call__(self, values: torch.Tensor) -> torch.Tensor:
        if self.visible is not None:
            if self.visible.shape[:2] != values.shape[:2]:
                laid, got = tuple(self.visible.shape[:2]), tuple(values.shape[:2])
                raise ValueError(f"sequences laid out for {laid} rows and tokens, the input has {got}")
            w = self.visible.to(values)  # (B, T, T)
            return (w @ values) / w.sum(-1, keepdim=True).clamp(min=1)
        if self.sums is None:  # the prefill: padding counts for nothing
            real = self.mask[:, : values.shape[1], None].to(values)  # (B, T, 1)
            sums, counts = (values * real).cumsum(1), real.cumsum(1)
        else:  # decoding: every new token is real
            steps = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype)[None, :, None]
            sums, counts = self.sums[:, None] + values.cumsum(1), self.counts[:, None] + steps
        self.sums, self.counts = sums[:, -1], counts[:, -1]
        return sums / counts.clamp(min=1)


def causal_mean(values: torch.Tensor) -> torch.Tensor:
    """(B, T, k) -> (B, T, k): each row one sequence from column 0 (no layout given)."""
    steps = torch.arange(1, values.shape[1] + 1, device=values.device, dtype=values.dtype)
    return values.cumsum(1) / steps[None, :, None]


def _sequence_routers(model: torch.nn.Module) -> list[SequenceRouter]:
    return [m for m in routers(model).values() if isinstance(m, SequenceRouter)]


@contextmanager
def _laid_out(model: torch.nn.Module, make) -> Iterator[None]:
    found = _sequence_routers(model)
    for m in found:  # one running mean per router: each carries its own sums while decoding
        m.layout = make()
    try:
        yield
    finally:
        for m in found:
            m.layout = None


def sequences(model: torch.nn.Module, visible: torch.Tensor) -> AbstractContextManager[None]:
    """For the forwards inside: ``visible`` (B, T, T) bool, the tokens each token's sequence holds up to it."""
    return _laid_out(model, lambda: RunningMean(visible=visible))


def decoding(model: torch.nn.Module, mask: torch.Tensor) -> AbstractContextManager[None]:
    """For one generation: the first forward inside is the prefill of these (B, T) rows, each later one appends."""
    return _laid_out(model, lambda: RunningMean(mask=mask))
