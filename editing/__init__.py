"""Editors, one folder per method; importing this package registers them all."""

from .alphaedit.alphaedit import AlphaEdit
from .balancedit.balancedit import BalancEdit
from .base import EDITORS, EditError, Editor, get_editor, make_editor, register
from .come.come import CoMEMEMIT, CoMEPMET
from .ft_l.ft_l import FTL
from .ft_m.ft_m import FTM
from .grace.grace import GRACE
from .memit.memit import MEMIT
from .mend.mend import MEND
from .patches import Dense, LinearAdapter, LowRank, ModulePatch, PatchIntegrityError, PatchSet, Undo, WeightDelta
from .pmet.pmet import PMET
from .rome.rome import ROME
from .wise.wise import WISE

# what a stream edits with when no editor is named: the batch method measured best on the project's models
DEFAULT_EDITOR = MEMIT.name

__all__ = [
    "DEFAULT_EDITOR",
    "EDITORS",
    "MEMIT",
    "MEND",
    "PMET",
    "CoMEMEMIT",
    "CoMEPMET",
    "ROME",
    "AlphaEdit",
    "BalancEdit",
    "PatchIntegrityError",
    "Dense",
    "EditError",
    "Editor",
    "FTL",
    "FTM",
    "GRACE",
    "LinearAdapter",
    "LowRank",
    "ModulePatch",
    "PatchSet",
    "Undo",
    "WeightDelta",
    "WISE",
    "get_editor",
    "make_editor",
    "register",
]
