"""Run an experiment on Flower's simulation engine (Ray backend), on this machine or a Ray cluster."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.simulation import run_simulation

from clients.app import build_client_app
from fedlora import workspace
from fedlora.accounting import plan_clients
from fedlora.causal import TINY_CAUSAL, check_causal_resources
from fedlora.config import ConfigError, ExperimentConfig, FederationConfig, ModelConfig
from fedlora.data import hub
from fedlora.data.files import root_cause
from fedlora.interrupt import StopRequest
from fedlora.model import BUILTIN_MODEL, TINY_MODEL, model_source
from fedlora.node import server_device
from fedlora.results import SUMMARY, read_summary
from fedlora.rundir import LOCK, RUN_FILES, RUN_FOLDERS, RunLock, claim_run_dir
from fedlora.server import RoundCallback, build_server_app
from fedlora.threads import thread_env
from fedlora.trackers import check_trackers
from fedlora.user_privacy import UserLevelSettings
from strategies import build_defence, strategy_class


class SimulationError(RuntimeError):
    """The simulation ended without finishing the run."""


# Ray's switch for a single-machine instance (its name says Windows/macOS, where it is the
# default): when off, the node's IP address is 127.0.0.1, and then the GCS, the raylet, the
# runtime-env agent and every core worker (the driver included) bind loopback, not 0.0.0.0.
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's discovery reads it when ray.init has no address


def backend_config(config: ExperimentConfig) -> dict[str, Any]:
    """Ray resources per client (CPUs, GPU fraction) and, optionally, a cluster to join.

    Without `federation.ray_address` the run starts a Ray of its own ("local"), without its
    dashboard (a web server): `ray.init()` without an address would join the cluster Ray's own
    discovery finds (RAY_ADDRESS, or the last `ray start` on this machine, even one whose
    processes are dead, where it waits forever). Joining a cluster is only ever asked for; then
    the cluster's own settings stand.
    """
    federation = config.federation
    init_args: dict[str, Any] = {"log_to_driver": False}
    if federation.ray_address:
        init_args["address"] = federation.ray_address
    else:
        init_args.update(address="local", include_dashboard=False)
    return {
        "client_resources": {"num_cpus": federation.client_cpus, "num_gpus": federation.client_gpus},
        "init_args": init_args,
    }


@contextmanager
def local_ray_on_loopback(config: ExperimentConfig) -> Iterator[None]:
    """While it lasts, a Ray started here binds loopback only, and its processes do not see a
    RAY_ADDRESS of the user's; a cluster (`federation.ray_address`) is left as it is. The previous
    settings come back after, for a later run in this process."""
    if config.federation.ray_address:
        yield
        return
    # Ray reads the switch once, when first imported: import it now, then set what it read.
    from ray._private import ray_constants

    saved_env = {name: os.environ.get(name) for name in (RAY_SINGLE_MACHINE_ENV, RAY_ADDRESS_ENV)}
    saved_constant = ray_constants.ENABLE_RAY_CLUSTER
    os.environ[RAY_SINGLE_MACHINE_ENV] = "0"  # for Ray's own processes, which read it afresh
    os.environ.pop(RAY_ADDRESS_ENV, None)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_constant
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def signal_handlers_kept_from_ray() -> Iterator[None]:
    """While it lasts, the SIGTERM handler in force before Flower's `ray.init` is put back after it:
    Ray replaces it with one that exits the main thread, which would cut a run short where
    fedlora.interrupt stops it after its round, and leave the ServerApp's thread running."""
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    flower_init_ray = RayBackend.init_ray

    def init_ray_keeping_handler(backend: RayBackend, backend_config: Any) -> None:
        handler = signal.getsignal(signal.SIGTERM)
        try:
            flower_init_ray(backend, backend_config)
        finally:
            if threading.current_thread() is threading.main_thread() and handler is not None:
                signal.signal(signal.SIGTERM, handler)

    RayBackend.init_ray = init_ray_keeping_handler  # type: ignore[method-assign]
    try:
        yield
    finally:
        RayBackend.init_ray = flower_init_ray  # type: ignore[method-assign]


