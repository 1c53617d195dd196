"""The checkpoint of a run, and the contract a resume must keep.

<run_dir>/checkpoint.pt holds what a run needs to go on after its last finished round: the
global state, the resolved config it was started with, the server's privacy accounts, the
retired clients and, while a round is out, which clients it asked to train. It is written
atomically after every round and, under DP, once more before each round is sent (write-ahead:
a round the server dies in is charged to the clients it asked).

A resume continues exactly the run that was started or refuses (`load_resumable`): the config
must equal the one in the checkpoint in everything but where and how fast the run goes
(`RESUME_MAY_CHANGE`), compared by value; the checkpoint must load, match the model and hold
finite values; the history must hold every round up to it. Nothing in the run directory is
touched before these checks pass.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.config import ConfigError, ExperimentConfig
from fedlora.config_compat import config_changes, with_defaults
from fedlora.lora import MERGED, LoraState
from fedlora.lora_core import CORE, CORE_PARTS, SCALES
from fedlora.results import CHECKPOINT, HISTORY, read_history, read_rounds


@dataclass
class Checkpoint:
    """What a run needs to go on after its last finished round."""

    round: int
    tensors: dict[str, torch.Tensor]  # the global LoraState's tensors, by record key
    config: dict[str, Any] = field(default_factory=dict)  # the resolved config the run was started with
    privacy: dict[str, Any] | None = None  # the server's privacy accounts (fedlora.accounting)
    retired: dict[int, str] = field(default_factory=dict)  # client id -> why it is no longer sampled
    in_flight: list[int] = field(default_factory=list)  # clients asked to train in the round after `round`
    elapsed: float = 0.0  # seconds the run has taken so far


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write the checkpoint atomically: a kill mid-write leaves the previous one intact."""
    path = Path(run_dir) / CHECKPOINT
    partial = path.with_suffix(".partial")
    torch.save(asdict(checkpoint), partial)
    os.replace(partial, path)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's last checkpoint, or None if it has none; ConfigError if it cannot be read."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        checkpoint = Checkpoint(**torch.load(path, weights_only=True))
    except Exception as err:  # truncated, garbage, an older format: all mean the same to the user
        raise ConfigError(
            f"{path}: cannot be read ({type(err).__name__}); the run cannot be continued, start a new one"
        ) from None
    whole = type(checkpoint.round) is int and checkpoint.round >= 0
    if not (whole and isinstance(checkpoint.tensors, dict) and isinstance(checkpoint.config, dict)):
        raise ConfigError(
            f"{path}: its round, tensors or config are of the wrong type; the run cannot be continued, start a new one"
        )
    return checkpoint


def load_resumable(run_dir: Path, config: ExperimentConfig, initial: LoraState | None = None) -> Checkpoint | None:
    """The checkpoint a resume continues from, after every check that it continues exactly this run.

    Refused (ConfigError, one line): a config that differs from the one the run was started with
    in anything but where and how fast it runs (privacy, data, seeds, rounds, participation...);
    recorded rounds without a usable checkpoint; a checkpoint that does not load, does not match
    the model (`initial`: the freshly built adapter's state) or holds non-finite values. None: the
    run never started a round, so it starts from the beginning.
    """
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir)
    recorded = {line["round"] for line in read_history(run_dir)} if (run_dir / HISTORY).exists() else set()
    if checkpoint is None:
        if any(r > 0 for r in recorded):
            raise ConfigError(
                f"{run_dir}: {max(recorded)} rounds recorded but no {CHECKPOINT}: it cannot be continued exactly "
                "(its privacy ledgers and state are gone); start a new run"
            )
        return None
    if not set(range(checkpoint.round + 1)) <= recorded:
        missing = sorted(set(range(checkpoint.round + 1)) - recorded)
        raise ConfigError(
            f"{run_dir / HISTORY}: the checkpoint is after round {checkpoint.round} but the history lacks round(s) "
            f"{missing[:5]}; the run cannot be continued, start a new one"
        )
    read_rounds(run_dir, checkpoint.round)  # the rounds the resumed run keeps must be whole records
    changed = config_changes(with_defaults(checkpoint.config), config.model_dump(mode="json"))
    if changed:
        key = changed[0]
        raise ConfigError(
            f"{key}: {_lookup(checkpoint.config, key)!r} when {run_dir.name} started, {_lookup(config.model_dump(mode='json'), key)!r} now"
            f"{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}; resume continues a run exactly as it was "
            "started: restore the setting, or start a new run"
        )
    problem = _state_problem(checkpoint.tensors, initial)
    if problem:
        raise ConfigError(f"{run_dir / CHECKPOINT}: {problem}; the run cannot be continued, start a new one")
    return checkpoint


