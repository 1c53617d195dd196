"""Threads by resource share: the ServerApp and each client use the cores their resources give them."""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict

from clients.app import build_client_app
from fedlora import server, threads
from tests.conftest import tiny_config

CORES = 8  # what the tests pretend this process may run on


@pytest.fixture(autouse=True)
def eight_cores(monkeypatch: pytest.MonkeyPatch):
    """A process owning CORES cores; torch's thread count restored after."""
    saved = torch.get_num_threads()
    monkeypatch.setattr(threads, "cores_owned", lambda: CORES)
    yield
    torch.set_num_threads(saved)


def fake_ray(monkeypatch: pytest.MonkeyPatch, cpus: float | None) -> None:
    """This process as a Ray actor granted `cpus` CPUs, or (None) as the driver that started
    Ray, which has no grant: there Ray refuses to say, as the real one does."""

    def assigned_resources() -> dict[str, float]:
        if cpus is None:
            raise AssertionError("This method is only available when the process is a worker.")
        return {"CPU": cpus}

    context = types.SimpleNamespace(
        get_assigned_resources=assigned_resources, get_actor_id=lambda: None if cpus is None else "actor-1"
    )
    ray = types.SimpleNamespace(is_initialized=lambda: True, get_runtime_context=lambda: context)
    monkeypatch.setitem(sys.modules, "ray", ray)


@pytest.mark.parametrize(("share", "expected"), [(0.5, 1), (1, 1), (3, 3), (3.7, 3), (64, CORES)])
def test_a_share_is_its_whole_cores_at_least_one_at_most_those_owned(share: float, expected: int) -> None:
    assert threads.thread_count(share) == expected
    assert threads.thread_env(share) == dict.fromkeys(threads.THREAD_ENV, str(expected))


@pytest.mark.usefixtures("flower_task")
@pytest.mark.parametrize(("granted", "expected"), [("no ray", CORES), ("ray's driver", CORES), (0.5, 1), (2, 2), (3, 3)])
def test_a_client_uses_the_cpus_ray_gave_its_actor_or_on_a_node_every_core(monkeypatch, granted, expected) -> None:
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    if granted != "no ray":
        fake_ray(monkeypatch, None if granted == "ray's driver" else granted)
    torch.set_num_threads(5)
    app = build_client_app(tiny_config())
    context = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 3}, state=RecordDict(), run_config={}
    )
    reply = app(Message(RecordDict(), dst_node_id=1, message_type=MessageType.QUERY), context)
    assert not reply.has_error()
    assert torch.get_num_threads() == expected


@pytest.mark.parametrize(("server_cpus", "expected"), [(1, 1), (2, 2), (0.5, 1), (64, CORES)])
def test_the_server_app_uses_federation_server_cpus(monkeypatch, tmp_path: Path, server_cpus: float, expected: int) -> None:
    seen: list[int] = []

    class Recorder:  # stands for the round loop: what matters is the threads it runs with
        def __init__(self, *args: object) -> None:
            pass

        def run(self) -> dict:
            seen.append(torch.get_num_threads())
            return {}

    monkeypatch.setattr(server, "Federation", Recorder)
    torch.set_num_threads(5)
    server.run_federation(None, tiny_config(f"federation.server_cpus={server_cpus}"), tmp_path / "run")
    assert seen == [expected]


def test_a_fresh_process_sizes_the_inter_op_pool_too() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; from fedlora.threads import use_threads; use_threads(1);"
            " print(torch.get_num_threads(), torch.get_num_interop_threads())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["1", "1"]
