from __future__ import annotations

from editing.hparams import LocateEditHparams


class ROMEHyperParams(LocateEditHparams):
    layer: int  # the block whose MLP output projection is edited
