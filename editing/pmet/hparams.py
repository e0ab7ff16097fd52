from __future__ import annotations

from editing.hparams import MultiLayerHyperParams


class PMETHyperParams(MultiLayerHyperParams):
    """Consecutive blocks' MLP output projections; targets, templates, statistics and the covariance solve."""
