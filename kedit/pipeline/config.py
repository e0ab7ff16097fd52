"""What a stream is asked to do: the feeds, the base model, the editor, the gates, where to track."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kedit.core.errors import KeditError
from kedit.core.facts import Limits

# the history points kept per accepted version: what the drawdown plot, the stream run's series and `kedit status` show
HISTORY_KEYS = ("drawdown_base", "drawdown_prev", "retention")
# how a federation splits its data file into clients: by relation (prompt template), or clusters of embeddings
SPLITS = ("relation", "cluster")


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


@dataclass(frozen=True)
class FederationConfig:
    """A federation run over one data file (FLEKE's time slots, ``flows/federate.py``): the file's facts are dealt
    to ``clients`` clients over ``slots`` slots (``own`` new facts of a client's own relations per slot, and from
    slot 1 on ``shared`` facts another client had earlier), and each client's slot runs as that client's stream.

    ``stream`` is every client's stream: its one feed is the data file, its ``client`` the prefix of the clients'
    names (``client0``, ``client1``, ...), its ``mkv`` the store they share, its ``work_dir`` the federation's
    (each client works in a folder of its own below it)."""

    stream: StreamConfig
    clients: int
    slots: int
    own: int
    shared: int
    split: str  # SPLITS
    seed: int  # which earlier facts each client shares, and the spectral clustering's seed

    def __post_init__(self):
        if len(self.stream.feeds) != 1:
            raise StreamError(f"a federation deals the facts of one data file, got {len(self.stream.feeds)} feeds")
        if not (self.stream.client and self.stream.mkv):
            raise StreamError("a federation's clients share an MKV store: give the clients' name prefix and the store")
        if self.clients < 2 or self.slots < 1 or self.own < 1 or self.shared < 0:
            raise StreamError(
                f"a federation needs >= 2 clients, >= 1 slot and >= 1 own fact per slot, got clients={self.clients}, "
                f"slots={self.slots}, own={self.own}, shared={self.shared}"
            )
        if self.split not in SPLITS:
            raise StreamError(f"split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    def client_name(self, c: int) -> str:
        return f"{self.stream.client}{c}"

    def client_stream(self, c: int, feed: str) -> StreamConfig:
        """Client c's stream on one of its slot feeds (written in kedit's own feed format, whatever the data file's),
        working in its own folder."""
        name = self.client_name(c)
        work_dir = str(Path(self.stream.work_dir) / name)
        return replace(self.stream, feeds=(feed,), fmt="feed", client=name, work_dir=work_dir)
