"""Every config key with its type, default and doc, read from the dataclasses themselves
(`python -m pretrain config --help`), and what a config changes from the defaults
(`python -m pretrain config CONFIG --diff`).

A field's doc is the string literal under it in `schema.py`; a test makes sure every field
has one, so this reference never needs a second list.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal, Union

import yaml

from pretrain.config.loading import load_config
from pretrain.config.schema import Config, to_dict


@dataclass(frozen=True)
class Key:
    name: str
    """Dotted, as in an override: model.sharing.strategy."""
    type: str
    default: Any
    doc: str
    bounds: str = ""


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal that follows the field in the class body."""
    body = ast.parse(inspect.cleandoc(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if args[-1] is Ellipsis:
            return f"list of {type_name(args[0])}"
        return f"list of {len(args)} {type_name(args[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def config_keys(cls: type = Config, prefix: str = "") -> Iterator[Key]:
    """Every leaf key of `cls`, in the order of the dataclasses."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from config_keys(tp, f"{prefix}{f.name}.")
            continue
        bounds = f.metadata.get("bounds")
        yield Key(
            name=prefix + f.name,
            type=type_name(tp),
            default=_default(f),
            doc=docs.get(f.name, ""),
            bounds=str(bounds) if bounds is not None else "",
        )


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _sections(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """Dotted section -> its class doc."""
    out = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            doc = inspect.getdoc(tp) or ""
            out[prefix + f.name] = doc.split("\n\n")[0].replace("\n", " ")
            out |= _sections(tp, f"{prefix}{f.name}.")
    return out


def help_text() -> str:
    """The reference: per section, each key as `name: type = default`, then its doc."""
    sections = _sections()
    lines = [
        "Config keys (YAML sections, or --section.key=value on the command line).",
        "null defaults take the family's value where the doc says so.",
    ]
    current = None
    for key in config_keys():
        section = key.name.rsplit(".", 1)[0]
        if section != current:
            current = section
            lines += ["", f"{section}: {sections.get(section, '')}".rstrip()]
        bounds = f"  ({key.bounds})" if key.bounds else ""
        lines.append(f"  {key.name}: {key.type} = {_shown(key.default)}{bounds}")
        lines += [f"      {line}" for line in key.doc.splitlines()]
    return "\n".join(lines) + "\n"


REFERENCE_PAGE = "docs/config.md"


def markdown() -> str:
    """The reference as the Markdown page REFERENCE_PAGE: a table per section. A test
    compares the page with this, so the page cannot fall behind the dataclasses."""
    sections = _sections()
    lines = [
        "# Config reference",
        "",
        "Generated from the config dataclasses (`pretrain/config/schema.py`) by",
        f"`python -m pretrain config --markdown > {REFERENCE_PAGE}`; do not edit by hand.",
        "Every key is a YAML key under its section, or a dotted override on the command",
        "line (`--optim.lr=1e-3`); an unknown key is an error naming the closest one. A null",
        "default takes the family's value where the doc says so.",
    ]
    current = None
    for key in config_keys():
        section = key.name.rsplit(".", 1)[0]
        if section != current:
            current = section
            lines += ["", f"## {section}", ""]
            if sections.get(section):
                lines += [sections[section], ""]
            lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        bounds = f" ({key.bounds})" if key.bounds else ""
        doc = " ".join(key.doc.split()).replace("|", "\\|")
        kind = key.type.replace("|", "\\|")
        default = _shown(key.default).replace("|", "\\|")
        lines.append(f"| `{key.name}` | {kind}{bounds} | `{default}` | {doc} |")
    return "\n".join(lines) + "\n"


def flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config tree as dotted keys: {"optim": {"lr": 1}} -> {"optim.lr": 1}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out |= flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def diff(cfg: Config) -> list[tuple[str, Any, Any]]:
    """(key, value, default) of every key where `cfg` differs from the defaults. A key whose
    default is null (derived: the family's norm_eps, num_kv_heads = num_heads) is compared
    with what it derives to in `cfg`, so only what was set shows."""
    m = cfg.model
    derived = load_config(None, {"model.family": m.family, "model.num_heads": m.num_heads})
    derived_defaults = flat(to_dict(derived))
    defaults = {
        key.name: derived_defaults[key.name] if key.default is None else key.default
        for key in config_keys()
    }
    values = flat(to_dict(cfg))
    return [(k, v, defaults[k]) for k, v in values.items() if _plain(v) != _plain(defaults[k])]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def diff_text(cfg: Config) -> str:
    rows = diff(cfg)
    if not rows:
        return "# every key is at its default\n"
    width = max(len(k) for k, _, _ in rows)
    return "".join(
        f"{k + ':':<{width + 1}} {_shown(v)}  # default: {_shown(d)}\n" for k, v, d in rows
    )