@contextmanager
def one_ray_for_every_run() -> Iterator[None]:
    """While it lasts, the simulations this process runs share one Ray instance (a sweep's
    variants) and, where they ask for the same client resources, one pool of client actors: the
    first run starts Ray, through Flower's own `ray.init` with `backend_config`'s init args (on
    loopback, as every run); later runs find it running, and it shuts down at the end.

    Flower's RayBackend (flwr 1.41) calls `ray.init` only when Ray is not running, builds a fresh
    actor pool every run and shuts Ray down after it. A fresh actor imports torch, transformers,
    peft and opacus again, about 7 CPU-seconds each, more than a small run's training; so for the
    duration a run's pool is kept for the next run when every actor is back, idle and alive (the
    ClientApp comes with each message, and the actors' caches are keyed by the config: nothing of
    one run's experiment leaks into another's). A pool with work still in flight (a client that
    outlived its round's timeout) or a dead actor is stopped instead. Only runs with the same init
    args may share Ray: the caller checks (`ray_init_args`). Within an outer one (a sweep started
    where Ray is already shared), it leaves the sharing to the outer one.
    """
    if _SHARING.active:
        yield
        return
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    flower_build, flower_terminate = RayBackend.build, RayBackend.terminate

    def build_or_reuse(backend: RayBackend, app_fn: Any) -> None:
        kept, _SHARING.pool = _SHARING.pool, None
        if kept is not None and kept.client_resources == backend.client_resources:
            backend.pool, backend.app_fn = kept, app_fn
            return
        _stop_actors(kept)
        flower_build(backend, app_fn)

    def keep_or_stop(backend: RayBackend) -> None:
        if backend.pool is not None and _all_idle_and_alive(backend.pool):
            _stop_actors(_SHARING.pool)
            _SHARING.pool = backend.pool
        else:
            _stop_actors(backend.pool)
        backend.pool = None

    RayBackend.build, RayBackend.terminate = build_or_reuse, keep_or_stop  # type: ignore[method-assign]
    _SHARING.active = True
    try:
        yield
    finally:
        RayBackend.build, RayBackend.terminate = flower_build, flower_terminate  # type: ignore[method-assign]
        _SHARING.active = False
        restart_ray()


@dataclass
class _Sharing:
    """Whether one_ray_for_every_run is in force, and the actor pool a finished run left for the next."""

    active: bool = False
    pool: Any = None  # a flwr BasicActorPool


_SHARING = _Sharing()


def _all_idle_and_alive(pool: Any, timeout: float = 10.0) -> bool:
    """Every actor of a Flower BasicActorPool is back in the pool, with no job in flight, and answers."""
    import ray

    if pool._future_to_actor or len(pool.pool) != pool.num_actors:
        return False
    try:
        ray.get([actor.__ray_ready__.remote() for actor in pool.pool], timeout=timeout)
    except Exception:  # a dead actor (RayActorError) or one that does not answer in time
        return False
    return True


def _stop_actors(pool: Any) -> None:
    """Stop a pool's idle actors (Flower's way) and kill those still busy (their CPUs are the next run's)."""
    import ray

    if pool is None or not ray.is_initialized():  # no Ray, no actors
        return
    pool.terminate_all_actors()
    for actor in pool._future_to_actor.values():
        ray.kill(actor)


def restart_ray() -> None:
    """Shut a running Ray down, so that the next run starts a fresh one (after a run that failed)."""
    import ray

    _stop_actors(_SHARING.pool)
    _SHARING.pool = None
    if ray.is_initialized():
        ray.shutdown()


def ray_init_args(config: ExperimentConfig) -> dict[str, Any]:
    """The arguments Flower passes to `ray.init` for this config (runs that share Ray must agree on them)."""
    return backend_config(config)["init_args"]


def check_runnable(config: ExperimentConfig) -> None:
    """Refuse, before anything starts, what the config alone cannot show: unknown strategy or
    defence names, too few clients a round for the defence, a tracker whose package is missing,
    resources this machine lacks, a model that cannot be had, the data (read and checked in full),
    a privacy budget no noise can meet, a strategy user-level DP cannot protect."""
    strategy_class(config.strategy.name).check_privacy(config)
    check_trackers(config.output.trackers)
    defence = build_defence(config.strategy)  # with its options and bucketing: what the server will run
    per_round = config.federation.clients_per_round
    if defence is not None and per_round < defence.min_clients:
        raise ConfigError(
            f"federation.clients_per_round: {defence.name} needs at least {defence.min_clients} clients a round (got {per_round})"
        )
    check_resources(config.federation)
    server_device(config)  # the server's evaluation device exists here (ConfigError if not)
    check_model_available(config.model)
    check_causal_resources(config.model)  # 4-bit base weights need CUDA and bitsandbytes
    # Every example and every client's share, checked; cached, so the server does not redo it.
    task = workspace.federated_task(config)
    if config.privacy.example_level:  # calibrates every client now (cached for the server in this process)
        plan_clients(config, {client: len(part.labels) for client, part in enumerate(task.partitions)})
    if config.privacy.user_level:  # the server's sigma, likewise
        # For N = num_clients, the federation the config describes; the server calibrates again for
        # the clients that pass its handshake (q must be the rate it samples them at), which is the
        # same N unless a node fails its handshake, and then refuses an out-of-reach plan just the same.
        UserLevelSettings.from_config(config, config.federation.num_clients).calibrate()


