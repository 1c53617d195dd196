"""The Python API: run an experiment, read a run back (`fedlora.simulate`, `fedlora.load_run`).

    import fedlora
    run = fedlora.simulate("simulations/quickstart.toml", out="runs/mine", overrides={"federation.rounds": 3})
    run.final_accuracy, run.history[-1]["loss"], run.summary["communication_mb"]
    model = fedlora.load_run("runs/mine").adapter_model()   # peft's PeftModel of the final adapter

`simulate` runs what `fedlora simulate` runs (the same checks first, the same run directory),
without its progress display and report. Mistakes in the config are a ConfigError (a
ValueError) with the one line the command would print.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.config import ConfigError, ExperimentConfig, config_from_dict, config_from_json, read_config_file
from fedlora.metadata import runs_from
from fedlora.results import ADAPTER, CONFIG, ROUND_ADAPTERS, RoundRecord, default_run_dir, finished_summary, read_history

if TYPE_CHECKING:
    from peft import PeftModel

ConfigSource = ExperimentConfig | str | os.PathLike[str] | Mapping[str, Any]


@dataclass(frozen=True)
class Run:
    """A run directory, read: its config, history and summary, and its adapters on demand."""

    run_dir: Path  # absolute
    config: ExperimentConfig
    history: list[dict[str, Any]]  # history.jsonl's records, round 0 (the initial model) first
    summary: dict[str, Any] | None  # summary.json; None for a run that has not finished
    final_accuracy: float | None  # the summary's (a causal LM's: exact match); None unfinished

    def adapter_dir(self, round: int | None = None) -> Path:
        """The final adapter's folder, or (output.adapter_every) the one written after `round`."""
        folder = self.run_dir / ADAPTER if round is None else self.run_dir / ROUND_ADAPTERS / f"round-{round}"
        if not folder.is_dir():
            written = sorted(int(path.name.removeprefix("round-")) for path in (self.run_dir / ROUND_ADAPTERS).glob("round-*"))
            rounds = f"; adapters of rounds {', '.join(map(str, written))} were written" if written else ""
            raise ConfigError(f"{folder}: no adapter there (a run writes adapter/ when it finishes{rounds})")
        return folder

    def adapter_model(self, round: int | None = None) -> PeftModel:
        """The base model with the run's adapter on it (the final one, or the one after `round`), as peft loads it."""
        from fedlora.export_run import load_run_model

        return load_run_model(self.adapter_dir(round), self.config)


def load_run(run_dir: str | os.PathLike[str]) -> Run:
    """A run directory written by `fedlora simulate`, `fedlora.simulate` or `flwr run`, finished or not."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / CONFIG
    if not path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no {CONFIG}); give a folder that fedlora simulate wrote")
    summary = finished_summary(run_dir)
    return Run(
        run_dir=run_dir,
        config=config_from_json(path.read_bytes(), path),
        history=read_history(run_dir),
        summary=summary,
        final_accuracy=None if summary is None else summary["final_accuracy"],
    )


def simulate(
    config: ConfigSource,
    out: str | os.PathLike[str] | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> Run:
    """Run an experiment on Flower's simulation engine; the finished run.

    config: an ExperimentConfig, the path of a TOML file (its `extends` and relative data paths
    resolved as the command does), or a dict shaped like one. overrides: {"section.key": value}
    on top of it, values of the key's type (`{"federation.rounds": 3}`, not "3"). out: the run
    directory (default: output.dir/<strategy>-<time>); one that holds a run is refused unless
    `overwrite`. on_round: called with each round's record as it is written.
    """
    from fedlora.simulation import simulate as run_simulation  # Flower, Ray and torch: only when a run starts

    experiment, path = experiment_config(config, overrides)
    run_dir = Path(out) if out is not None else default_run_dir(experiment)
    with runs_from(path):  # a config file's git commit goes into the run's metadata
        run_simulation(experiment, run_dir, on_round, overwrite=overwrite)
    return load_run(run_dir)


def experiment_config(config: ConfigSource, overrides: Mapping[str, Any] | None = None) -> tuple[ExperimentConfig, Path | None]:
    """The validated experiment `config` names, with `overrides` on top; and the file it came from, if any."""
    if isinstance(config, ExperimentConfig) and not overrides:
        return config, None
    path = None
    if isinstance(config, ExperimentConfig):
        raw = config.model_dump(mode="json")
    elif isinstance(config, Mapping):
        raw = copy.deepcopy(dict(config))
    else:
        path = Path(config)
        raw = read_config_file(path)
    for key, value in (overrides or {}).items():
        set_key(raw, key, value)
    return config_from_dict(raw), path


def set_key(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set a dotted key ("section.key", "model.tiny.hidden_size") in a raw config dict."""
    *sections, leaf = str(key).split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"overrides: {key!r}: {section} is not a section; write section.key, e.g. federation.rounds")
    node[leaf] = value
