"""The run directory: resolved config, per-round history, summary and the exported adapter.

<run_dir>/config.json       the resolved ExperimentConfig
<run_dir>/history.jsonl     one JSON line per round (round 0: the initial model)
<run_dir>/summary.json      final figures, per-client records, package versions
<run_dir>/adapter/          the final adapter in peft's format
<run_dir>/checkpoint.pt     the last finished round: global factors, privacy ledgers,
                            elapsed time (a resumed run continues from it)
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from fedlora.config import ConfigError, ExperimentConfig

HISTORY = "history.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
ADAPTER = "adapter"
CHECKPOINT = "checkpoint.pt"
PACKAGES = ("fedlora", "torch", "flwr", "ray", "opacus", "transformers", "peft")


@dataclass
class RoundRecord:
    """One line of history.jsonl."""

    round: int
    accuracy: float
    loss: float
    bytes_up: int = 0
    bytes_up_factors: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    server_seconds: float = 0.0
    client_seconds: float = 0.0
    train_loss: float | None = None
    epsilon_max: float | None = None  # over every client that has trained so far (cumulative)
    epsilon_mean: float | None = None
    clients: list[int] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def default_run_dir(config: ExperimentConfig) -> Path:
    """<output.dir>/<output.name or strategy-timestamp>."""
    name = config.output.name or f"{config.strategy.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path(config.output.dir) / name


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on, for reproducing it."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Checkpoint:
    """What a run needs to go on after its last finished round."""

    round: int
    tensors: dict[str, torch.Tensor]  # the global LoraState's tensors, by record key
    ledgers: dict[int, dict[str, Any]] = field(default_factory=dict)  # client id -> privacy ledger record
    privacy: dict[int, dict[str, float]] = field(default_factory=dict)  # client id -> latest privacy figures
    elapsed: float = 0.0  # seconds the run has taken so far


def save_checkpoint(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Write the checkpoint atomically: a kill mid-write leaves the previous one intact."""
    path = Path(run_dir) / CHECKPOINT
    partial = path.with_suffix(".partial")
    torch.save(asdict(checkpoint), partial)
    os.replace(partial, path)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The run's last checkpoint, or None if it finished no round."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    return Checkpoint(**torch.load(path, weights_only=True))


def resumable_config(run_dir: Path) -> ExperimentConfig:
    """The resolved config a run directory was started with (to resume it)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: not a run directory (no {CONFIG})")
    return ExperimentConfig.model_validate_json(path.read_text())


class RunRecorder:
    """Writes a run directory as the run goes (history is flushed after every round).

    With `resume_after` (the round of the checkpoint a run resumes from), the history recorded
    up to that round is kept and any later line, written after the checkpoint, is dropped.
    """

    def __init__(self, run_dir: Path, config: ExperimentConfig, resume_after: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rounds: list[RoundRecord] = []
        if resume_after is None:
            (self.run_dir / CONFIG).write_text(config.to_json())
            (self.run_dir / HISTORY).write_text("")
            return
        if (self.run_dir / CONFIG).read_text() != config.to_json():
            raise ConfigError(f"{self.run_dir} was started with another config; resume it with its own")
        self.rounds = [RoundRecord(**line) for line in read_history(self.run_dir) if line["round"] <= resume_after]
        (self.run_dir / HISTORY).write_text("".join(json.dumps(asdict(r)) + "\n" for r in self.rounds))

    @property
    def adapter_dir(self) -> Path:
        """Where the final adapter goes."""
        return self.run_dir / ADAPTER

    def record(self, record: RoundRecord) -> None:
        """Append one round to history.jsonl."""
        self.rounds.append(record)
        with (self.run_dir / HISTORY).open("a") as handle:
            handle.write(json.dumps(asdict(record)) + "\n")

    def finish(self, wall_seconds: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Write summary.json and return it."""
        final = self.rounds[-1]
        summary = {
            "status": "finished",
            "rounds": final.round,
            "initial_accuracy": self.rounds[0].accuracy,
            "final_accuracy": final.accuracy,
            "final_loss": final.loss,
            "best_accuracy": max(r.accuracy for r in self.rounds),
            "bytes_up": sum(r.bytes_up for r in self.rounds),
            "bytes_down": sum(r.bytes_down for r in self.rounds),
            "wall_seconds": wall_seconds,
            "adapter": str(self.adapter_dir),
            "versions": package_versions(),
            **(extra or {}),
        }
        (self.run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
        return summary


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rounds recorded in a run directory."""
    lines = (Path(run_dir) / HISTORY).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A finished run's summary.json."""
    return json.loads((Path(run_dir) / SUMMARY).read_text())
