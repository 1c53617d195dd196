"""Configs recorded by an earlier fedlora, read by this one: a run's config.json compared with a
config of today (resume, a sweep's finished runs) or grouped with newer runs (reports)."""

from __future__ import annotations

import copy
import json
from typing import Any

from fedlora.config import ExperimentConfig

MULTIKRUM = "multikrum"  # strategies/krum.py's name (fedlora/ does not import strategies)

# Settings that say where and how fast a run goes, not what it computes: resume may change them.
RESUME_MAY_CHANGE = (
    "output",
    "federation.ray_address",
    "federation.client_cpus",
    "federation.client_gpus",
    "federation.server_cpus",
    "federation.server_device",
    "federation.round_timeout",
)


# Of those, the ones that cannot change what a run computes: runs differing only in them are one
# experiment to a report (a round timeout changes which replies arrive, a device the numerics).
SAME_EXPERIMENT = ("output", "federation.ray_address", "federation.client_cpus", "federation.server_cpus")


def operational(dotted: str, keys: tuple[str, ...] = RESUME_MAY_CHANGE) -> bool:
    """Whether a dotted config key is one of `keys` or under one (by default: resume may change it)."""
    return any(dotted == key or dotted.startswith(key + ".") for key in keys)


def _multikrum_mean_of_old_runs(config: dict[str, Any]) -> None:
    """Multi-Krum averaged the selected updates by declared examples before `strategy.multikrum_mean`
    came (its default now the paper's plain mean); the key means nothing for other defences."""
    strategy = config.get("strategy")
    if isinstance(strategy, dict) and strategy.get("robust") == MULTIKRUM:
        strategy.setdefault("multikrum_mean", "examples")


# Keys added with a default that changes what a run computes: each fills in, where it is absent,
# the value the run had.
LEGACY_FILLS = (_multikrum_mean_of_old_runs,)


def with_defaults(started: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with the keys added since it was written filled in: at the value the run
    had (LEGACY_FILLS) or else at their defaults, which keep its behaviour; so that a newer
    fedlora resumes it, a sweep reuses it and a report groups it with newer runs of the same
    settings. As recorded if it no longer validates (a key that was removed: config_changes
    then names it)."""
    filled = copy.deepcopy(started)
    for fill in LEGACY_FILLS:
        fill(filled)
    try:
        return ExperimentConfig.model_validate_json(json.dumps(filled)).model_dump(mode="json")
    except ValueError:
        return started


def config_changes(started: dict[str, Any], now: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs (JSON form), operational keys aside."""
    changed = []
    for key in sorted(set(started) | set(now)):
        dotted = f"{prefix}{key}"
        if operational(dotted):
            continue
        before, after = started.get(key), now.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            changed += config_changes(before, after, dotted + ".")
        elif before != after:
            changed.append(dotted)
    return changed
