"""Experiment trackers: every history line also goes to TensorBoard, MLflow or Weights & Biases.

    [output]
    trackers = ["tensorboard", "mlflow"]

By default each tracker writes files into the run directory and needs no server or network:

    tensorboard   run_dir/tensorboard/   event files (torch.utils.tensorboard; needs the tensorboard
                                         package): `tensorboard --logdir runs`
    mlflow        run_dir/mlruns/        an MLflow file store (needs mlflow-skinny or mlflow):
                                         `MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri run_dir/mlruns`;
                                         `output.mlflow_uri` sends it to a tracking server instead
    wandb         run_dir/wandb/         an offline W&B run (needs wandb): `wandb sync run_dir/wandb/offline-run-*`;
                                         `output.wandb_mode = "online"` sends it to W&B as it runs

`output.project`, `group`, `tags` and `wandb_entity` name the run as its users file their runs.
At the end, MLflow and W&B also keep the run's adapter folder and summary.json as artifacts (the
report is written after the trackers close: it stays in the run directory).

At start a tracker records the resolved config (flattened `section.key` names) as the run's
params / hparams; for every round it logs the numbers of that round's history line (see
`round_scalars`) at step = round; at the end the summary's final figures. A tracker named whose
package is missing or fails to import is refused before anything runs, with a TrackerError (a
ConfigError) naming the package; one that fails to start is refused before the first round.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from abc import ABC, abstractmethod
from logging import WARNING
from pathlib import Path
from typing import Any

from flwr.common.logger import log

from fedlora.config import ConfigError, ExperimentConfig
from fedlora.results import RoundRecord

SUMMARY_FIGURES = ("final_accuracy", "best_accuracy", "initial_accuracy", "final_loss", "bytes_up", "bytes_down", "wall_seconds")
# MLflow: which run directory an MLflow run belongs to. Resume searches by a digest of the path
# (a path may hold quotes, which MLflow's filter language cannot escape); the path itself is shown.
RUN_DIR_TAG = "fedlora.run_dir"
RUN_DIR_KEY_TAG = "fedlora.run_dir_key"
# What of the adapter folder becomes an artifact: the trained files, not the base model it carries.
ADAPTER_ARTIFACT_FILES = ("adapter_config.json", "adapter_model.safetensors", "README.md")


def round_scalars(record: RoundRecord) -> dict[str, float]:
    """The numbers of one history line, by their history names; figures not recorded are left out.

    Lists count their entries: `clients` (accepted replies), `rejected`, `refused` (out of privacy
    budget), `dropped` and `flagged` (by the defence); `skipped` is 1 for a skipped round.
    """
    scalars: dict[str, float] = {
        "accuracy": record.accuracy,
        "loss": record.loss,
        "bytes_up": record.bytes_up,
        "bytes_up_factors": record.bytes_up_factors,
        "bytes_down": record.bytes_down,
        "seconds": record.seconds,
        "server_seconds": record.server_seconds,
        "client_seconds": record.client_seconds,
        "clients": len(record.clients),
        "rejected": len(record.rejected),
        "refused": len(record.refused),
        "dropped": len(record.extra.get("dropped") or []),
        "skipped": int(record.skipped),
    }
    optional = {"train_loss": record.train_loss, "epsilon_max": record.epsilon_max, "epsilon_mean": record.epsilon_mean}
    optional |= {key: record.extra.get(key) for key in ("tpr", "fpr")}
    if "flagged" in record.extra:
        optional["flagged"] = len(record.extra["flagged"])
    scalars.update({key: value for key, value in optional.items() if value is not None})
    return {key: float(value) for key, value in scalars.items()}


def config_params(config: ExperimentConfig) -> dict[str, str | int | float | bool]:
    """The resolved config as flat `section.key` params; lists, tables and None as JSON text."""
    params: dict[str, str | int | float | bool] = {}

    def walk(tree: dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            elif isinstance(value, (str, int, float, bool)):
                params[f"{prefix}{key}"] = value
            else:
                params[f"{prefix}{key}"] = json.dumps(value)

    walk(config.model_dump(mode="json"), "")
    return params


def summary_figures(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's final figures that trackers record once, at the end."""
    return {key: float(summary[key]) for key in SUMMARY_FIGURES if isinstance(summary.get(key), (int, float))}


