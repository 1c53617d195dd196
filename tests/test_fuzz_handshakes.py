"""Fuzz: hostile handshakes through `discover_clients`.

Generated query replies (each field present or missing, of any type, huge, NaN, negative,
fractional; records missing, of the wrong kind or extra; shared client ids; errors and silence):
every usable node is in the roster, every other one is left out with its reason, and the only
exception is the one-line FederationError when too few remain.

100 examples in `make test` (FEDLORA_FUZZ_EXAMPLES, as tests/test_fuzz_inputs.py); the longer run:
FEDLORA_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -q tests/test_fuzz_replies.py tests/test_fuzz_handshakes.py
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fedlora.config import FederationConfig
from fedlora.roster import MAX_WHOLE
from fedlora.server import FederationError, discover_clients
from strategies.base import INFO_KEY, METRICS_KEY
from tests.conftest import reply_from
from tests.test_fuzz_inputs import FUZZ
from tests.test_handshake import FEDERATION, HONEST, ODD, HandshakeGrid, handshake, honest_replies
from tests.test_hostile_values import FLOAT32_MAX

pytestmark = pytest.mark.usefixtures("flower_task")  # hand-made messages need a run id

NUM_CLIENTS = 4
FIRST_HANDSHAKE_NODE = 10
MISSING = object()  # a field left out of its record
RECORD_KINDS = {"config": ConfigRecord, "metrics": MetricRecord, "arrays": lambda _: ArrayRecord(), "none": lambda _: None}

WHOLE = st.integers(-3, NUM_CLIENTS + 2) | st.integers(-(2**70), 2**70) | st.sampled_from([MAX_WHOLE, MAX_WHOLE + 1, 2**63])
BEYOND_FLOAT = st.sampled_from([2**1100, -(2**1100)])  # ints no float holds
FIELD_VALUES = st.one_of(
    WHOLE,
    BEYOND_FLOAT,
    WHOLE.map(float),
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, 0.5, -0.0, 1e300, FLOAT32_MAX]),
    st.booleans(),
    st.text(max_size=5),
    st.binary(max_size=4),
    st.lists(st.integers(0, 3), max_size=2),
    st.just(MISSING),
)
EXTRA_FIELDS = st.dictionaries(
    st.text(max_size=6).filter(lambda k: k not in ("client-id", "num-examples")), st.integers() | st.floats(), max_size=2
)
EXTRA_RECORDS = st.dictionaries(
    st.text(max_size=6).filter(lambda k: k not in (INFO_KEY, METRICS_KEY)),
    st.sampled_from([ConfigRecord({"client-id": 0}), MetricRecord({"num-examples": 5}), ArrayRecord()]),
    max_size=2,
)


def handshake_record(data: st.DataObject, field: str, value: object) -> ConfigRecord | MetricRecord | ArrayRecord | None:
    """A record holding `field` (unless MISSING) and extra fields, of a drawn kind; a value a MetricRecord cannot hold goes in a ConfigRecord."""
    fields = data.draw(EXTRA_FIELDS, label=f"{field} extra fields") | ({} if value is MISSING else {field: value})
    kind = data.draw(st.sampled_from(list(RECORD_KINDS)), label=f"{field} record")
    try:
        return RECORD_KINDS[kind](fields)
    except TypeError:  # MetricRecord holds numbers only
        return ConfigRecord(fields)


def declared_whole(value: object, low: int, high: int) -> bool:
    """Whether a handshake value is a number (not a bool), finite, whole and in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return (isinstance(value, int) or (math.isfinite(value) and value == int(value))) and low <= value <= high


def handshake_reply(data: st.DataObject, node: int) -> tuple[Message | None, tuple[int, int] | None]:
    """A node's generated handshake reply (None: silent), and the (client id, count) it validly declares, if it does."""
    kind = data.draw(st.sampled_from(["reply", "error", "silent"]), label=f"node {node}")
    if kind == "silent":
        return None, None
    client = data.draw(st.integers(0, NUM_CLIENTS - 1) | FIELD_VALUES, label="client-id")
    count = data.draw(st.integers(1, 10**6) | FIELD_VALUES, label="num-examples")
    info, metrics = handshake_record(data, "client-id", client), handshake_record(data, "num-examples", count)
    records = data.draw(EXTRA_RECORDS, label="extra records") | {INFO_KEY: info, METRICS_KEY: metrics}
    reply = reply_from(node, RecordDict({k: r for k, r in records.items() if r is not None}), MessageType.QUERY)
    if kind == "error":
        return Message(metadata=reply.metadata, error=Error(code=0, reason="crashed")), None
    readable = all(isinstance(r, (ConfigRecord, MetricRecord)) for r in (info, metrics))
    valid = readable and declared_whole(client, 0, NUM_CLIENTS - 1) and declared_whole(count, 1, MAX_WHOLE)
    return reply, (int(client), int(count)) if valid else None


@FUZZ
@given(nodes=st.integers(1, 7), clients_per_round=st.integers(1, NUM_CLIENTS), data=st.data())
def test_a_hostile_handshake_leaves_its_node_out_with_a_reason_and_the_others_in(
    nodes: int, clients_per_round: int, data: st.DataObject
) -> None:
    node_ids = [FIRST_HANDSHAKE_NODE + k for k in range(nodes)]
    replies, declared = {}, {}
    for node in node_ids:
        reply, declaration = handshake_reply(data, node)
        if reply is not None:
            replies[node] = reply
        if declaration is not None:
            declared[node] = declaration
    claims = Counter(client for client, _ in declared.values())
    usable = {node: d for node, d in declared.items() if claims[d[0]] == 1}  # a shared client id is nobody's
    federation = FederationConfig(num_clients=NUM_CLIENTS, clients_per_round=clients_per_round)
    if len(usable) < clients_per_round:
        with pytest.raises(FederationError) as raised:
            discover_clients(HandshakeGrid(replies), node_ids, federation)
        message_text = str(raised.value)
        assert "\n" not in message_text and f"only {len(usable)} of {nodes} nodes passed the handshake" in message_text
        assert all(f"node {node}: " in message_text for node in set(node_ids) - set(usable))
        return
    roster = discover_clients(HandshakeGrid(replies), node_ids, federation)
    assert roster.clients == {node: client for node, (client, _) in usable.items()}
    assert roster.examples == dict(usable.values())
    assert set(roster.excluded) == set(node_ids) - set(usable)
    assert all(reason.strip() and "\n" not in reason for reason in roster.excluded.values())
    assert all(math.isfinite(weight) for weight in roster.weights("examples", 4.0).values())


@pytest.mark.parametrize(
    ("client", "count"), [(2, 2**1100), (2**1100, 10), (2, 2**53 + 1), (2, 1e300)], ids=["2^1100", "id-2^1100", "2^53+1", "1e300"]
)
def test_a_whole_number_beyond_2_53_leaves_its_node_out_instead_of_raising(client: int, count: float) -> None:
    """Found by this fuzzer: an int beyond float's range raised OverflowError out of the handshake
    (math.isfinite), and a count beyond float32 passed, though each reply repeating it is refused."""
    replies = {**honest_replies(), ODD: handshake(ODD, client, examples=count)}
    roster = discover_clients(HandshakeGrid(replies), [10, 11, ODD], FEDERATION)
    assert roster.clients == HONEST and "must be at most 2^53 in magnitude" in roster.excluded[ODD]
