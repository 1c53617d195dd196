"""The handshake: a node whose reply is unusable is left out with its reason, the others federate."""

from __future__ import annotations

import math

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from fedlora.config import FederationConfig
from fedlora.lora import LoraState
from fedlora.roster import client_id_problem
from fedlora.server import FederationError, discover_clients
from strategies import build_strategy
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY
from tests.conftest import reply_from, tiny_config
from tests.test_federation_size import flower_log  # noqa: F401  (a fixture)
from tests.test_hetero_strategies import initial

pytestmark = pytest.mark.usefixtures("flower_task")  # messages need a run id

FEDERATION = FederationConfig(num_clients=3, clients_per_round=2)
HONEST = {10: 0, 11: 1}  # node id -> client id; node 12 is the one under test
ODD = 12


class HandshakeGrid:
    """Answers the handshake's queries with the replies given per node (a node without one stays silent)."""

    def __init__(self, replies: dict[int, Message]) -> None:
        self.replies = replies

    def send_and_receive(self, messages: list[Message], timeout: float) -> list[Message]:
        assert all(m.metadata.message_type == MessageType.QUERY for m in messages)
        return [self.replies[m.metadata.dst_node_id] for m in messages if m.metadata.dst_node_id in self.replies]


def handshake(
    node: int, client: object = None, examples: object = 10, records: tuple[str, ...] = (INFO_KEY, METRICS_KEY)
) -> Message:
    """A node's handshake reply; `client` None leaves client-id out, `examples` None leaves num-examples out."""
    info = ConfigRecord({} if client is None else {"client-id": client})
    metrics = MetricRecord({} if examples is None else {"num-examples": examples})
    content = RecordDict({key: record for key, record in ((INFO_KEY, info), (METRICS_KEY, metrics)) if key in records})
    return reply_from(node, content, MessageType.QUERY)


def honest_replies() -> dict[int, Message]:
    return {node: handshake(node, client) for node, client in HONEST.items()}


ODD_REPLIES = {
    "no info record": (handshake(ODD, 2, records=(METRICS_KEY,)), "no 'info' record"),
    "no metrics record": (handshake(ODD, 2, records=(INFO_KEY,)), "no 'metrics' record"),
    "no client-id": (handshake(ODD, None), "client-id is missing"),
    "no num-examples": (handshake(ODD, 2, examples=None), "num-examples is missing"),
    "client-id 'two'": (handshake(ODD, "two"), "client-id must be a number, got 'two'"),
    "client-id 2.7": (handshake(ODD, 2.7), "client-id must be a whole number, got 2.7"),
    "client-id True": (handshake(ODD, True), "client-id must be a number, got True"),
    "client-id 99": (handshake(ODD, 99), "client-id must be one of the federation's, 0..2, got 99"),
    "client-id -1": (handshake(ODD, -1), "client-id must be one of the federation's, 0..2, got -1"),
    "client-id NaN": (handshake(ODD, math.nan), "client-id must be finite"),
    "NaN count": (handshake(ODD, 2, examples=math.nan), "num-examples must be finite"),
    # A MetricRecord holds numbers only; a ConfigRecord in its place can carry a string.
    "string count": (
        reply_from(
            ODD, RecordDict({INFO_KEY: ConfigRecord({"client-id": 2}), METRICS_KEY: ConfigRecord({"num-examples": "10"})})
        ),
        "num-examples must be a number, got '10'",
    ),
    "metrics of the wrong kind": (
        reply_from(ODD, RecordDict({INFO_KEY: ConfigRecord({"client-id": 2}), METRICS_KEY: ArrayRecord()})),
        "no 'metrics' record",
    ),
    "an error reply": (
        Message(metadata=handshake(ODD, 2).metadata, error=Error(code=0, reason="client app crashed")),
        "its handshake failed: client app crashed",
    ),
}


@pytest.mark.usefixtures("flower_log")
@pytest.mark.parametrize("case", ODD_REPLIES)
def test_an_unusable_handshake_leaves_that_node_out_with_its_reason_and_the_others_in(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    reply, reason = ODD_REPLIES[case]
    roster = discover_clients(HandshakeGrid({**honest_replies(), ODD: reply}), [10, 11, ODD], FEDERATION)
    assert roster.clients == HONEST and roster.examples == {0: 10, 1: 10}
    assert list(roster.excluded) == [ODD] and reason in roster.excluded[ODD]
    assert f"node {ODD} left out of the federation: {roster.excluded[ODD]}" in caplog.text


def test_every_node_claiming_one_client_id_is_left_out() -> None:
    replies = {**honest_replies(), ODD: handshake(ODD, 1), 13: handshake(13, 2)}
    roster = discover_clients(HandshakeGrid(replies), [10, 11, ODD, 13], FEDERATION)
    # Neither claimant of client 1 is kept: the server cannot tell which one is that client.
    assert roster.clients == {10: 0, 13: 2}
    assert set(roster.excluded) == {11, ODD}
    assert all("client-id 1 is claimed by nodes 11, 12" in reason for reason in roster.excluded.values())


def test_a_silent_node_is_left_out_and_a_whole_float_id_is_that_client() -> None:
    replies = {10: handshake(10, 0), 11: handshake(11, 1.0, examples=20.0)}
    roster = discover_clients(HandshakeGrid(replies), [10, 11, ODD], FEDERATION, timeout=5)
    assert roster.clients == HONEST and roster.examples == {0: 10, 1: 20}
    assert roster.excluded == {ODD: "no handshake reply within 5 s"}


def test_too_few_usable_nodes_end_the_run_in_one_line_naming_each_reason() -> None:
    replies = {10: handshake(10, 0), 11: handshake(11, 99), ODD: handshake(ODD, 2, examples=-4)}
    with pytest.raises(FederationError) as raised:
        discover_clients(HandshakeGrid(replies), [10, 11, ODD], FEDERATION)
    message = str(raised.value)
    assert "\n" not in message and "only 1 of 3 nodes passed the handshake" in message
    assert "federation.clients_per_round = 2" in message
    assert "node 11: client-id must be one of the federation's" in message and "node 12: num-examples must be" in message


@pytest.mark.parametrize("bad_id", [99, -1])
def test_a_node_with_a_foreign_client_id_never_reaches_a_mixed_rank_round(bad_id: int) -> None:
    # Before: 99 was in the roster and round 1 failed with a KeyError; -1 took client 2's rank.
    config = tiny_config("strategy.name='flexlora'", "model.client_ranks=[2, 4, 4]", "federation.clients_per_round=2")
    replies = {**honest_replies(), ODD: handshake(ODD, bad_id)}
    roster = discover_clients(HandshakeGrid(replies), [10, 11, ODD], config.federation)
    assert roster.clients == HONEST
    strategy = build_strategy(config, roster)
    messages = list(strategy.configure_train(1, initial(rank=4).to_array_record(), ConfigRecord(), grid=None))
    sent = {m.metadata.dst_node_id: LoraState.from_array_record(m.content[ARRAYS_KEY]) for m in messages}
    assert {node: state.factors["l0"]["A"].shape[0] for node, state in sent.items()} == {10: 2, 11: 4}


@pytest.mark.parametrize("value", [0, 2, 2.0])
def test_the_federation_s_own_client_ids_are_accepted(value: object) -> None:
    assert client_id_problem(value, 3) is None
