"""Strict hyperparameter presets: flat frozen dataclasses loaded from YAML, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kedit.core.errors import KeditError

T = TypeVar("T")

# model_type -> preset family: one YAML per family and method
FAMILIES = {
    "gpt2": "gpt2",
    "gptj": "gptj",
    "gpt_neox": "gpt_neox",
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma3_text": "gemma3",
    "gemma3": "gemma3",
}


class HparamsError(KeditError, ValueError):
    pass


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise HparamsError(f"{where}: expected a list, got {type(value).__name__}")
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise HparamsError(f"{where}: expected {hint.__name__}, got {type(value).__name__} ({value!r})")
        return value
    raise HparamsError(f"{where}: unsupported hparam type {hint!r}")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Build ``cls`` from a mapping: unknown keys, missing keys and wrong types are errors."""
    if not isinstance(data, dict):
        raise HparamsError(f"{source}: expected a mapping of hyperparameters")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise HparamsError(f"{source}: unknown key {unknown[0]!r} for {cls.__name__} (allowed: {', '.join(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in data:
            values[name] = _coerce(data[name], hints[name], f"{source}: {name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise HparamsError(f"{source}: missing key {name!r} for {cls.__name__}")
    return cls(**values)


def load_yaml(cls: type[T], path: str | Path) -> T:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HparamsError(f"{path}: no such preset file") from None
    except yaml.YAMLError as e:
        raise HparamsError(f"{path}: invalid YAML: {e}") from None
    return from_dict(cls, data or {}, str(path))


def preset_path(method_dir: Path, model_type: str) -> Path:
    family = FAMILIES.get(model_type)
    presets = method_dir / "presets"
    available = sorted(p.stem for p in presets.glob("*.yaml"))
    if family is None or not (presets / f"{family}.yaml").is_file():
        raise HparamsError(
            f"no {method_dir.name} preset for model_type {model_type!r}; presets: {', '.join(available) or 'none'}"
        )
    return presets / f"{family}.yaml"
