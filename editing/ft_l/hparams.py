from __future__ import annotations

from editing.hparams import FineTuneHyperParams


class FTLHyperParams(FineTuneHyperParams):
    """Fine-tuning with the loss at the last prompt token, L∞-bounded (EasyEdit's FT-L)."""
