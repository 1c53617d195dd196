"""Reproducing a report's runs: the settings they share as TOML, and each run's --set overrides."""

from __future__ import annotations

import json
from typing import Any

from fedlora.config import _parse_value


def set_nested(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted `section.key` in a nested tree, making the sections on the way."""
    *sections, leaf = key.split(".")
    for section in sections:
        tree = tree.setdefault(section, {})
    tree[leaf] = value


def override_value(value: Any) -> str:
    """A value as `--set` reads it: bare where that reads back the same, TOML otherwise."""
    if isinstance(value, str) and _parse_value(value) == value and value.strip() == value and value:
        return value
    return toml_value(value)


def toml_value(value: Any) -> str:
    """A TOML literal for a plain value (string, number, boolean, list, table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON's escapes are valid in a TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items() if v is not None) + " }"
    raise TypeError(f"no TOML literal for {value!r}")


def _toml_key(key: str) -> str:
    return key if key and all(c.isalnum() or c in "_-" for c in key) and key.isascii() else json.dumps(key)


def config_toml(tree: dict[str, Any], _path: tuple[str, ...] = ()) -> str:
    """A config tree as TOML; None values are left out (every optional key defaults to None)."""
    lines = [f"[{'.'.join(_toml_key(p) for p in _path)}]"] if _path else []
    tables = []
    for key, value in tree.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{_toml_key(key)} = {toml_value(value)}")
    text = "\n".join(lines) + "\n" if lines else ""
    for key, value in tables:
        text += ("\n" if text else "") + config_toml(value, (*_path, key))
    return text
