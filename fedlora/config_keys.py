"""Every config key with its type, default and description, generated from the config models.

`fedlora config keys` prints this; the descriptions are the models' `Field(description=...)`, so
the list is never kept by hand and cannot drift from what the config accepts.
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from fedlora.config import ExperimentConfig
from fedlora.report.reproduce import toml_value

_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


@dataclass(frozen=True)
class KeyDoc:
    """One config key as the user writes it (`section.key`), its TOML type, default and meaning."""

    key: str
    type: str
    default: str
    description: str


def config_keys(model: type[BaseModel] = ExperimentConfig, prefix: str = "") -> list[KeyDoc]:
    """Every leaf key of the config, section by section, in the order the models declare them."""
    keys: list[KeyDoc] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys.extend(config_keys(annotation, f"{prefix}{name}."))
            continue
        kind = type_name(annotation) + bounds_text(field)
        keys.append(KeyDoc(f"{prefix}{name}", kind, default_text(field), field.description or ""))
    return keys


def type_name(annotation: Any) -> str:
    """A key's type in TOML's words: integer, number, string, boolean, a list, a table, the allowed values."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(toml_value(value) for value in args)
    if origin in (types.UnionType, typing.Union):
        members = [type_name(arg) for arg in args if arg is not type(None)]
        return " or ".join(members) + (" (or unset)" if type(None) in args else "")
    if origin is list:
        return f"list of {type_name(args[0])}"
    if origin is dict:
        return f"table of {type_name(args[1])}"
    return _TYPE_NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


_BOUNDS = ((annotated_types.Ge, "ge", "at least"), (annotated_types.Gt, "gt", "above"))
_BOUNDS += ((annotated_types.Le, "le", "at most"), (annotated_types.Lt, "lt", "below"))


def bounds_text(field: FieldInfo) -> str:
    """The range a number must lie in (", at least 1, at most 100000"), or "" where any will do."""
    words = [
        f", {word} {toml_value(getattr(bound, attribute))}"
        for bound in field.metadata
        for kind, attribute, word in _BOUNDS
        if isinstance(bound, kind)
    ]
    return "".join(words)


def default_text(field: FieldInfo) -> str:
    """The default as TOML writes it; "unset" where there is none to write."""
    default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if default is None or default is PydanticUndefined:
        return "unset"
    return toml_value(default)
