"""One strict loader for every configuration file kedit reads (editor hparams, gates).

A configuration is a frozen pydantic model with ``extra="forbid"`` and strict types: an unknown
key, a missing key or a value of the wrong type is an error that names the file and the dotted
key (``data/gates/x.yaml: gates[2].max: expected a number, got 'high'``). YAML lists become tuples
(``Seq``) so that configurations stay hashable and immutable.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kedit.core.errors import KeditError

T = TypeVar("T")
C = TypeVar("C", bound="StrictConfig")

# A YAML list read as a tuple: the container is coerced, its items stay strict.
Seq = Annotated[tuple[T, ...], Field(strict=False)]


class ConfigError(KeditError, ValueError):
    """A configuration file or mapping is invalid; the message names the source and the key."""


class StrictConfig(BaseModel):
    """Base of every configuration section: unknown keys and loose types are errors, instances are frozen."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _where(loc: tuple, at: str = "") -> str:
    out = at
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def _describe(err: dict, fields: str, at: str = "") -> str:
    where = _where(err["loc"], at)
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{where}: unknown key{fields}"
    if kind == "missing":
        return f"{where}: missing key"
    return f"{where}: {err['msg'].lower()}, got {err.get('input')!r}"


def from_mapping(cls: type[C], data: Any, source: str = "<dict>", at: str = "") -> C:
    """Build ``cls`` from a mapping; every problem is reported with ``source`` and the dotted key.

    ``at`` is where the mapping sits in its file (``gates[2]``), for a section validated on its own."""
    if not isinstance(data, Mapping):
        where = f"{at}: " if at else ""
        raise ConfigError(f"{source}: {where}expected a mapping for {cls.__name__}, got {type(data).__name__}")
    try:
        return cls.model_validate(dict(data))
    except ValidationError as e:
        errors = e.errors(include_url=False)
        allowed = f" (allowed{'' if at else ' at the top'}: {', '.join(cls.model_fields)})"
        first = _describe(errors[0], allowed if len(errors[0]["loc"]) == 1 else "", at)
        more = f" (and {len(errors) - 1} more: {'; '.join(_describe(x, '', at) for x in errors[1:3])})" if len(errors) > 1 else ""
        raise ConfigError(f"{source}: {first}{more}") from None


def read_yaml(path: str | Path) -> Any:
    """A YAML file's content, with file-named errors for a missing file or invalid YAML."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None


def load_yaml(cls: type[C], path: str | Path, overrides: Mapping[str, Any] | None = None) -> C:
    """Read ``path`` strictly into ``cls``, then apply dotted ``overrides`` (validated the same way)."""
    data = read_yaml(path) or {}
    cfg = from_mapping(cls, data, str(path))
    return with_overrides(cfg, overrides, f"{path} + overrides") if overrides else cfg


def with_overrides(cfg: C, overrides: Mapping[str, Any], source: str = "<overrides>") -> C:
    """A copy of ``cfg`` with dotted keys replaced (``targets.steps=10``); the result is validated again."""
    data = cfg.model_dump()
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for i, part in enumerate(parents):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"{source}: {'.'.join(parents[: i + 1])!s} is not a section of {type(cfg).__name__}")
            node = node[part]
        if leaf not in node:
            raise ConfigError(f"{source}: unknown key {key!r} for {type(cfg).__name__} (keys: {', '.join(flatten(cfg))})")
        node[leaf] = _merged(node[leaf], value)
    return from_mapping(type(cfg), data, source)


def _merged(old: Any, new: Any) -> Any:
    """A section given whole keeps the keys it does not name (``targets={steps: 5}`` changes steps only)."""
    if isinstance(old, dict) and isinstance(new, Mapping):
        return {**old, **{k: _merged(old.get(k), v) for k, v in new.items()}}
    return new


def flatten(cfg: StrictConfig) -> dict[str, Any]:
    """Dotted keys to leaf values, for run parameters and manifests: ``{"targets.steps": 20, ...}``."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = list(value) if isinstance(value, tuple) else value

    walk("", cfg.model_dump())
    return out
