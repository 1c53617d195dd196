"""The server waits for its SuperNodes out loud, and a simulated federation of the wrong size is one line at once."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from fedlora import server
from fedlora.server import FederationError, node_count_mismatch, wait_for_nodes
from tests.conftest import tiny_config


class SimulatedGrid(InMemoryGrid):
    """The simulation engine's grid, with its nodes given (no engine behind it)."""

    def __init__(self, nodes: list[int]) -> None:  # Flower's own __init__ wants a running state
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class DeployedGrid:
    """A deployment's grid: SuperNodes connect one by one as time passes."""

    def __init__(self, connect_every: float, total: int) -> None:
        self.started, self.every, self.total = time.monotonic(), connect_every, total

    def get_node_ids(self) -> list[int]:
        return list(range(min(self.total, int((time.monotonic() - self.started) / self.every))))


@pytest.fixture
def flower_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    logger = logging.getLogger("flwr")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="flwr")
    yield caplog
    logger.removeHandler(caplog.handler)


def test_a_simulated_federation_of_the_right_size_starts_at_once() -> None:
    federation = tiny_config().federation
    assert wait_for_nodes(SimulatedGrid([11, 7, 5]), federation) == [5, 7, 11]


@pytest.mark.parametrize("nodes", [2, 4])
def test_a_simulated_federation_of_another_size_is_one_error_within_seconds(nodes: int) -> None:
    federation = tiny_config().federation  # 3 clients, 3 a round
    started = time.monotonic()
    with pytest.raises(FederationError) as raised:
        wait_for_nodes(SimulatedGrid(list(range(nodes))), federation, timeout=60)
    assert time.monotonic() - started < server.SIMULATION_SETTLE_SECONDS + 2
    message = str(raised.value)
    assert "\n" not in message and f"has {nodes} SuperNodes" in message and "federation.num_clients = 3" in message
    assert '--federation-config "num-supernodes=3"' in message and f"federation.num_clients={nodes}" in message


def test_the_fix_for_a_smaller_federation_also_shrinks_the_round() -> None:
    federation = tiny_config("federation.min_replies=3").federation
    message = node_count_mismatch(2, federation)
    assert "overrides='federation.num_clients=2;federation.clients_per_round=2;federation.min_replies=2'" in message
    assert "clients_per_round" not in node_count_mismatch(4, federation)  # more nodes: the round still fits


def test_a_deployment_waits_for_its_supernodes_and_says_so(
    flower_log: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server, "WAIT_LOG_SECONDS", 0.5)
    federation = tiny_config().federation
    assert wait_for_nodes(DeployedGrid(connect_every=0.6, total=3), federation, timeout=30) == [0, 1, 2]
    waiting = [r.getMessage() for r in flower_log.records if r.getMessage().startswith("waiting for SuperNodes")]
    assert waiting and waiting[0].startswith("waiting for SuperNodes: 0 of 3 connected")


def test_a_deployment_short_of_supernodes_gives_up_at_its_timeout() -> None:
    federation = tiny_config().federation
    with pytest.raises(FederationError, match=r"only 1 of 3 SuperNodes connected within 2 s .*one SuperNode per client"):
        wait_for_nodes(DeployedGrid(connect_every=0.1, total=1), federation, timeout=2)
