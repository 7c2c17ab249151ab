"""Reading a run configuration: YAML files and dotted command-line overrides into `Config`.

Files are YAML mappings with the same nesting as the dataclasses of
`pretrain.config.schema`; the command line overrides any leaf with `--section.key=value`.
Unknown keys and wrong types are errors that name the key and the closest valid one.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from pretrain.config.schema import Config, ConfigError
from pretrain.errors import did_you_mean


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    if tp in names:
        return names[tp]
    if tp is type(None):
        return "null"
    if origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return f"a list of {_type_name(args[0]).removeprefix('an ').removeprefix('a ')}s"
        return f"a list of {len(args)} numbers"
    return getattr(tp, "__name__", str(tp))


_SCALARS: dict[Any, typing.Callable[[Any], bool]] = {
    type(None): lambda v: v is None,
    bool: lambda v: isinstance(v, bool),
    int: lambda v: isinstance(v, int) and not isinstance(v, bool),
    float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    str: lambda v: isinstance(v, str),
}


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, list ->
    tuple) or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _convert(value, option, key)
            except ConfigError:
                continue
    elif origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and type(value) is type(choices[0]):
            return value
        hint = did_you_mean(value, [str(c) for c in choices]) if isinstance(value, str) else ""
        raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}{hint}")
    elif origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis and isinstance(value, (list, tuple)):  # tuple[X, ...]
            args = (args[0],) * len(value)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(
                _convert(v, a, f"{key}[{i}]")
                for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
    elif dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    elif tp in _SCALARS and _SCALARS[tp](value):
        return float(value) if tp is float else value
    elif tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; for a float key it means the number.
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types are ConfigErrors."""
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key {dotted!r}{did_you_mean(str(key), names)};"
                f" valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------
# Files and overrides.


def _parse_scalar(text: str) -> Any:
    """Command-line values are YAML scalars: 24, 1e-4, true, null, [0.9, 0.98], cycle."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(args: typing.Sequence[str]) -> dict[str, Any]:
    """`--model.num_layers=24` or `--model.num_layers 24` -> {"model.num_layers": 24}."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(
                f"unexpected argument {arg!r}; overrides look like --model.num_layers=24"
            )
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise ConfigError(f"override {arg!r} has no value; write {arg}=VALUE")
        out[key] = _parse_scalar(text)
        i += 1
    return out


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set `a.b.c` in a nested dict, checking each part against the Config dataclasses so
    that a typo names the closest valid key."""
    parts = key.split(".")
    node, cls = tree, Config
    for depth, part in enumerate(parts):
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(parts[:depth])
        if part not in names:
            raise ConfigError(
                f"unknown config key {key!r}{did_you_mean(part, names)};"
                f" valid keys{' in ' + prefix if prefix else ''}: {', '.join(names)}"
            )
        field_type = typing.get_type_hints(cls)[part]
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(field_type):
                raise ConfigError(
                    f"{key!r} is a section; override one of its keys, e.g. --{key}.KEY=VALUE"
                )
            node[part] = value
            return
        if not dataclasses.is_dataclass(field_type):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])!r} is a value, not a section")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[: depth + 1])}: expected a mapping of keys")
        cls = field_type


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
    return data


def load_config(
    path: str | Path | None = None,
    overrides: typing.Sequence[str] | dict[str, Any] = (),
) -> Config:
    """Load a YAML config and apply dotted overrides (a list of `--a.b=v` or a dict)."""
    tree = load_yaml(path) if path is not None else {}
    if not isinstance(overrides, dict):
        overrides = parse_overrides(overrides)
    for key, value in overrides.items():
        _set_dotted(tree, key, value)
    return from_dict(Config, tree)
