from __future__ import annotations

from editing.hparams import FineTuneHyperParams


class FTMHyperParams(FineTuneHyperParams):
    """Fine-tuning with the loss on the target tokens only (EasyEdit's FT-M); norm_constraint < 0: unconstrained."""