class Tracker(ABC):
    """One tracking backend: started once per process, a call per round, finished at the end."""

    name: str
    module: str  # what must be installed
    package: str  # what to pip install for it
    imports: tuple[str, ...]  # what `start` imports: checked before anything runs

    @abstractmethod
    def start(self, config: ExperimentConfig, run_dir: Path, resume: bool) -> None:
        """Open the backend's files in the run directory; record the config (unless resuming)."""

    @abstractmethod
    def log_round(self, record: RoundRecord) -> None:
        """Record one history line at step = its round."""

    @abstractmethod
    def finish(self, summary: dict[str, Any]) -> None:
        """Record the final figures and close."""


class TensorBoardTracker(Tracker):
    """Event files under run_dir/tensorboard: scalars per round, the config as hparams."""

    name, module, package = "tensorboard", "tensorboard", "tensorboard"
    imports = ("torch.utils.tensorboard",)
    DIR = "tensorboard"

    def start(self, config: ExperimentConfig, run_dir: Path, resume: bool) -> None:
        """Open an event file; a fresh run also writes the hparams session (config, metric tags)."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.writer = SummaryWriter(log_dir=str(run_dir / self.DIR))
        experiment, session_start, self.session_end = hparams(config_params(config), {"accuracy": 0.0, "loss": 0.0})
        if not resume:  # the session started in the first process
            for summary in (experiment, session_start):
                self.writer.file_writer.add_summary(summary)

    def log_round(self, record: RoundRecord) -> None:
        """One scalar per figure; flushed, so a killed run keeps its rounds."""
        for tag, value in round_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record.round)
        self.writer.flush()

    def finish(self, summary: dict[str, Any]) -> None:
        """Final figures as `summary/<name>` scalars, the hparams session closed."""
        step = int(summary.get("rounds") or 0)
        for tag, value in summary_figures(summary).items():
            self.writer.add_scalar(f"summary/{tag}", value, global_step=step)
        self.writer.file_writer.add_summary(self.session_end)
        self.writer.close()


class MlflowTracker(Tracker):
    """An MLflow file store under run_dir/mlruns holding one run: params, metrics per step."""

    name, module, package = "mlflow", "mlflow", "mlflow-skinny"
    imports = ("mlflow.entities", "mlflow.tracking")
    DIR = "mlruns"

    def start(self, config: ExperimentConfig, run_dir: Path, resume: bool) -> None:
        """Create the run (or, resuming, continue the one the store holds) and log the config as params."""
        # MLflow 3 keeps its file store behind this opt-in; a file store is what needs no server.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        output = config.output
        self.client = MlflowClient(tracking_uri=output.mlflow_uri or (run_dir / self.DIR).resolve().as_uri())
        experiment = self.client.get_experiment_by_name(output.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(output.project)
        here = str(run_dir.resolve())
        key = run_dir_key(run_dir)
        # A shared server holds other runs too: continue the one this run directory started.
        previous = self.client.search_runs(
            [experiment_id], f"tags.`{RUN_DIR_KEY_TAG}` = '{key}'", max_results=1, order_by=["attributes.start_time DESC"]
        )
        if resume and previous:
            self.run_id = previous[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            return
        tags = {
            RUN_DIR_TAG: here,
            RUN_DIR_KEY_TAG: key,
            **{tag: "" for tag in output.tags},
            **({"group": output.group} if output.group else {}),
        }
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags).info.run_id
        params = [Param(key, str(value)) for key, value in config_params(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def log_round(self, record: RoundRecord) -> None:
        """Every figure of the round at step = round."""
        self._log(round_scalars(record), record.round)

    def finish(self, summary: dict[str, Any]) -> None:
        """Final figures as `summary.<name>` metrics; the run marked finished."""
        self._log({f"summary.{key}": value for key, value in summary_figures(summary).items()}, int(summary.get("rounds") or 0))
        for name, files in run_artifacts(summary).items():
            for file in files:
                self.client.log_artifact(self.run_id, str(file), name)
        self.client.set_terminated(self.run_id, "FINISHED")

    def _log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, value, now, step) for key, value in scalars.items()])


class WandbTracker(Tracker):
    """A W&B run: offline under run_dir/wandb (upload later with `wandb sync`) unless output.wandb_mode says otherwise."""

    name, module, package = "wandb", "wandb", "wandb"
    imports = ("wandb",)

    def start(self, config: ExperimentConfig, run_dir: Path, resume: bool) -> None:
        """A run whose id derives from the run directory, so a resumed run continues it."""
        import wandb

        output = config.output
        run_id = run_dir_key(run_dir)
        self.run = wandb.init(
            mode=output.wandb_mode,
            dir=str(run_dir),
            project=output.project,
            entity=output.wandb_entity,
            group=output.group,
            tags=output.tags or None,
            name=run_dir.name,
            id=run_id,
            resume="allow",
            config=config_params(config),
            settings=wandb.Settings(console="off", silent=True),
        )

    def log_round(self, record: RoundRecord) -> None:
        """Every figure of the round at step = round."""
        self.run.log(round_scalars(record), step=record.round)

    def finish(self, summary: dict[str, Any]) -> None:
        """Final figures into the run's summary; the run closed and its files complete."""
        import wandb

        self.run.summary.update(summary_figures(summary))
        for name, files in run_artifacts(summary).items():
            artifact = wandb.Artifact(f"{self.run.id}-{name}", type="model" if name == "adapter" else "run-files")
            for file in files:
                artifact.add_file(str(file), policy="immutable")
            self.run.log_artifact(artifact)
        self.run.finish()
        # W&B's service process writes the run's log after finish() returns; stopping it waits for
        # that, so the files are whole when the run is reported finished (a later run starts a new one).
        wandb.teardown()


