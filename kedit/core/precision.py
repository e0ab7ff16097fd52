"""Running a model's forward in a lower precision than its weights': the choice and the copy.

On a CPU with native bf16 dot products (AVX-512 BF16 or AMX) a bf16 matmul costs about half an fp32 one, so work that
only reads the model (an editor's unedited forwards and target steps, the gates' scoring) can run on a bf16 copy
while the model itself, which edits change and versions record bit for bit, keeps its own precision.
"""

from __future__ import annotations

from copy import deepcopy
from typing import Literal

import torch
from torch import nn

# "model": the weights' own; "auto": bfloat16 where its matmuls are native (``low_precision``); or a dtype's name
Precision = Literal["model", "auto", "bfloat16", "float16"]


def low_precision(precision: str | None, model: nn.Module) -> torch.dtype | None:
    """The dtype a copy runs in when it is not the model's own (None: the model itself).

    ``auto``: bf16 for fp32 weights where bf16 matmuls are native (a CUDA device, or a CPU whose oneDNN has them:
    AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slower, and the model's own precision is kept."""
    if precision in (None, "model"):
        return None
    weight = next(model.parameters())
    if precision != "auto":
        dtype = getattr(torch, precision)
        return None if dtype == weight.dtype else dtype
    native = weight.device.type == "cuda" or (weight.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return torch.bfloat16 if weight.dtype == torch.float32 and native else None


def low_precision_copy(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A frozen copy of the model in ``dtype``, made per call: it cannot go stale across edits."""
    # the weights go straight to ``dtype`` (a memo deepcopy takes as given): no fp32 clone of 135M weights first;
    # tied weights stay tied (one memo entry per parameter object)
    memo = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in model.parameters()}
    return deepcopy(model, memo).to(dtype).eval()  # .to: the buffers (rotary frequencies), as the model's .to would
