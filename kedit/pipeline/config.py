"""What a stream is asked to do: the feeds, the base model, the editor, the gates, where to track."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kedit.core.errors import KeditError
from kedit.core.facts import Limits

# the history points kept per accepted version: what the drawdown plot, the stream run's series and `kedit status` show
HISTORY_KEYS = ("drawdown_base", "drawdown_prev", "retention")


class StreamError(KeditError):
    pass


@dataclass(frozen=True)
class StreamConfig:
    feeds: tuple[str, ...]
    model: str
    editor: str | None = None  # None: the registry's default editor (editing.DEFAULT_EDITOR)
    batch_size: int = 10
    gates: str | None = None  # YAML path; None: data/gates/default.yaml
    tracking_uri: str | None = None
    corpus: str | None = None  # ordinary text editors read (key statistics, background negatives); None: sampled from the model
    overrides: dict[str, Any] = field(default_factory=dict)  # editor hparams, dotted keys
    device: str | None = None
    work_dir: str = "out/stream"
    fmt: str = "auto"
    limits: Limits = field(default_factory=Limits)  # on what the feeds may hold
    # federated editing (FLEKE): this stream is client ``client`` (registered as <model>@<client>); with
    # ``mkv`` (the server's MKV store, a directory) its editor reuses the other clients' target vectors and
    # uploads those it optimized for each accepted version
    client: str | None = None
    mkv: str | None = None
    mkv_threshold: float = 0.99
    mkv_min_share: float = 0.0
    mkv_refine: bool = False  # a reused vector is checked here and stepped from where it falls short

    def __post_init__(self):
        if self.editor is None:
            from editing import DEFAULT_EDITOR

            object.__setattr__(self, "editor", DEFAULT_EDITOR)
        if self.batch_size < 1:
            raise StreamError(f"batch size must be at least 1, got {self.batch_size}")
        if not self.feeds:
            raise StreamError("no fact feeds given")
        if self.mkv and not self.client:
            raise StreamError("an MKV store (mkv) is shared between clients: name this stream's client")
