"""Mediator knowledge vectors (FLEKE, Zhao et al., 2025): the target vectors a locate-then-edit editor
optimizes per fact, shared between clients through a server so that a fact edited by one client costs
another no optimization. Facts, prompts and targets never leave a client.

An upload is one client's vectors of one time slot, ``<root>/<client>/slot-<t>/``:

- ``vectors.safetensors``: ``keys`` (n, d_k), what a vector is looked up by, and ``z.<i>`` (n, d_i), the
  target of the i-th optimized module (``Compat.modules`` order), as absolute hidden states;
- ``manifest.json``: client, slot, n, what a reuser must share (``Compat``), the tensors' sha256, and the
  manifest's own sha256.

Keys and vectors are float hidden states; there is no text and no token id in either file. What they do
reveal: anyone who holds the base model can run its upper layers from a vector and read the edit's new
value off the output; what the key reveals depends on how the editor builds it (its hparams hash names it).

A client writes only under its own name (``MKVStore.client``) and each slot once; every upload another
client reads is verified (hashes, shapes, finiteness, compatibility) and refused, with a count per reason,
when anything is off: the fact is then optimized locally, so nothing is lost.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from editing.exchange import KEY_VERSION, Found
from kedit.core.errors import KeditError
from kedit.core.paths import sha256_file

log = logging.getLogger(__name__)

FORMAT = "kedit-mkv/1"
TENSORS = "vectors.safetensors"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class MKVError(KeditError):
    """An upload that cannot be written or trusted."""


@dataclass(frozen=True)
class Compat:
    """What a vector's maker and its reuser must share for the vector to mean the same edit."""

    fingerprint: str  # base model weights
    editor: str
    modules: tuple[str, ...]  # where the targets are set, in order
    dims: tuple[int, ...]  # each module's output width
    key_dim: int
    hparams_sha256: str  # the target optimization's hparams (and the key's definition)

    def mismatch(self, other: Compat) -> str | None:
        """The first field that differs, or None."""
        for name in ("fingerprint", "editor", "modules", "dims", "key_dim", "hparams_sha256"):
            if getattr(self, name) != getattr(other, name):
                return name
        return None


@dataclass
class Upload:
    client: str
    slot: int
    compat: Compat
    keys: torch.Tensor  # (n, d_k)
    vectors: dict[str, torch.Tensor]  # module -> (n, d)

    @property
    def n(self) -> int:
        return self.keys.shape[0]


@dataclass
class Lookup:
    """Per queried fact: whether a vector was found, its similarity, where it came from, and the vectors
    (rows of facts without one are zero). ``refused`` counts the uploads left out, per reason."""

    found: torch.Tensor  # (n,) bool
    similarity: torch.Tensor  # (n,) best cosine over the uploads drawn on (-1 where there were none)
    source: list[str | None]  # "client/slot-t" of each found vector
    vectors: dict[str, torch.Tensor]  # module -> (n, d)
    refused: dict[str, int] = field(default_factory=dict)
    source_row: list[int | None] = field(default_factory=list)  # each found vector's row in its upload

    @property
    def n_found(self) -> int:
        return int(self.found.sum())


def check_client_name(client: str) -> str:
    if not _NAME.match(client or ""):
        raise MKVError(f"client name {client!r}: letters, digits, '_', '.', '-' only (at most 64), not starting with a symbol")
    return client