def _lookup(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _merged_problem(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """Why a checkpoint's merged deltas (U: d_out x q, V: q x d_in per layer) do not fit the model, or None."""
    for key, tensor in merged.items():
        layer, _, part = key.rpartition(".")
        other = merged.get(f"{layer}.{'V' if part == 'U' else 'U'}")
        b, a = expected.get(f"{layer}.B"), expected.get(f"{layer}.A")
        if other is None or b is None or a is None:
            return f"{key} has no {'V' if part == 'U' else 'U'} or no layer of the model"
        u, v = (tensor, other) if part == "U" else (other, tensor)
        if u.ndim != 2 or v.ndim != 2 or u.shape[0] != b.shape[0] or v.shape[1] != a.shape[1] or u.shape[1] != v.shape[0]:
            return (
                f"{layer}: merged delta U {tuple(u.shape)}, V {tuple(v.shape)} do not fit its {b.shape[0]} x {a.shape[1]} weight"
            )
    return None


def _core_problem(cores: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str | None:
    """Why a checkpoint's cores (R: h x q x q with h q the layer's rank, S: h scalars) do not fit the model, or None."""
    for key, tensor in cores.items():
        layer, _, part = key.rpartition(".")
        a, core = expected.get(f"{layer}.A"), cores.get(f"{layer}.{CORE}")
        if a is None or core is None or core.ndim != 3 or core.shape[1] != core.shape[2]:
            return f"{key} has no square core or no layer of the model"
        if core.shape[0] * core.shape[1] != a.shape[0] or (part == SCALES and tensor.shape != core.shape[:1]):
            return f"{layer}: core {tuple(core.shape)}, scalars {tuple(tensor.shape)} do not fit its rank {a.shape[0]}"
    return None


def _state_problem(tensors: dict[str, Any], initial: LoraState | None) -> str | None:
    """Why a checkpoint's tensors cannot be the run's global state, or None."""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            return f"{key} is not a tensor"
        if not torch.isfinite(tensor).all():
            return f"{key} holds NaN or Inf"
    if initial is None:
        return None
    expected = initial.tensors()
    merged = {key for key in tensors if key.rpartition(".")[2] in MERGED}  # FedEx-LoRA's, FLoRA's merged delta
    problem = _merged_problem({key: tensors[key] for key in merged}, expected)
    if problem:
        return problem
    cores = {key for key in tensors if key.rpartition(".")[2] in CORE_PARTS}  # Fed-SB's, RAVAN's core
    problem = _core_problem({key: tensors[key] for key in cores}, expected)
    if problem:
        return problem
    tensors = {key: tensor for key, tensor in tensors.items() if key not in merged | cores}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors))[:2], sorted(set(tensors) - set(expected))[:2]
        return f"its tensors do not match the model (missing {missing}, unexpected {extra})"
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape or tensor.dtype != expected[key].dtype:
            return (
                f"{key} is {tuple(tensor.shape)} {tensor.dtype}, the model has {tuple(expected[key].shape)} {expected[key].dtype}"
            )
    return None
