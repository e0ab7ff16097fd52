"""The two halves of MEND's forward: an edit's gradient factors at the edited weights, and the model run
with the network's updates added (differentiably, for training; the editor applies them as a delta)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (u (T, d_in), δ (T, d_out))


def target_nll(logits: torch.Tensor, rows, cols, labels) -> torch.Tensor:
    """Per target token, its NLL predicted from its true prefix: (n_tokens,)."""
    logp = torch.log_softmax(logits[rows, cols].float(), -1)  # (n_tokens, V)
    return -logp.gather(-1, labels[:, None]).squeeze(-1)


def kept(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions a loss reads logits at, once each, and each read's index among them.

    Passed as ``logits_to_keep``, the vocabulary head runs on K positions instead of L: above the lowest
    edited block the head is most of a forward's work (SmolLM2: 28M of its parameters against 3.5M a block).
    """
    return torch.unique(cols, return_inverse=True)  # (K,), (len(cols),)


def gradient_factors(model: nn.Module, paths: list[str], loss_fn: Callable[[], torch.Tensor], mask: torch.Tensor) -> Factors:
    """Per module path, the inputs u_t and output gradients δ_t of ``loss_fn()``'s forward, at the real tokens
    (``mask`` (B, L)) whose two factors are both non-zero: Σ_t δ_t u_tᵀ is the module's weight gradient.

    Gradients are taken with respect to the modules' outputs only (``torch.autograd.grad``), so no weight
    gradient is accumulated and the backward pass stops at the lowest edited module.
    """
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:

        def hook(mod, args, out, path=path):
            inputs[path] = args[0].detach()
            if not out.requires_grad:  # the lowest edited module of a frozen model: start the graph here
                out = out.detach().requires_grad_(True)
            outputs[path] = out
            return out

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        with torch.enable_grad():
            loss = loss_fn()
            grads = torch.autograd.grad(loss, [outputs[p] for p in paths], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    keep_tokens = mask.bool().reshape(-1)
    out: Factors = {}
    for path, g in zip(paths, grads):
        u = inputs[path].reshape(-1, inputs[path].shape[-1])[keep_tokens]  # (T, d_in)
        d = (torch.zeros_like(outputs[path]) if g is None else g).reshape(-1, outputs[path].shape[-1])[keep_tokens]
        nonzero = (u != 0).any(-1) & (d != 0).any(-1)  # a token after the last target has δ = 0: no information
        out[path] = (u[nonzero].float(), d[nonzero].float())
    return out


@contextmanager
def added_updates(model: nn.Module, updates: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Run the model as if each module's weight had ``out @ inp`` added (nn.Linear layout, out (d_out, T), inp (T, d_in)):
    y += (x @ inpᵀ) @ outᵀ, which is also right for GPT-2's Conv1D (the hook works on x and y, not on the storage)."""
    handles = []
    for path, (o, i) in updates.items():

        def hook(mod, args, y, o=o, i=i):
            x = args[0]
            return y + ((x.float() @ i.T) @ o.T).to(y.dtype)

        handles.append(model.get_submodule(path).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