def _manifest_sha(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _validate(keys: torch.Tensor, vectors: dict[str, torch.Tensor], compat: Compat, where: str) -> None:
    if keys.ndim != 2 or keys.shape[1] != compat.key_dim:
        raise MKVError(f"{where}: keys have shape {tuple(keys.shape)}, expected (n, {compat.key_dim})")
    if list(vectors) != list(compat.modules):
        raise MKVError(f"{where}: vectors for {list(vectors)}, expected {list(compat.modules)}")
    for (module, z), d in zip(vectors.items(), compat.dims):
        if tuple(z.shape) != (keys.shape[0], d):
            raise MKVError(f"{where}: {module} vectors have shape {tuple(z.shape)}, expected ({keys.shape[0]}, {d})")
    for name, t in [("keys", keys), *vectors.items()]:
        if not torch.isfinite(t).all():
            raise MKVError(f"{where}: {name} holds NaN or infinite values")


class MKVStore:
    """The server's side: every client's uploads under ``root`` (a directory the MLflow artifact store syncs)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def client(self, name: str) -> ClientStore:
        return ClientStore(self, check_client_name(name))

    def slots(self) -> list[Path]:
        """Every upload directory, in (client, slot) order."""
        return sorted(p.parent for p in self.root.glob(f"*/slot-*/{MANIFEST}"))

    def load(self, directory: Path) -> Upload:
        """An upload, verified: its manifest's own hash, the tensors' hash, shapes and finiteness."""
        where = str(directory)
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise MKVError(f"{where}/{MANIFEST}: unreadable ({e})") from None
        if manifest.get("format") != FORMAT:
            raise MKVError(f"{where}/{MANIFEST}: format {manifest.get('format')!r}, expected {FORMAT!r}")
        if manifest.get("manifest_sha256") != _manifest_sha(manifest):
            raise MKVError(f"{where}/{MANIFEST}: its sha256 does not match its content (altered)")
        tensors = directory / TENSORS
        if not tensors.is_file() or sha256_file(tensors) != manifest.get("tensors_sha256"):
            raise MKVError(f"{where}/{TENSORS}: missing, or its sha256 does not match the manifest's")
        try:
            compat = Compat(**{k: tuple(v) if isinstance(v, list) else v for k, v in manifest["compat"].items()})
            data = load_file(tensors)
            keys = data["keys"]
            vectors = {m: data[f"z.{i}"] for i, m in enumerate(compat.modules)}
        except (KeyError, TypeError, ValueError) as e:
            raise MKVError(f"{where}: malformed upload ({type(e).__name__}: {e})") from None
        _validate(keys, vectors, compat, where)
        if manifest.get("client") != directory.parent.name or manifest.get("slot") != int(directory.name.removeprefix("slot-")):
            raise MKVError(f"{where}: its manifest names client {manifest.get('client')!r}, slot {manifest.get('slot')!r}")
        return Upload(manifest["client"], manifest["slot"], compat, keys, vectors)


class ClientStore:
    """One client's handle on the store: it writes under its own name only and reads the others'."""

    def __init__(self, store: MKVStore, name: str):
        self.store, self.name = store, name

    def _dir(self, slot: int) -> Path:
        if not isinstance(slot, int) or slot < 0:
            raise MKVError(f"slot {slot!r}: a non-negative integer")
        return self.store.root / self.name / f"slot-{slot}"

    def upload(self, slot: int, compat: Compat, keys: torch.Tensor, vectors: dict[str, torch.Tensor]) -> Path:
        """Write this client's vectors of ``slot`` (exactly once: the same upload again is a no-op, a
        different one for a slot already written is refused)."""
        keys = keys.detach().float().cpu().contiguous()
        vectors = {m: z.detach().float().cpu().contiguous() for m, z in vectors.items()}
        _validate(keys, vectors, compat, f"{self.name} slot {slot}")
        directory = self._dir(slot)
        tensors = {"keys": keys} | {f"z.{i}": vectors[m] for i, m in enumerate(compat.modules)}
        tmp = directory.with_name(directory.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp / TENSORS))
        manifest = {"format": FORMAT, "client": self.name, "slot": slot, "n": keys.shape[0]}
        manifest |= {"compat": json.loads(json.dumps(asdict(compat))), "tensors_sha256": sha256_file(tmp / TENSORS)}
        manifest["manifest_sha256"] = _manifest_sha(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        if (directory / MANIFEST).is_file():
            there = json.loads((directory / MANIFEST).read_text())
            same = (there.get("tensors_sha256"), there.get("compat")) == (manifest["tensors_sha256"], manifest["compat"])
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
            if not same:
                raise MKVError(f"{self.name} slot {slot} is uploaded already, with other vectors; a slot is written once")
            return directory
        os.replace(tmp, directory)  # a kill before this leaves no upload, after it a whole one
        return directory

    def lookup(self, keys: torch.Tensor, compat: Compat, threshold: float, min_share: float) -> Lookup:
        """Vectors for the queried facts (``keys`` (n, d_k)) from the other clients' uploads.

        A fact takes the vector whose key is most similar (cosine), when that is ≥ ``threshold``. An upload is
        drawn on only when at least ``min_share`` of the batch finds a match ≥ ``threshold`` in it (FLEKE's
        reference code: half), so that a client reuses from peers whose facts resemble its own.
        """
        n = keys.shape[0]
        refused: dict[str, int] = {}
        accepted: list[Upload] = []
        for directory in self.store.slots():
            if directory.parent.name == self.name:
                continue
            try:
                up = self.store.load(directory)
            except MKVError as e:
                log.warning("refused MKV upload: %s", e)
                refused["damaged"] = refused.get("damaged", 0) + 1
                continue
            why = compat.mismatch(up.compat)
            if why:
                refused[why] = refused.get(why, 0) + 1
                continue
            accepted.append(up)
        vectors = {m: torch.zeros(n, d) for m, d in zip(compat.modules, compat.dims)}
        none = Lookup(torch.zeros(n, dtype=torch.bool), torch.full((n,), -1.0), [None] * n, vectors, refused)
        if not accepted or n == 0:
            return none
        stored = torch.cat([u.keys for u in accepted])  # (m, d_k)
        src = torch.cat([torch.full((u.n,), i) for i, u in enumerate(accepted)])  # (m,) upload of each row
        q = torch.nn.functional.normalize(keys.detach().float().cpu(), dim=-1)
        sims = q @ torch.nn.functional.normalize(stored, dim=-1).T  # (n, m)
        hit = torch.zeros(n, len(accepted)).index_add_(1, src, (sims >= threshold).float()) > 0  # (n, uploads)
        drawn = hit.float().mean(0) >= min_share  # (uploads,)
        sims = sims.masked_fill(~drawn[src][None, :], -1.0)
        best, row = sims.max(-1)  # (n,)
        found = best >= threshold
        for m in compat.modules:
            all_z = torch.cat([u.vectors[m] for u in accepted])  # (m, d)
            vectors[m] = torch.where(found[:, None], all_z[row], vectors[m])
        names = [f"{u.client}/slot-{u.slot}" for u in accepted]
        source = [names[int(src[r])] if f else None for r, f in zip(row, found)]
        starts = torch.tensor([0, *[u.n for u in accepted]]).cumsum(0)  # first row of each upload in ``stored``
        rows = [int(r - starts[src[r]]) if f else None for r, f in zip(row, found)]
        return Lookup(found, best, source, vectors, refused, rows)


def compat_for(editor, fingerprint: str) -> Compat:
    """What ``editor``'s vectors need of a reuser: this base, this editor and layout, these hparams, this key."""
    modules, dims, key_dim = editor.target_layout()
    body = json.dumps({"hparams": editor.hparams.model_dump(mode="json"), "key": KEY_VERSION}, sort_keys=True)
    return Compat(fingerprint, editor.name, tuple(modules), tuple(dims), key_dim, hashlib.sha256(body.encode()).hexdigest())