def check_model_available(model: ModelConfig) -> None:
    """Refuse, within seconds, a model.name that is neither a built-in model of its task, a local
    folder, nor a model on the Hugging Face hub: the server would find out only once the engine
    has started. Hub ids are looked up in the local cache first; with HF_HUB_OFFLINE=1 the cache
    is all there is. (A probe of the hub's address first, as for hub data sets: without a network
    the hub client retries for tens of seconds.)"""
    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    builtins = TINY_CAUSAL if model.causal else (BUILTIN_MODEL, TINY_MODEL)
    if model.name in builtins or Path(model.name).exists():  # as the loaders read it: no ~ expansion
        return
    if not model.causal:
        model_source(model)  # a classifier's name that is not even a hub id is refused there
    named = f"model.name: {model.name!r} is neither a local folder"
    try:
        cached = try_to_load_from_cache(model.name, "config.json")
    except ValueError:  # not a valid hub id
        raise ConfigError(f"{named} nor a hub id (owner/model); built-in names: {', '.join(builtins)}") from None
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{named} nor in the local Hugging Face cache, and HF_HUB_OFFLINE is set; "
            "give a local folder, or download it where the network allows (HF_HUB_OFFLINE unset)"
        )
    if not hub.hub_reachable():
        raise ConfigError(
            f"{named} nor in the local Hugging Face cache, and the hub ({hub.hub_address()[0]}) cannot be reached from here; "
            "give a local folder, or download it where the network allows"
        )
    try:
        model_info(model.name, timeout=hub.PROBE_SECONDS)
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{named} nor a model on the Hugging Face hub (or one private to others); check the id, or log in "
            "(`hf auth login`, or HF_TOKEN) if it is yours"
        ) from None
    except Exception as err:  # the hub client raises many types: report them all the same way
        raise ConfigError(
            f"{named} nor in the local Hugging Face cache, and the hub did not say whether it has it: {root_cause(err)}"
        ) from None


def check_resources(federation: FederationConfig) -> None:
    """Refuse client resources this machine cannot give (Ray would only say "ActorPool is empty").

    On a Ray cluster (`ray_address`) the cluster's resources count, which this machine cannot see.
    """
    if federation.ray_address:
        return
    import torch

    if federation.client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(
            f"federation.client_gpus: {federation.client_gpus} GPU per client, but torch {torch.__version__} sees no CUDA "
            "device here; set federation.client_gpus = 0 (or run on a machine with a GPU, or a Ray cluster: federation.ray_address)"
        )
    cpus = os.cpu_count() or 1
    if federation.client_cpus > cpus:
        raise ConfigError(
            f"federation.client_cpus: {federation.client_cpus} CPUs per client, but this machine has {cpus}; "
            f"set federation.client_cpus to at most {cpus}"
        )


def simulate(
    config: ExperimentConfig,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run the experiment through `flwr.simulation.run_simulation` (with `resume`, from the run
    directory's last checkpoint); returns the run summary.

    The run directory is locked and claimed (fedlora/rundir.py) before the engine starts; once
    `stop` is set the run ends after the round in progress with RunInterrupted.
    """
    check_runnable(config)
    with RunLock(run_dir):
        if not resume:
            claim_run_dir(run_dir, overwrite)
        if not isinstance(stop, StopRequest):
            return _run_engine(config, Path(run_dir), on_round, resume, stop)
        with stop.starting(lambda: abandon_start(Path(run_dir), resume)):
            return _run_engine(config, Path(run_dir), on_round, resume, stop)


def abandon_start(run_dir: Path, resume: bool) -> str:
    """What a run stopped before its first round leaves: a resumed run's directory as it was (its
    writes are atomic), a new run's nothing (it had at most its config and round 0); says which."""
    if resume:
        return f"{run_dir} is as it was: continue with `fedlora simulate --resume {run_dir}`"
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(run_dir / name, ignore_errors=True)
    if {path.name for path in run_dir.iterdir()} <= {LOCK}:
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"{run_dir} removed; run the same command again"
    return f"nothing of the run kept in {run_dir}; run the same command again"


def _run_engine(
    config: ExperimentConfig, run_dir: Path, on_round: RoundCallback | None, resume: bool, stop: threading.Event | None
) -> dict[str, Any]:
    errors: list[BaseException] = []
    # Ray workers inherit the environment: keep them from fighting over the cores, and keep
    # Ray from rewriting CUDA_VISIBLE_DEVICES for CPU-only clients (and warning about it).
    for name, value in thread_env(config.federation.client_cpus).items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    with local_ray_on_loopback(config), signal_handlers_kept_from_ray():
        run_simulation(
            server_app=build_server_app(config, run_dir, on_round, errors, resume, stop=stop),
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
