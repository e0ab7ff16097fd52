from __future__ import annotations

from editing.hparams import FineTuneHparams


class FTLHyperParams(FineTuneHparams):
    """Fine-tuning with the loss at the last prompt token, L∞-bounded (EasyEdit's FT-L)."""
