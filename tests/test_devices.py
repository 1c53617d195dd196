"""The CUDA path's logic, on CPU: which device each side uses, memory handed back, resources asked of Ray."""

from __future__ import annotations

import types

import pytest
import torch
from flwr.app import Context, RecordDict

from clients import app as client_app
from fedlora import node, workspace
from fedlora.config import ConfigError
from fedlora.node import client_device, node_experiment, server_device
from fedlora.simulation import backend_config
from tests.conftest import tiny_config


def fake_cuda(monkeypatch: pytest.MonkeyPatch, devices: int) -> None:
    """torch as if it saw `devices` CUDA devices."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)


def test_a_simulated_client_given_a_gpu_share_trains_on_it_and_ray_is_asked_for_that_share() -> None:
    shared = tiny_config("federation.client_gpus=0.1", "federation.client_cpus=2")
    assert client_device(shared) == "cuda"
    assert client_device(tiny_config()) is None
    assert backend_config(shared)["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.1}
    # A deployed node's own device wins over the simulation's share.
    assert client_device(node_experiment(shared, {"device": "cpu", "partition-id": 0, "num-partitions": 3})) == "cpu"


def test_the_server_evaluates_on_federation_server_device(monkeypatch) -> None:
    assert server_device(tiny_config()) is None
    fake_cuda(monkeypatch, 1)
    assert server_device(tiny_config("federation.server_device='cuda'")) == "cuda"
    assert server_device(tiny_config("federation.server_device='auto'")) == "cuda"
    with pytest.raises(ConfigError, match=r"federation.server_device='cuda:1': the server's machine has 1 CUDA device"):
        server_device(tiny_config("federation.server_device='cuda:1'"))
    fake_cuda(monkeypatch, 0)
    assert server_device(tiny_config("federation.server_device='auto'")) is None
    with pytest.raises(ConfigError, match=r"federation.server_device='cuda': torch .* sees no CUDA device on the server's"):
        server_device(tiny_config("federation.server_device='cuda'"))
    with pytest.raises(ConfigError, match="federation.server_device='gpu': not a torch device"):
        server_device(tiny_config("federation.server_device='gpu'"))


def test_client_and_server_models_are_built_on_their_own_devices(monkeypatch) -> None:
    fake_cuda(monkeypatch, 1)
    built: list[str | None] = []
    monkeypatch.setattr(workspace, "_lora_model", lambda model_json, num_labels, seed, device: built.append(device))
    config = tiny_config("federation.client_gpus=0.5", "federation.server_device='cpu'")
    workspace.lora_model(config, 8)
    workspace.server_model(config, 8)
    workspace.server_model(tiny_config("federation.server_device='cuda'"), 8)
    assert built == ["cuda", None, "cuda"]


def model_on(device: str) -> types.SimpleNamespace:
    """Stands for a model whose parameters live on `device` (no CUDA tensor can exist here)."""
    return types.SimpleNamespace(parameters=lambda: iter([types.SimpleNamespace(device=torch.device(device))]))


def test_a_gpu_client_hands_its_cached_memory_back_after_its_round(monkeypatch) -> None:
    emptied: list[bool] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    workspace.release_device_memory(model_on("cpu"))
    assert emptied == []
    workspace.release_device_memory(model_on("cuda"))
    assert emptied == [True]


@pytest.mark.usefixtures("flower_task")
def test_the_train_handler_releases_the_device_memory_once_it_has_trained(monkeypatch) -> None:
    from tests.test_deploy import first_train_message

    released: list[object] = []
    monkeypatch.setattr(workspace, "release_device_memory", released.append)
    config = tiny_config()
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={}
    )
    reply = client_app.handle_train(first_train_message(config), context, config)
    assert not reply.has_error() and reply.content["metrics"]["train-steps"] > 0
    assert released == [workspace.lora_model(config, workspace.federated_task(config).num_labels)]


def test_node_devices_keep_their_messages() -> None:
    with pytest.raises(ConfigError, match="node config device='gpu': not a torch device"):
        node.resolve_device("gpu")
