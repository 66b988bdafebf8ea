"""Typed dataclass configs from TOML, with ``--set section.key=value`` overrides, and back to TOML.

A config is a dataclass whose fields are section dataclasses; each section's fields carry type hints
(``int``, ``float``, ``str``, ``bool``, ``X | None``, ``tuple[int, ...]``, ``tuple[int, int, int]``,
nested tuples). Values are checked against the hints, so a wrong type or an unknown key fails with a
message naming the key, before anything runs.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path


class ConfigError(ValueError):
    """A config file, key or value that cannot be used (the message names it)."""


def load_config(config_type: type, path: Path | str | None = None, overrides: Sequence[str] = ()):
    """``config_type`` from the TOML file at ``path`` (optional) with ``section.key=value`` overrides."""
    values: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"{path}: not valid TOML ({error})") from None
    for override in overrides:
        key, value = parse_override(override)
        section, _, name = key.partition(".")
        _check_key(config_type, section, name, f"--set {override}")
        if not isinstance(values.setdefault(section, {}), dict):
            raise ConfigError(f"{source}: {section!r} must be a section ([{section}])")
        values[section][name] = value
    return from_dict(config_type, values, source)


def parse_override(text: str) -> tuple[str, object]:
    """``"train.steps=100"`` -> ``("train.steps", 100)``; the value is read as TOML, else as a string."""
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or key.count(".") != 1 or not all(key.split(".")):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. train.steps=100")
    try:
        value = tomllib.loads(f"value = {raw.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare string such as a path
    return key, value


def _check_key(config_type: type, section: str, name: str, source: str) -> None:
    sections = {f.name: f for f in dataclasses.fields(config_type)}
    if section not in sections:
        raise ConfigError(f"{source}: unknown section {section!r}; sections: {', '.join(sections)}")
    keys = sorted(f.name for f in dataclasses.fields(typing.get_type_hints(config_type)[section]))
    if name not in keys:
        raise ConfigError(f"{source}: unknown key {section}.{name}; {section} keys: {', '.join(keys)}")


def from_dict(config_type: type, values: Mapping, source: str = "config"):
    """Build the config dataclass from ``{section: {key: value}}``, checking every key and type."""
    sections = {f.name: f for f in dataclasses.fields(config_type)}
    unknown = sorted(set(values) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}; sections: {', '.join(sections)}")
    built = {}
    for name in sections:
        section_type = typing.get_type_hints(config_type)[name]
        section_values = values.get(name, {})
        if not isinstance(section_values, Mapping):
            raise ConfigError(f"{source}: {name!r} must be a section ([{name}]), got {section_values!r}")
        built[name] = _build_section(section_type, section_values, name, source)
    return config_type(**built)


def _build_section(section_type: type, values: Mapping, section: str, source: str):
    hints = typing.get_type_hints(section_type)
    fields = {f.name for f in dataclasses.fields(section_type)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key {section}.{unknown[0]}; {section} keys: {', '.join(sorted(fields))}")
    checked = {key: check_value(f"{section}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return section_type(**checked)
    except TypeError as error:  # a required key without a default
        raise ConfigError(f"{source}: section [{section}]: {error}") from None
    except ValueError as error:  # the section's own validation; its message names the key
        message = str(error)
        raise ConfigError(message if message.startswith(section) else f"{section}: {message}") from None


def check_value(key: str, value, hint):
    """``value`` converted to the type ``hint`` describes (lists become tuples), or ``ConfigError``."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in arguments:
            return None
        errors = []
        for option in (a for a in arguments if a is not type(None)):
            try:
                return check_value(key, value, option)
            except ConfigError as error:
                errors.append(error)
        raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected {_describe(hint)}, got {value!r}")
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return tuple(check_value(f"{key}[{i}]", item, arguments[0]) for i, item in enumerate(value))
        if len(value) != len(arguments):
            raise ConfigError(f"{key}: expected {len(arguments)} values ({_describe(hint)}), got {value!r}")
        pairs = enumerate(zip(value, arguments, strict=True))
        return tuple(check_value(f"{key}[{i}]", item, option) for i, (item, option) in pairs)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported config type {hint!r}")  # a programming error, not a user error


def _describe(hint) -> str:
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("nothing" if a is type(None) else _describe(a) for a in arguments)
    if origin is tuple:
        if len(arguments) == 2 and arguments[1] is Ellipsis:
            return f"a list of {_describe(arguments[0])}"
        return f"[{', '.join(_describe(a) for a in arguments)}]"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def to_dict(config) -> dict:
    """``{section: {key: value}}`` with tuples as lists (JSON/TOML/W&B friendly)."""
    return {
        section.name: {key: _plain(value) for key, value in dataclasses.asdict(getattr(config, section.name)).items()}
        for section in dataclasses.fields(config)
    }


def _plain(value):
    return [_plain(item) for item in value] if isinstance(value, list | tuple) else value


def to_toml(config) -> str:
    """The config as TOML that ``load_config`` reads back to an equal config (``None`` values are left
    out, which is why every field that may be ``None`` defaults to ``None``)."""
    lines: list[str] = []
    for section, values in to_dict(config).items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
