"""Feed file naming: which files of a feeds directory are feeds (the watcher fires on these)."""

from __future__ import annotations

from pathlib import Path

FEED_SUFFIXES = (".jsonl", ".csv", ".json")
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")  # still being written (write-then-rename)


def is_feed_name(path: Path) -> bool:
    return not path.name.startswith(".") and path.suffix in FEED_SUFFIXES and not path.name.endswith(PARTIAL_SUFFIXES)


def list_feeds(feeds_dir: str | Path) -> list[str]:
    """The entries of a directory with a feed's name (hidden and partial ones excluded), sorted. Every
    such entry is listed, a link, a FIFO or a directory with a feed's name too: whoever reads them
    (``load_facts``, ``kedit serve``'s confinement) refuses those with a reason instead of them
    being dropped unseen."""
    d = Path(feeds_dir)
    return sorted(str(p) for p in d.iterdir() if is_feed_name(p)) if d.is_dir() else []
