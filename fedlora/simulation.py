"""Run an experiment on Flower's simulation engine (Ray backend), on this machine or a Ray cluster."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from clients.app import build_client_app
from fedlora.config import ConfigError, ExperimentConfig
from fedlora.results import SUMMARY, read_summary
from fedlora.server import RoundCallback, build_server_app
from strategies import defence_class, strategy_class


class SimulationError(RuntimeError):
    """The simulation ended without finishing the run."""


def backend_config(config: ExperimentConfig) -> dict[str, Any]:
    """Ray resources per client (CPUs, GPU fraction) and, optionally, a cluster to join."""
    federation = config.federation
    init_args: dict[str, Any] = {"log_to_driver": False}
    if federation.ray_address:
        init_args["address"] = federation.ray_address
    return {
        "client_resources": {"num_cpus": federation.client_cpus, "num_gpus": federation.client_gpus},
        "init_args": init_args,
    }


def check_runnable(config: ExperimentConfig) -> None:
    """Refuse, before anything starts, what only the registries can judge (strategy and defence names)."""
    strategy_class(config.strategy.name)
    defence = defence_class(config.strategy.robust)
    per_round = config.federation.clients_per_round
    if defence is not None and per_round < defence.min_clients:
        raise ConfigError(
            f"federation.clients_per_round: {defence.name} needs at least {defence.min_clients} clients a round (got {per_round})"
        )


def simulate(
    config: ExperimentConfig, run_dir: Path, on_round: RoundCallback | None = None, resume: bool = False
) -> dict[str, Any]:
    """Run the experiment through `flwr.simulation.run_simulation` (with `resume`, from the run
    directory's last checkpoint); returns the run summary."""
    check_runnable(config)
    errors: list[BaseException] = []
    # Ray workers inherit the environment: keep them from fighting over the cores, and keep
    # Ray from rewriting CUDA_VISIBLE_DEVICES for CPU-only clients (and warning about it).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(config.federation.client_cpus))))
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    run_simulation(
        server_app=build_server_app(config, run_dir, on_round, errors, resume),
        client_app=build_client_app(config),
        num_supernodes=config.federation.num_clients,
        backend_config=backend_config(config),
        verbose_logging=False,
    )
    if errors:
        raise errors[0]
    if not (Path(run_dir) / SUMMARY).exists():
        raise SimulationError(f"the simulation stopped before finishing; see {run_dir}")
    return read_summary(run_dir)


def quiet_flower_logs() -> None:
    """Keep Flower's per-round INFO lines, and its notice that run_simulation is deprecated
    in favour of `flwr run` (which we support too), out of a live display."""
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.WARNING)
    logger.addFilter(lambda record: "DEPRECATED FEATURE" not in record.getMessage())
