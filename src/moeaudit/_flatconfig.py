"""The machinery of moeaudit's flat configurations (:class:`moeaudit.RunConfig`, the pruning configs): a frozen
dataclass per tool, built from defaults, a preset, a TOML file and flags through one constructor, values coerced
from the forms files and flags produce according to the fields' type hints, every bad value refused naming its key
(as ``key=value``, which the command line rewrites into its flags)."""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar

from moeaudit.errors import ConfigError, did_you_mean

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class FlatConfig:
    """Base of moeaudit's frozen, flat configurations (:class:`RunConfig`, the pruning configs).

    A subclass is a frozen dataclass; it lists its presets in ``_PRESETS`` and validates itself in ``_check``. Values
    are coerced from the forms files and flags produce according to the fields' type hints (``"0,4,7"`` or a list for
    a tuple, ``"12"`` for an int, ``fp16`` for ``float16``), so every source is refused the same way, naming the key.
    """

    _PRESETS: ClassVar[Mapping[str, Any]] = MappingProxyType({})

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self._check()

    def _check(self) -> None:
        """Validate the coerced values (subclasses raise :class:`ConfigError`)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (tuples as lists), every key present."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_toml(self) -> str:
        """A TOML file that :meth:`from_toml` reads back to an equal config (unset optional keys are omitted)."""
        lines = []
        for key, value in self.to_dict().items():
            if value is not None:
                lines.append(f"{key} = {_toml_value(value)}")
        return "\n".join(lines) + "\n"

    def replace(self, **changes: Any):
        """A copy with ``changes`` applied (validated like any other source)."""
        return type(self).from_mapping(changes, base=self)

    @classmethod
    def preset(cls, name: str):
        """The named preset of this configuration class."""
        if name not in cls._PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid: {', '.join(cls._PRESETS)}."
                              f"{did_you_mean(name, cls._PRESETS)}")
        return cls._PRESETS[name]

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], *, base=None, source: str = "config"):
        """Build from ``values`` on top of ``base`` (or the defaults); a ``preset`` key names the base.

        Raises:
            ConfigError: An unknown key (the message lists the valid keys) or a bad value.
        """
        values = dict(values)
        valid = [f.name for f in dataclasses.fields(cls)]
        from_file = source not in ("config", "flags")
        if "trust_remote_code" not in valid or from_file:
            if values.get("trust_remote_code", False) is not False:
                where = "a configuration file" if from_file else "a run configuration"
                raise ConfigError(f"{source}: trust_remote_code cannot be set in {where}: it runs code shipped with "
                                  "the checkpoint, so only the caller may enable it, per call: the command-line "
                                  "flag --trust-remote-code, or run_audit(..., trust_remote_code=True).",
                                  source=source if from_file else None)
            if "trust_remote_code" not in valid:
                values.pop("trust_remote_code", None)  # false, as earlier versions wrote it: asks for nothing
        preset_name = values.pop("preset", None)
        if preset_name is not None:
            if base is not None:
                raise ConfigError(f"{source}: 'preset' cannot be combined with another base configuration.",
                                  source=source if from_file else None)
            base = cls.preset(preset_name)
        for key in values:
            if key not in valid:
                raise ConfigError(f"{source}: unknown key {key!r}.{did_you_mean(key, valid)} Valid keys: "
                                  f"preset, {', '.join(valid)}.", source=source if from_file else None)
        merged = (base or cls()).to_dict()
        if "model" in values and "name" in merged and "name" not in values and values["model"] != merged["model"]:
            merged["name"] = None  # a preset's or file's label names its own model, not the one given here
        merged.update(values)
        if not from_file:
            return cls(**merged)
        try:
            return cls(**merged)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}", source=source) from None

    @classmethod
    def from_toml(cls, path: str | Path, *, base=None):
        """Read a flat TOML file (see the module docstring)."""
        path = Path(path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"config file {str(path)!r} {what}; pass a .toml file or a preset name "
                              f"({', '.join(cls._PRESETS)}).")
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{str(path)!r} is not valid TOML ({exc}); fix it or pass another file.",
                              source=str(path)) from None
        nested = [k for k, v in values.items() if isinstance(v, dict)]
        if nested:
            raise ConfigError(f"{str(path)!r}: tables {nested} are not supported; write every key at the top "
                              "level.", source=str(path))
        return cls.from_mapping(values, base=base, source=repr(str(path)))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split(hint: Any) -> tuple[Any, bool]:
    """``(type without None, whether None is allowed)`` of a field's type hint."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


_ARTICLES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _scalar(key: str, value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (bool, int, float, str); digit strings from flags become numbers."""
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    if kind in (int, float) and isinstance(value, str):
        try:
            return kind(value.strip())
        except ValueError:
            pass
    if kind not in _ARTICLES:
        return value
    raise ConfigError(f"{key}={value!r} must be {_ARTICLES[kind]}.")


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Normalise the forms files and flags produce (``"0,4,7"`` / lists for tuples, ``fp16`` for ``float16``),
    following the field's type hint; ``None`` (and ``"all"`` for optional tuples) means unset; an empty string is an
    empty list (which each configuration refuses where a list may not be empty, like any empty list)."""
    kind, nullable = _split(hint)
    if typing.get_origin(kind) is tuple:
        element = typing.get_args(kind)[0]
        if value is None or (nullable and value == "all"):
            return None if nullable else ()
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list (or a comma-separated string).")
        if element is str:
            return tuple(str(v) for v in value)
        try:
            if any(isinstance(v, bool) for v in value):
                raise TypeError
            return tuple(element(v) for v in value)
        except (TypeError, ValueError):
            plural = "integers" if element is int else "numbers"
            raise ConfigError(f"{key}={','.join(map(str, value))} must be {plural} (e.g. {key}="
                              f"{'0,4,7' if element is int else '0.125,0.25'}).") from None
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{key}=None: it must be {_ARTICLES.get(kind, 'set')}.")
    if key == "dtype" and isinstance(value, str):
        return _DTYPE_ALIASES.get(value.lower(), value.lower())
    return _scalar(key, value, kind)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'
