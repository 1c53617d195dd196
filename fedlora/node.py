"""What a SuperNode's node config says about the client it runs.

Keys (set with `flower-supernode --node-config "..."`, or `fedlora deploy supernode`):

    data-path       this device's own examples: a .csv / .jsonl / .json / .parquet file or a
                    folder written by `datasets.Dataset.save_to_disk`; the node trains and
                    evaluates on all of them
                    (the server keeps the held-out split). Without it the node uses its partition
                    of the experiment's data, as in simulation.
    client-id       which client the node is: unique, 0..num_clients-1 (or partition-id)
    partition-id    its partition of the experiment's data; num-partitions must then equal
                    federation.num_clients
    device          torch device it trains on: cpu (default), cuda, cuda:1, mps, or auto (cuda
                    when there is one)

In simulation nodes only have partition-id / num-partitions and the experiment passes through
unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, ExperimentConfig

DATA_PATH, DEVICE, CLIENT_ID, PARTITION_ID, NUM_PARTITIONS = "data-path", "device", "client-id", "partition-id", "num-partitions"


class NodeExperiment(ExperimentConfig):
    """An experiment as one deployed node runs it: on its own data set and device."""

    node_data_path: str | None = None
    node_device: str | None = None

    def shared(self) -> ExperimentConfig:
        """The experiment every node and the server share, without this node's settings."""
        return ExperimentConfig.model_validate(self.model_dump(exclude={"node_data_path", "node_device"}))


def shared_experiment(config: ExperimentConfig) -> ExperimentConfig:
    """The experiment without any node's settings."""
    return config.shared() if isinstance(config, NodeExperiment) else config


def node_experiment(experiment: ExperimentConfig, node_config: Mapping[str, Any]) -> ExperimentConfig:
    """The experiment with this node's data set and device, checked against its federation."""
    num_clients = experiment.federation.num_clients
    if NUM_PARTITIONS in node_config and int(node_config[NUM_PARTITIONS]) != num_clients:
        raise ConfigError(
            f"node config num-partitions={node_config[NUM_PARTITIONS]} but the experiment has "
            f"federation.num_clients={num_clients}: start that many nodes and make them agree"
        )
    for key in (CLIENT_ID, PARTITION_ID):
        if key in node_config and not 0 <= int(node_config[key]) < num_clients:
            raise ConfigError(
                f"node config {key}={node_config[key]}: must be 0..{num_clients - 1} (federation.num_clients={num_clients})"
            )
    data_path = node_config.get(DATA_PATH)
    device = node_config.get(DEVICE)
    if data_path is None and device is None:
        return experiment
    if data_path is not None:
        if CLIENT_ID not in node_config and PARTITION_ID not in node_config:
            raise ConfigError("node config has data-path but no client-id: give each node a unique client-id 0..num_clients-1")
        if not Path(str(data_path)).expanduser().exists():
            raise ConfigError(f"node config data-path: {data_path} does not exist on this node")
        data_path = str(Path(str(data_path)).expanduser())
    return NodeExperiment.model_validate(
        {**shared_experiment(experiment).model_dump(), "node_data_path": data_path, "node_device": resolve_device(device)}
    )


def resolve_device(device: object, key: str = "node config device", machine: str = "this node") -> str | None:
    """A torch device name this machine can use; None for the default (CPU). `key` names the setting in errors."""
    if device is None:
        return None
    import torch

    name = str(device).strip().lower()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"{key}={device!r}: not a torch device (cpu, cuda, cuda:1, mps, auto)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"{key}={device!r}: torch {torch.__version__} sees no CUDA device on {machine} "
                "(install a CUDA build of torch, or use device='cpu')"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}={device!r}: {machine} has {torch.cuda.device_count()} CUDA device(s)")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{key}={device!r}: MPS is not available on {machine}")
    return str(parsed)


def node_device(config: ExperimentConfig) -> str | None:
    """The device this node trains on, None for the default."""
    return config.node_device if isinstance(config, NodeExperiment) else None


def client_device(config: ExperimentConfig) -> str | None:
    """The device a client trains on: a deployed node's own (node config device), else the GPU
    when the client was given a share of one (federation.client_gpus > 0: Ray shows the actor
    only its GPU, so "cuda" is that one), else None (CPU)."""
    if isinstance(config, NodeExperiment) and config.node_device is not None:
        return config.node_device
    return "cuda" if config.federation.client_gpus > 0 else None


def server_device(config: ExperimentConfig) -> str | None:
    """The device the server evaluates on (federation.server_device), None for CPU."""
    device = resolve_device(config.federation.server_device, "federation.server_device", "the server's machine")
    return None if device == "cpu" else device


def node_data_path(config: ExperimentConfig) -> Path | None:
    """This node's own data set, if it has one."""
    if isinstance(config, NodeExperiment) and config.node_data_path:
        return Path(config.node_data_path)
    return None
