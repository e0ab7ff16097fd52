"""Reading and changing the inputs and outputs of modules named by the architecture spec."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from editing.patches import Installable


def first(x):
    """Decoder blocks return a tensor or a tuple whose first item is the hidden states."""
    return x[0] if isinstance(x, tuple) else x


def _with_first(x, value):
    return (value, *x[1:]) if isinstance(x, tuple) else value


@contextmanager
def capture(model: nn.Module, paths: list[str], what: str = "output") -> Iterator[dict[str, torch.Tensor]]:
    """Record the input (first positional or ``hidden_states``) or the output of each module, per forward."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        if what == "input":

            def pre(mod, args, kwargs, path=path):
                store[path] = args[0] if args else kwargs["hidden_states"]

            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:

            def post(mod, args, out, path=path):
                store[path] = first(out)

            handles.append(module.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@contextmanager
def edit_output(model: nn.Module, path: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace a module's (first) output by ``fn(output)`` for every forward inside the block."""
    handle = model.get_submodule(path).register_forward_hook(lambda mod, args, out: _with_first(out, fn(first(out))))
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def output_kind(model: nn.Module, path: str) -> Iterator[dict[str, bool]]:
    """Record under ``"tuple"`` whether the module returns a tuple (GPT-2's blocks) or the hidden states (Llama's),
    during the forwards inside: what a module standing in for a skipped block must return."""
    kind: dict[str, bool] = {}

    def hook(mod, args, out) -> None:
        kind.setdefault("tuple", isinstance(out, tuple))

    handle = model.get_submodule(path).register_forward_hook(hook)
    try:
        yield kind
    finally:
        handle.remove()


class StopForward(Exception):
    pass


@contextmanager
def _stopping(register: Callable) -> Iterator[None]:
    """Inside: a forward reaching the hook ``register`` puts on (raising ``StopForward``) ends there, quietly."""
    handle = register(_raise_stop)
    try:
        yield
    except StopForward:
        pass
    finally:
        handle.remove()


def _raise_stop(*_) -> None:
    raise StopForward


def stop_after(model: nn.Module, path: str) -> AbstractContextManager[None]:
    """End the forward pass after ``path`` runs (statistics need no layer above the last edited one)."""
    return _stopping(model.get_submodule(path).register_forward_hook)


def stop_before(model: nn.Module, path: str) -> AbstractContextManager[None]:
    """End the forward pass as ``path`` is entered (after the pre-hooks registered before this one: a ``capture``
    of its input entered first still sees it)."""
    return _stopping(model.get_submodule(path).register_forward_pre_hook)


def last_run(model: nn.Module, paths: list[str]) -> str:
    """Of ``paths``, the one a forward pass reaches last (modules register in the order they run)."""
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return max(paths, key=order.__getitem__)


class _Passthrough(nn.Module):
    """Stands in for a block below the edit layer: returns its input untouched."""

    def __init__(self, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple

    def forward(self, *args, **kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        return (h,) if self.returns_tuple else h


@contextmanager
def start_at_block(model: nn.Module, blocks_path: str, index: int, hidden: torch.Tensor, returns_tuple: bool) -> Iterator[None]:
    """Run the model from block ``index`` on, with ``hidden`` (B, T, d) as that block's input.

    The blocks below are swapped for passthroughs and the embedding output is overwritten at
    ``index``, so repeated forwards (an optimization loop) do not recompute what cannot change. An installed
    module below forgets what it recorded for modules above (its forwards inside see none of its tokens).
    """
    for m in model.modules():
        if isinstance(m, Installable):
            m.forget()
    blocks = model.get_submodule(blocks_path)
    saved = [blocks[i] for i in range(index)]
    for i in range(index):
        blocks[i] = _Passthrough(returns_tuple)

    def pre(mod, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    handle = blocks[index].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for i, b in enumerate(saved):
            blocks[i] = b


@contextmanager
def swapped(model: nn.Module, path: str, module: nn.Module) -> Iterator[None]:
    """``module`` stands at ``path`` inside the block; the original is put back after, whatever happens."""
    original = model.get_submodule(path)
    model.set_submodule(path, module)
    try:
        yield
    finally:
        model.set_submodule(path, original)


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """No weight gradients inside the block (target vectors are the only leaves)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)
