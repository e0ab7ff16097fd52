from __future__ import annotations

from editing.hparams import LocateEditHyperParams


class ROMEHyperParams(LocateEditHyperParams):
    layer: int  # the block whose MLP output projection is edited
