from __future__ import annotations

from editing.hparams import TargetHyperParams, TemplateHyperParams
from kedit.core.config import Seq, StrictConfig


class ScopeHyperParams(StrictConfig):
    # where a fact's radius sits between its farthest positive sample p* and its nearest negative n*:
    # r = p* + balance (n* - p*); 0 keeps only what the samples reached, 1 reaches the nearest negative
    balance: float = 0.5
    capacity: int = 64  # entries of the first codebook; a full one is wrapped by one twice as large
    # ordinary text (the corpus, else the model's own samples) whose every token's state at the key's layer is a
    # negative of every fact, read once per editor: a single edit has no other subject to leave out, and an
    # unrelated question's year digit or "river" can lie nearer a key than any of its fact's own negatives (0: none)
    background_tokens: int = 16384
    background_window: int = 64  # tokens per window of that text


class BalancEditHyperParams(StrictConfig):
    layer: int  # block whose MLP output projection the codebook wraps; the key is its input at the subject
    # block whose MLP output a value replaces (at the tokens the scope at ``layer`` takes in, in the same forward);
    # None: ``layer``'s own. A value higher up trains on fewer blocks in fewer steps (scripts/balancedit_value_layer.py)
    value_layer: int | None = None
    scope: ScopeHyperParams = ScopeHyperParams()
    # the model's own generated prefixes: context for the value (as ROME's) and positive samples of the scope
    templates: TemplateHyperParams = TemplateHyperParams()
    # frames a question is put to the model in ("{}" is the prompt): positive samples, and rows the value
    # trains on, so that the fact is stated wherever the scope reaches
    frames: Seq[str] = ("Q: {} A:", "Question: {}\nAnswer:")
    # the value: the layer's output at the subject plus ROME's target vector (KL on the subject's essence)
    value: TargetHyperParams = TargetHyperParams()
