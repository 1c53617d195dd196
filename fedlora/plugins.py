"""Strategies, defences and attacks from outside the package: an import path or an entry point.

A config names an outside object in one of two ways (docs/extending.md):

- an import path, "package.module:Name" (a colon marks it): the module is imported and `Name`
  taken from it; for a quick experiment, a module on PYTHONPATH;
- an entry point of an installed package, by its name, in the group of its kind
  (`GROUPS`: fedlora.strategies, fedlora.defences, fedlora.attacks); built-in names win.

The module must be importable wherever the object is used. Strategies, defences and attacks
run in the ServerApp only (clients never import strategies), so in a simulation that is the
process that runs `fedlora simulate`; Ray's client actors inherit its environment
(PYTHONPATH), so a module on PYTHONPATH or an installed package serves both.

Every failure is a `PluginError` (a ValueError) with one line that names the config key, what
was asked and what to do; the registries turn it into a ConfigError.
"""

from __future__ import annotations

import importlib
import re
from importlib.metadata import entry_points

GROUPS = {"strategy.name": "fedlora.strategies", "strategy.robust": "fedlora.defences", "attack.name": "fedlora.attacks"}
SEPARATOR = ":"
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", re.ASCII)


class PluginError(ValueError):
    """An outside strategy, defence or attack that cannot be had; the message says why and what to do."""


def is_import_path(name: str) -> bool:
    """Whether a config value names an object by import path ("package.module:Name")."""
    return SEPARATOR in name


def load_plugin(key: str, name: str) -> object | None:
    """The object `name` refers to for config key `key` (one of GROUPS): by import path, or as
    an entry point of the key's group; None when it is neither (an unknown name)."""
    if is_import_path(name):
        return import_object(key, name)
    group = GROUPS[key]
    found = {entry.value: entry for entry in entry_points(group=group, name=name)}
    if not found:
        return None
    if len(found) > 1:
        raise PluginError(
            f"{key}: {name!r} is registered in {group} by more than one package ({', '.join(sorted(found))}); "
            "name one of them by import path instead"
        )
    (entry,) = found.values()
    try:
        return entry.load()
    except Exception as err:  # the package's own import failed: its reason, in one line
        raise PluginError(
            f"{key}: the entry point {name!r} of {group} ({entry.value}) cannot be loaded: {_reason(err)}"
        ) from None


def import_object(key: str, path: str) -> object:
    """`module:attribute` imported; a PluginError naming the key and the cause otherwise."""
    module_name, _, attribute = path.partition(SEPARATOR)
    if not (_DOTTED.fullmatch(module_name) and _DOTTED.fullmatch(attribute)):
        raise PluginError(f"{key}: {path!r} is not an import path; write package.module:Name (e.g. my_strategies:MyFedIT)")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and (module_name == err.name or module_name.startswith(err.name + ".")):
            raise PluginError(
                f"{key}: no module named {err.name!r} (from {path!r}); install its package or put its folder on PYTHONPATH"
            ) from None
        raise PluginError(f"{key}: importing {module_name!r} failed: {_reason(err)}") from None
    except Exception as err:  # the module's own code failed (a syntax error, a missing dependency of its own)
        raise PluginError(f"{key}: importing {module_name!r} failed: {_reason(err)}") from None
    found: object = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise PluginError(
                f"{key}: module {module_name!r} has no {attribute!r} (from {path!r}); check the name after the colon"
            )
        found = getattr(found, part)
    return found


def plugin_class(key: str, name: str, base: type) -> type | None:
    """The outside class `name` refers to, checked to subclass `base`; None for an unknown name."""
    found = load_plugin(key, name)
    if found is None:
        return None
    if not (isinstance(found, type) and issubclass(found, base)):
        raise PluginError(
            f"{key}: {name!r} is {_kind(found)}, not a subclass of {base.__module__}.{base.__qualname__}; see docs/extending.md"
        )
    return found


def _kind(found: object) -> str:
    return f"the class {found.__qualname__}" if isinstance(found, type) else f"a {type(found).__name__}"


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__
