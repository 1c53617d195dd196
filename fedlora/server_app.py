"""The ServerApp `flwr run` starts (pyproject.toml's serverapp component): the experiment comes
from the run config, the round loop is fedlora/server.py's.

A mistake in the experiment, or a federation that cannot serve it, is logged as one line that
says what to change; Flower then marks the run failed. Flower logs every exception a ServerApp
raises with its traceback (flwr/superlink/runtime/run_serverapp.py); for ours, whose line has
already said everything, `OneLineErrors` drops that traceback from the record.
"""

from __future__ import annotations

import logging
from logging import ERROR, INFO
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.common.logger import FLOWER_LOGGER, log
from flwr.serverapp import Grid, ServerApp

from fedlora.config import ConfigError, ExperimentConfig, experiment_from_run_config
from fedlora.results import RUN_REPORT_DIR
from fedlora.server import FederationError, run_federation

APP_DIR = Path(__file__).resolve().parent.parent  # the app folder as Flower installed it
EXPLAINED = (ConfigError, FederationError)  # errors whose own line says what to change


class OneLineErrors(logging.Filter):
    """Keeps Flower's "ServerApp raised an exception" line but not the traceback it attaches,
    when the exception is one fedlora has already explained in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], EXPLAINED):
            record.exc_info = None
            record.exc_text = None
            record.msg = f"{record.msg} (the line above says what to change)"
        return True


def quiet_explained_tracebacks() -> None:
    """Installs `OneLineErrors` on Flower's logger, once per process."""
    if not any(isinstance(each, OneLineErrors) for each in FLOWER_LOGGER.filters):
        FLOWER_LOGGER.addFilter(OneLineErrors())


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """`flwr run` entry point (deployment, or Flower's local simulation): the experiment comes from
    the run config; the run directory, its report and the adapter are logged as they are written.

    With output.name set, the run directory is stable across runs, and `resume=true` in the run
    config continues it from its last checkpoint (e.g. after the server machine restarted);
    `overwrite=true` replaces a run already there.
    """
    quiet_explained_tracebacks()
    run_config = context.run_config
    try:
        config = with_secret_noise(experiment_from_run_config(dict(run_config), APP_DIR))
        run_dir = deployment_run_dir(run_config, config, context.run_id)
        log(INFO, "run directory: %s", run_dir)
        summary = run_federation(
            grid,
            config,
            run_dir,
            resume=bool(run_config.get("resume", False)),
            overwrite=bool(run_config.get("overwrite", False)),
        )
    except EXPLAINED as err:
        log(ERROR, "%s", err)
        raise  # Flower marks the run failed; OneLineErrors keeps its traceback out of the log
    from fedlora.report import write_report  # plots: loaded only once a run has something to show

    files = write_report([run_dir], run_dir / RUN_REPORT_DIR, f"flwr run: {run_dir.name}")
    log(INFO, "final accuracy %.4f (round 0: %.4f)", summary["final_accuracy"], summary["initial_accuracy"])
    log(INFO, "adapter (peft format): %s", summary["adapter"])
    log(INFO, "report: %s", files.html)


def with_secret_noise(config: ExperimentConfig) -> ExperimentConfig:
    """User-level DP's randomness from the OS's entropy (privacy.secret_noise) unless the experiment
    sets it: a deployment's run seed is in every SuperNode's run config, and seeded noise can be
    regenerated and subtracted by anyone holding it (fedlora/user_privacy.py)."""
    privacy = config.privacy
    if not privacy.user_level or "secret_noise" in privacy.model_fields_set:
        return config
    log(INFO, "privacy.secret_noise: on (user-level noise from the OS's entropy, not the run seed)")
    return config.model_copy(update={"privacy": privacy.model_copy(update={"secret_noise": True})})


def deployment_run_dir(run_config: dict[str, Any], config: ExperimentConfig, run_id: int) -> Path:
    """`<run-dir>/<output.name>` (or `<strategy>-run<run id>`), absolute.

    A relative run-dir (the default, "runs") is taken from the ServerApp's working directory,
    which it inherits from the SuperLink: for `flwr run . local`, the folder where the first
    `flwr run` started Flower's local SuperLink (it keeps running in the background).
    """
    base = Path(str(run_config.get("run-dir", config.output.dir))).expanduser()
    return (base / (config.output.name or f"{config.strategy.name}-run{run_id}")).resolve()