class MKVExchange:
    """An editor's ``TargetExchange`` on the store: lookups read the other clients' uploads; what the editor
    optimizes is held until ``upload(slot)`` writes it as this client's upload of that slot. ``refused`` and
    ``reused`` count over the exchange's life."""

    def __init__(self, client: ClientStore, compat: Compat, threshold: float, min_share: float, refine: bool = False):
        self.client, self.compat, self.threshold, self.min_share = client, compat, threshold, min_share
        self.refine = refine  # a found vector is checked on the reuser and stepped from where it falls short
        self.pending_keys: list[torch.Tensor] = []
        self.pending_z: list[torch.Tensor] = []
        self.refused: dict[str, int] = {}
        self.sources: list[str | None] = []  # per looked-up fact, in order: "client/slot-t#row" or None

    def lookup(self, keys: torch.Tensor) -> Found:
        got = self.client.lookup(keys, self.compat, self.threshold, self.min_share)
        for why, k in got.refused.items():
            self.refused[why] = self.refused.get(why, 0) + k
        self.sources += [f"{s}#{r}" if s else None for s, r in zip(got.source, got.source_row)]
        return Found(got.found, got.vectors[self.compat.modules[0]])

    def offer(self, keys: torch.Tensor, z: torch.Tensor) -> None:
        self.pending_keys.append(keys.detach().float().cpu())
        self.pending_z.append(z.detach().float().cpu())

    def take(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """What the editor offered since the last take: keys (m, d_k) and z (m, d); None if nothing."""
        if not self.pending_keys:
            return None
        keys, z = torch.cat(self.pending_keys), torch.cat(self.pending_z)
        self.pending_keys, self.pending_z = [], []
        return keys, z

    def upload_vectors(self, slot: int, keys: torch.Tensor, z: torch.Tensor) -> Path:
        return self.client.upload(slot, self.compat, keys, {self.compat.modules[0]: z})

    def upload(self, slot: int) -> Path | None:
        """This client's vectors of ``slot`` (none optimized: nothing written)."""
        offered = self.take()
        return None if offered is None else self.upload_vectors(slot, *offered)
