"""Config dataclasses: strict loading from dicts and JSON, saving beside checkpoints, presets.

Every config in Polychrome is a dataclass deriving from :class:`Config`. Loading is strict: an
unknown key, a missing required key or a value of the wrong type raises :class:`ConfigError` naming
the file, the dotted field path, what was expected and what was received. Nested dataclass fields
are built recursively, so a preset is one JSON object whose sub-objects are sub-configs (like
``LlavaConfig.sub_configs``). ``__post_init__`` of each subclass validates value ranges.

Presets live in ``configs/<name>.json`` at the repository root (``list_presets()``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, Self, TypeVar

from core.io import atomic_write_text

__all__ = [
    "Config",
    "ConfigError",
    "config_from_dict",
    "list_presets",
    "load_preset_dict",
    "preset_path",
    "project_path",
]

C = TypeVar("C")

# configs/ sits beside the packages at the repository root; POLYCHROME_CONFIG_DIR overrides it
# (a user's own presets).
_DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or dict does not match its dataclass."""


@dataclasses.dataclass
class Config:
    """Base class: strict from_dict/to_dict and JSON load/save for nested dataclass configs."""

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "<dict>") -> Self:
        return config_from_dict(cls, data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Self:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        return config_from_dict(cls, data, source=str(path))

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def replace(self, **changes: Any) -> Self:
        """A copy with some fields changed; validation runs again."""
        return dataclasses.replace(self, **changes)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check `value` against the annotation `tp`, building nested configs; raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            f"{source}: field '{where}' expected {_type_name(tp)}, received {value!r}"
        )
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(
                f"{source}: field '{where}' expected one of {list(args)}, received {value!r}"
            )
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"{source}: field '{where}' expected a list, received {type(value).__name__} "
                f"{value!r}"
            )
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(
                    f"{source}: field '{where}' expected {len(args)} items, received {len(value)}"
                )
            return tuple(
                _convert(v, a, f"{where}[{i}]", source)
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source}: field '{where}' expected an object, received {type(value).__name__}"
            )
        val_tp = args[1] if args else Any
        return {str(k): _convert(v, val_tp, f"{where}.{k}", source) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(
                f"{source}: field '{where}' expected an object for {tp.__name__}, received "
                f"{type(value).__name__} {value!r}"
            )
        return config_from_dict(tp, value, source=source, prefix=f"{where}.")
    if tp is float:
        # JSON has no int/float distinction; accept ints for float fields, never bools.
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(
        f"{source}: field '{where}' expected {_type_name(tp)}, received "
        f"{type(value).__name__} {value!r}"
    )


def config_from_dict(
    cls: type[C], data: dict[str, Any], *, source: str = "<dict>", prefix: str = ""
) -> C:
    """Build dataclass `cls` from `data` strictly: unknown keys, missing keys and types checked."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: expected an object for {cls.__name__}, received {type(data).__name__}"
        )
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{source}: unknown field(s) {[prefix + k for k in unknown]} for {cls.__name__}; "
            f"valid fields: {sorted(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name not in data:
            required = (
                field.default is dataclasses.MISSING
                and field.default_factory is dataclasses.MISSING
            )
            if required:
                raise ConfigError(f"{source}: missing required field '{prefix}{name}'")
            continue
        kwargs[name] = _convert(data[name], hints[name], prefix + name, source)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(
            f"{source}: invalid {cls.__name__} ({prefix or 'top level'}): {err}"
        ) from None


def project_path(path: str | os.PathLike[str]) -> Path:
    """A path from a preset: relative paths are relative to the repository root, not the CWD."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else _DEFAULT_CONFIG_DIR.parent / path


def _config_dir() -> Path:
    return Path(os.environ.get("POLYCHROME_CONFIG_DIR", _DEFAULT_CONFIG_DIR))


def list_presets() -> list[str]:
    """Names of the presets in the config dir (configs/*.json)."""
    return sorted(p.stem for p in _config_dir().glob("*.json"))


def preset_path(name: str) -> Path:
    """The JSON file of preset `name`; ValueError listing the valid names if unknown."""
    path = _config_dir() / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown preset {name!r}; valid presets: {list_presets()}")
    return path


def load_preset_dict(name: str) -> dict[str, Any]:
    """The raw JSON object of preset `name` (build it into a dataclass with config_from_dict)."""
    path = preset_path(name)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, received {type(data).__name__}")
    return data
