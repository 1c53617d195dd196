"""Shared test helpers: a tiny experiment config and hand-made Flower replies."""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import pytest
from flwr.app import Message, MessageType, Metadata, RecordDict

from fedlora.config import ExperimentConfig, config_from_dict
from fedlora.results import TIMING_FIELDS

# Ray in tests: quiet and CPU-only.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

TINY: dict[str, Any] = {
    "seed": 7,
    "model": {"name": "tiny", "max_length": 24, "lora_rank": 4, "lora_alpha": 8},
    "data": {"num_train": 240, "num_test": 60, "partition": "iid"},
    "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2, "local_steps": 3, "batch_size": 8, "lr": 5e-3},
}


# The causal-LM counterpart: a tiny Llama (hidden 32, 2 layers) on the built-in instruction task.
CAUSAL: dict[str, Any] = {
    "seed": 7,
    "model": {"task": "causal_lm", "name": "tiny-llama", "max_length": 48, "lora_rank": 4, "lora_alpha": 8},
    "data": {"num_train": 120, "num_test": 24, "partition": "iid", "exact_match_examples": 16},
    "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2, "local_steps": 3, "batch_size": 8, "lr": 5e-3},
}


def causal_config(*overrides: str, output_dir: str | None = None) -> ExperimentConfig:
    """The tiny causal-LM experiment used by fast tests, with `section.key=value` overrides."""
    items = list(overrides) + ([f"output.dir={output_dir!r}"] if output_dir else [])
    return config_from_dict(CAUSAL, items)


def tiny_config(*overrides: str, output_dir: str | None = None) -> ExperimentConfig:
    """The tiny-transformer experiment used by fast tests, with `section.key=value` overrides."""
    items = list(overrides) + ([f"output.dir={output_dir!r}"] if output_dir else [])
    return config_from_dict(TINY, items)


def run_cli(*args: str) -> tuple[int, str]:
    """`fedlora ARGS` in this process (where fedlora is imported already: no start-up cost);
    returns the exit code and what it printed on stdout and stderr."""
    from fedlora import cli

    buffer = io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["fedlora", *args])
        patch.setattr(sys, "stdout", buffer)  # the CLI console writes to whatever sys.stdout is
        patch.setattr(sys, "stderr", buffer)
        try:
            cli.main()
            code = 0
        except SystemExit as done:
            code = int(done.code or 0)
    return code, buffer.getvalue()


def one_line_refusal(*args: str) -> str:
    """`fedlora ARGS` in this process must exit 2 with exactly one line and no traceback; that line."""
    code, output = run_cli(*args)
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, f"exit code {code}: {output}"
    return lines[0]


def reply_from(node_id: int, content: RecordDict, message_type: str = MessageType.TRAIN) -> Message:
    """A reply message as the Grid would hand it to a strategy, from node `node_id`."""
    metadata = Metadata(
        run_id=1,
        message_id="",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )
    return Message(metadata=metadata, content=content)


class SharedRay:
    """One Ray instance, and its client actors, for every test module that asks for it
    (`fedlora.simulation.one_ray_for_every_run` held open across modules): Ray's start-up and
    a fresh pool of actors (about 15 s) are paid once, not once per module."""

    def __init__(self) -> None:
        self._held: ExitStack | None = None

    def start(self) -> None:
        from fedlora.simulation import one_ray_for_every_run

        if self._held is None:
            self._held = ExitStack()
            self._held.enter_context(one_ray_for_every_run())

    def stop(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None


@pytest.fixture(scope="session")
def shared_ray() -> Iterator[SharedRay]:
    ray = SharedRay()
    yield ray
    ray.stop()


@pytest.fixture(scope="module")
def one_ray(shared_ray: SharedRay) -> None:
    """The module's simulations run in the shared Ray instance, as a sweep's variants do. Only for
    modules whose runs all start Ray alike (no `ray_address`) and that do not count Ray's starts."""
    shared_ray.start()


@pytest.fixture(scope="module")
def own_ray(shared_ray: SharedRay) -> None:
    """The module's simulations start Ray themselves, as a run from the command line does (for
    tests that count Ray's starts or look at the processes it starts): the shared one is stopped."""
    shared_ray.stop()


def _module_weight(items: list[pytest.Item]) -> int:
    """Where a test module goes in the run: 0 deployments (the longest), 1 modules that stop the
    shared Ray, 2 other end-to-end modules, 3 the rest (short unit tests)."""
    if any(item.get_closest_marker("deploy") for item in items):
        return 0
    if any("own_ray" in getattr(item, "fixturenames", ()) for item in items):
        return 1
    if any(item.get_closest_marker("e2e") for item in items):
        return 2
    return 3


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Slow modules first, then the many short ones: `make test`'s workers take modules in this
    order (--dist loadfile --no-loadscope-reorder), so the short modules come last and even out
    the workers' finishing times, where a long module last would leave one worker alone with it.
    And the modules that stop the shared Ray all come before those that share it: each worker
    starts the shared Ray (and its client actors, tens of CPU-seconds) once, not after each of them."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    ordered = sorted(modules.values(), key=_module_weight)  # stable: file order within a group
    items[:] = [item for module in ordered for item in module]


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory: pytest.TempPathFactory):
    """Tables `datasets` builds from test files go to a temporary cache, not the user's."""
    import datasets

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets-cache"))
        yield


@pytest.fixture
def tiny() -> ExperimentConfig:
    """The tiny experiment config."""
    return tiny_config()


@contextmanager
def task_identity() -> Iterator[None]:
    """Messages built outside a running Flower app need a task identity (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


@pytest.fixture
def flower_task():
    """A task identity for the test's hand-made messages."""
    with task_identity():
        yield


def without_timings(history: list[dict], also: tuple[str, ...] = ()) -> list[dict]:
    """History lines without their wall-clock fields (and `also`): what two identical runs share."""
    return [{k: v for k, v in line.items() if k not in TIMING_FIELDS + also} for line in history]
