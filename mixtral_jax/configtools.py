"""YAML run configs with dotted `key=value` overrides, read into typed dataclasses.

Every section of a run config is a dataclass; `build` checks each key
against its fields and each value against its annotation, so a typo or a
wrong type is one clear error naming the dotted key, before anything compiles.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import numbers
import pathlib
import types
import typing
from typing import Any, Literal, Union

import yaml

CONFIG_DIR = importlib.resources.files("mixtral_jax.configs")  # the repo's configs/ folder


class UserError(Exception):
    """Bad input from the user: the CLI prints the message on one line and exits non-zero."""


def is_integer(value) -> bool:
    """Whether `value` is an integer, Python's or numpy's, and not a bool (which Python counts as one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def require_positive(values: dict[str, int]) -> None:
    """Raises UserError naming the first option of {name: value} whose value is not positive."""
    for name, value in values.items():
        if value <= 0:
            raise UserError(f"{name} must be positive, got {value}")


def find_config(name_or_path: str) -> pathlib.Path:
    """A YAML path as given, or a name from the bundled configs/ ("tiny", "configs/tiny.yaml").

    Only a bare name (or one under configs/) falls back to the bundled configs:
    a path into any other folder that does not exist is an error, not the
    bundled config of the same file name.
    """
    path = pathlib.Path(name_or_path)
    if path.is_file():
        return path
    if path.is_dir():
        raise UserError(f"config {name_or_path!r} is a directory, not a YAML file")
    bundled = CONFIG_DIR / (path.name if path.suffix else f"{path.name}.yaml")
    if path.parent in (pathlib.Path("."), pathlib.Path("configs")) and bundled.is_file():
        return pathlib.Path(str(bundled))
    known = ", ".join(sorted(p.name[:-5] for p in CONFIG_DIR.iterdir() if p.name.endswith(".yaml")))
    raise UserError(f"config {name_or_path!r} not found (bundled configs: {known})")


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """["train.steps=3", "mesh.expert=8"] -> {"train": {"steps": 3}, "mesh": {"expert": 8}}."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override {item!r} is not of the form dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override {item!r} sets a key inside a value")
        node[leaf] = value
    return tree


def field_paths(cls, name: str, prefix: str = "") -> list[str]:
    """The dotted keys of the fields called `name` in dataclass `cls` and the dataclasses its
    fields hold (an optional one included): field_paths(RunConfig, "steps") == ["train.steps"]."""
    paths = []
    for field, hint in typing.get_type_hints(cls).items():
        key = f"{prefix}{field}"
        if field == name:
            paths.append(key)
        for nested in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(nested):
                paths += field_paths(nested, name, f"{key}.")
    return paths


def merge(base: dict, update: dict) -> dict:
    """Deep-merges `update` into a copy of `base`."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load(name_or_path: str | None, overrides: list[str] = ()) -> dict[str, Any]:
    """The config file (or {} for None) with the overrides applied, as a plain dict."""
    data: dict[str, Any] = {}
    if name_or_path is not None:
        data = read_mapping(find_config(name_or_path))
    return merge(data, parse_overrides(list(overrides)))


def read_mapping(path: pathlib.Path) -> dict[str, Any]:
    """A YAML file of sections as a dict ({} when empty); UserError, one line, when it cannot be
    read, is not UTF-8 text or not YAML, or holds something other than a mapping."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a YAML file (its bytes are not UTF-8 text)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a mapping of sections")
    return data


def build(cls, data: dict[str, Any] | None, where: str = ""):
    """Constructs dataclass `cls` from a dict, checking keys and value types recursively."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{where}." if where else ""
        raise UserError(f"unknown key {name}{unknown[0]}; known keys here: {', '.join(fields)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(hints[name], value, key)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        message = str(err)  # the checks name their dotted key ("train.lr must ..."): no second prefix
        raise UserError(message if where and message.startswith(f"{where}.") else f"{where or 'config'}: {message}") from None


def _coerce(hint, value, key: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(option, value, key)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0])
    if origin is Literal:
        if value not in typing.get_args(hint):
            raise UserError(f"{key} must be one of {list(typing.get_args(hint))}, got {value!r}")
        return value
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float:
        return _finite_float(value, key)
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(hint, type) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"{key} must be {getattr(hint, '__name__', hint)}, got {value!r}")


def _finite_float(value, key: str) -> float:
    """A finite float from a YAML number or numeric string (YAML reads 1e-3, no dot, as a
    string); UserError otherwise: inf and nan pass no check below them."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise UserError(f"{key} must be float, got {value!r}")
    if not math.isfinite(number):
        raise UserError(f"{key} must be a finite number, got {value!r}")
    return number


def to_dict(obj) -> Any:
    """A dataclass tree as plain dicts/lists (for writing the resolved config.yaml)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj
