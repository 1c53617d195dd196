"""Shared test helpers: a tiny experiment config and hand-made Flower replies."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from flwr.app import Message, MessageType, Metadata, RecordDict

from fedlora.config import ExperimentConfig, config_from_dict

# Ray in tests: quiet and CPU-only.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

TINY: dict[str, Any] = {
    "seed": 7,
    "model": {"name": "tiny", "max_length": 24, "lora_rank": 4, "lora_alpha": 8},
    "data": {"num_train": 240, "num_test": 60, "partition": "iid"},
    "federation": {"num_clients": 3, "clients_per_round": 3, "rounds": 2, "local_steps": 3, "batch_size": 8, "lr": 5e-3},
}


def tiny_config(*overrides: str, output_dir: str | None = None) -> ExperimentConfig:
    """The tiny-transformer experiment used by fast tests, with `section.key=value` overrides."""
    items = list(overrides) + ([f"output.dir={output_dir!r}"] if output_dir else [])
    return config_from_dict(TINY, items)


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


@pytest.fixture
def tiny() -> ExperimentConfig:
    """The tiny experiment config."""
    return tiny_config()


@pytest.fixture
def flower_task():
    """Messages built outside a running Flower app need a task identity (restored after)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