def run_dir_key(run_dir: Path) -> str:
    """A run directory's digest: the W&B run id, and the MLflow tag a resume finds its run by."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


def run_artifacts(summary: dict[str, Any]) -> dict[str, list[Path]]:
    """The files a finished run keeps as tracker artifacts, by artifact: the adapter's trained files
    (not the base it carries: a copy of the base per run would cost its size each time), summary.json."""
    found: dict[str, list[Path]] = {}
    adapter = Path(summary["adapter"]) if summary.get("adapter") else None
    if adapter is not None and adapter.is_dir():
        found["adapter"] = [adapter / name for name in ADAPTER_ARTIFACT_FILES if (adapter / name).is_file()]
    if summary.get("run_dir") and (Path(summary["run_dir"]) / "summary.json").is_file():
        found["summary"] = [Path(summary["run_dir"]) / "summary.json"]
    return {name: files for name, files in found.items() if files}


TRACKERS: dict[str, type[Tracker]] = {cls.name: cls for cls in (TensorBoardTracker, MlflowTracker, WandbTracker)}


def check_trackers(names: list[str]) -> None:
    """Refuse, before anything runs, a tracker whose package is missing or fails to import."""
    for name in names:
        tracker = TRACKERS[name]
        if importlib.util.find_spec(tracker.module) is None:
            raise TrackerError(
                f"output.trackers: {name!r} needs the {tracker.package} package, which is not installed; "
                f"pip install {tracker.package}, or take {name!r} out of output.trackers"
            )
        for module in tracker.imports:
            try:
                importlib.import_module(module)
            except Exception as err:  # a broken install fails in any way at all
                raise TrackerError(
                    f"output.trackers: {name!r} cannot import {module} ({type(err).__name__}: {_first_line(err)}); "
                    f"repair it (pip install --force-reinstall {tracker.package}), or take {name!r} out of output.trackers"
                ) from None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


class TrackerError(ConfigError):
    """A tracker that cannot be used here (missing, broken, or failing to start)."""


class Trackers:
    """The trackers a config names, driven together (none: every call does nothing)."""

    def __init__(self, names: list[str]) -> None:
        check_trackers(names)
        self.trackers = [TRACKERS[name]() for name in names]

    def start(self, config: ExperimentConfig, run_dir: Path, resume: bool = False) -> None:
        """Start every tracker in the run directory (TrackerError, in one line, if one fails: before any round)."""
        for tracker in self.trackers:
            try:
                tracker.start(config, Path(run_dir), resume)
            except Exception as err:
                raise TrackerError(
                    f"output.trackers: {tracker.name!r} failed to start ({type(err).__name__}: {_first_line(err)}); no round "
                    f"has run: fix it or take {tracker.name!r} out of output.trackers, then continue with "
                    f"fedlora simulate --resume {run_dir}"
                ) from None

    def log_round(self, record: RoundRecord) -> None:
        """Hand one history line to every tracker."""
        for tracker in list(self.trackers):
            self._guarded(tracker, "log_round", record)

    def finish(self, summary: dict[str, Any]) -> None:
        """Finish every tracker with the run's summary."""
        for tracker in list(self.trackers):
            self._guarded(tracker, "finish", summary)

    def _guarded(self, tracker: Tracker, method: str, argument: Any) -> None:
        """A tracker that fails mid-run (a server or network gone) is dropped with a warning: the run,
        its history.jsonl and the other trackers go on; the tracker's record stops there."""
        try:
            getattr(tracker, method)(argument)
        except Exception as err:
            self.trackers.remove(tracker)
            log(
                WARNING,
                "output.trackers: %r stopped recording (%s: %s); the run goes on",
                tracker.name,
                type(err).__name__,
                _first_line(err),
            )
