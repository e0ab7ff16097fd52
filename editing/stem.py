"""The frozen parts of a model around an edit, run at lower precision: an editor whose gradient starts high in
the model (MEND: the top three of SmolLM2's 30 blocks) spends most of an edit's forward where nothing is edited
and no gradient flows, and a good part of it in the output head, which no edit changes but every loss runs
through, forward and backward (SmolLM2's head is 28M parameters, eight blocks' worth). At batch 1 these matmuls
read every weight for a dozen tokens, so they cost what their bytes cost: a copy of the model in ``dtype``
(bf16: half the bytes, and native dot products on a CPU with AVX512-BF16 or AMX) computes the hidden states
entering the first edited block (``FrozenCopy.hidden``) and can stand in for the head (``FrozenCopy.head``); the
edited blocks run in the model's own precision.

The copy is rebuilt whenever a weight of the stem changed (a parameter's in-place version counter or its
storage moved): a stale copy cannot be used.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kedit.core.arch import ArchSpec
from kedit.core.precision import low_precision_copy

from .hooks import capture, output_kind, stop_before


class _CastHead(nn.Module):
    """A low-precision head fed and read in the model's dtype; gradients reach its input as through the model's own."""

    def __init__(self, head: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.head, self.dtype = head, dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, K, d) -> logits (B, K, V)
        return self.head(x.to(self.dtype)).to(x.dtype)


@dataclass(frozen=True)
class FrozenCopy:
    """A fresh copy (``LowPrecisionStem.fresh``): valid for the forwards of one edit, until a frozen weight changes."""

    module: nn.Module
    spec: ArchSpec
    first: int
    dtype: torch.dtype
    model_dtype: torch.dtype

    @torch.no_grad()
    def hidden(self, input_ids, attention_mask, position_ids) -> tuple[torch.Tensor, bool]:
        """The input of block ``first`` (B, T, d) in the model's dtype, and whether blocks return tuples."""
        block = self.spec.block(self.first)
        # the forward stops as block ``first`` is entered; the block below tells whether blocks return tuples
        # (with nothing below, no block is skipped and it does not matter)
        below = self.spec.block(self.first - 1) if self.first > 0 else block
        with capture(self.module, [block], "input") as seen, output_kind(self.module, below) as kind:
            with stop_before(self.module, block):
                self.module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
        return seen[block].to(self.model_dtype), kind.get("tuple", False)

    def head(self) -> nn.Module:
        """The copy's output head, to stand at ``spec.lm_head`` (``hooks.swapped``): the copy is fresh for the
        head too, since its weights are among the stem's (outside every block)."""
        return _CastHead(self.module.get_submodule(self.spec.lm_head), self.dtype)


class LowPrecisionStem:
    """The model's copy in ``dtype``, kept while the weights it copies (every one outside blocks ``first`` and up)
    stay as they are."""

    def __init__(self, model: nn.Module, spec: ArchSpec, first: int, dtype: torch.dtype):
        self.model, self.spec, self.first, self.dtype = model, spec, first, dtype
        self._copy: nn.Module | None = None
        self._key: tuple | None = None

    def _stem_params(self) -> list[torch.Tensor]:
        above = {id(p) for block in self.model.get_submodule(self.spec.blocks)[self.first :] for p in block.parameters()}
        # every parameter that is not in a block at or above ``first`` (embeddings, the blocks below, the head)
        return [p for p in self.model.parameters() if id(p) not in above]

    def fresh(self) -> FrozenCopy:
        """The copy, rebuilt first if a weight it copies changed: take one per edit (the check walks the model)."""
        key = tuple((p.data_ptr(), p._version) for p in self._stem_params())
        if self._copy is None or key != self._key:
            self._copy = low_precision_copy(self.model, self.dtype)
            self._key = key
        dtype = next(self.model.parameters()).dtype
        return FrozenCopy(self._copy, self.spec, self.first, self.dtype, dtype)
