from __future__ import annotations

from editing.hparams import MultiLayerHparams


class PMETHyperParams(MultiLayerHparams):
    """Consecutive blocks' MLP output projections; targets, templates, statistics and the covariance solve."""
