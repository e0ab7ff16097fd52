"""Gates: the thresholds a batch of edits must pass before it becomes a version.

A gates file (``data/gates/default.yaml``) lists gates by name with their thresholds; ``null`` for a
threshold logs the number without enforcing it, and a gate left out of the file is not run. Each gate
is one module registered in ``GATES``:

- ``edits``: the batch's own edits hold on their prompt and paraphrases; neighbourhood prompts keep
  their own answer, compared with the same prompts just before the step;
- ``retention``: earlier accepted edits that held on the previous version still hold;
- ``drawdown``: facts the base model knew (the retain set) are lost, against the base model and
  against the previous accepted version;
- ``capability``: lm-eval metrics regress by at most a relative amount against the base model;
- ``memory``: installed memories (memory editors) answer few unrelated prompts; logs their size; nothing to
  check for weight editors;
- ``portability`` (optional, off in the default gates): multi-hop questions (MQuAKE) whose rewrites are all
  live are answered with the new answer.

Adding a gate is a module with a :class:`Gate` subclass decorated with :func:`register_gate`, imported
here, and an entry in the gates file.
"""

from kedit.core.config import ConfigError

from . import capability, drawdown, edits, memory, portability, retention  # noqa: F401  (registers the gates)
from .base import GATES, Gate, GateReport, GateResult, Outcome, Step, Threshold, at_least, at_most, register_gate
from .measures import EditOutcomes, edit_outcomes, neighbours_keep, regression
from .suite import GatesFile, GateSuite, default_gates_path, load_gates, suite_from_mapping

__all__ = [
    "GATES",
    "GateResult",
    "ConfigError",
    "EditOutcomes",
    "Gate",
    "GateReport",
    "GateSuite",
    "GatesFile",
    "Outcome",
    "Step",
    "Threshold",
    "at_least",
    "at_most",
    "default_gates_path",
    "edit_outcomes",
    "load_gates",
    "neighbours_keep",
    "register_gate",
    "regression",
    "suite_from_mapping",
]
