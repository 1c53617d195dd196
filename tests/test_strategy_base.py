"""LoraStrategy plumbing: replies are validated before any math, weights are the server's, and the round goes on."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedlora.lora import LoraState
from fedlora.roster import Roster
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY
from strategies.fedit import FedIT
from tests.conftest import reply_from

pytestmark = pytest.mark.usefixtures("flower_task")

NODES = {101: 0, 102: 1, 103: 2, 104: 3}
DECLARED = {0: 10, 1: 30, 2: 60, 3: 10}  # examples each client declared at the handshake
ROSTER = Roster(NODES, DECLARED)


def global_state() -> LoraState:
    g = torch.Generator().manual_seed(0)
    return LoraState(
        factors={f"layer{i}": {"A": torch.randn(2, 5, generator=g), "B": torch.randn(6, 2, generator=g)} for i in range(2)},
        head={"classifier.weight": torch.randn(3, 6, generator=g), "classifier.bias": torch.zeros(3)},
    )


def client_reply(
    node: int, state: LoraState, num_examples: float | None = None, train_loss: float = 1.0, train_seconds: float = 0.0
) -> Message:
    """A well-formed reply; num_examples defaults to what the node's client declared."""
    declared = DECLARED.get(NODES.get(node, -1), 10)
    content = RecordDict(
        {
            ARRAYS_KEY: state.to_array_record(),
            METRICS_KEY: MetricRecord(
                {
                    "num-examples": declared if num_examples is None else num_examples,
                    "train-loss": train_loss,
                    "train-seconds": train_seconds,
                }
            ),
            INFO_KEY: ConfigRecord({"a-digest": "x"}),
        }
    )
    return reply_from(node, content)


def perturbed(seed: int) -> LoraState:
    state = global_state().clone()
    g = torch.Generator().manual_seed(seed)
    for parts in state.factors.values():
        for name in parts:
            parts[name] += torch.randn(parts[name].shape, generator=g)
    return state


def start_round(strategy: FedIT, server_round: int = 1) -> list[int]:
    """Send round `server_round`'s train messages; the node ids they went to."""
    messages = list(strategy.configure_train(server_round, global_state().to_array_record(), ConfigRecord(), grid=None))
    assert len(messages) == strategy.clients_per_round
    assert messages[0].content["config"]["train-factors"] == "AB"
    return [m.metadata.dst_node_id for m in messages]


def broken_replies() -> dict[str, Message]:
    """One reply per kind of defect, each from node 104 (client 3)."""
    cases: dict[str, Message] = {}
    missing = perturbed(3)
    del missing.factors["layer1"]
    cases["wrong layers"] = client_reply(104, missing)
    b_only = perturbed(3).select("B", head=True)
    cases["sent factors"] = client_reply(104, b_only)
    shape = perturbed(3)
    shape.factors["layer0"]["A"] = torch.zeros(3, 5)
    cases["shape"] = client_reply(104, shape)
    dtype = perturbed(3)
    dtype.factors["layer0"]["B"] = dtype.factors["layer0"]["B"].double()
    cases["dtype"] = client_reply(104, dtype)
    nan = perturbed(3)
    nan.factors["layer1"]["B"][0, 0] = math.nan
    cases["NaN"] = client_reply(104, nan)
    inf = perturbed(3)
    inf.head["classifier.bias"][1] = math.inf
    cases["Inf"] = client_reply(104, inf)
    huge = perturbed(3)
    huge.factors["layer0"]["A"][1, 2] = 1e6  # finite, but beyond what the aggregation can take
    cases["exceeds the bound"] = client_reply(104, huge)
    cases["client error"] = Message(metadata=client_reply(104, perturbed(3)).metadata, error=Error(code=0, reason="boom"))
    cases["num-examples 0"] = client_reply(104, perturbed(3), num_examples=0)
    cases["num-examples 1e12"] = client_reply(104, perturbed(3), num_examples=1e12)
    cases["num-examples -5"] = client_reply(104, perturbed(3), num_examples=-5)
    cases["metric num-examples is not a finite number (got inf)"] = client_reply(104, perturbed(3), num_examples=math.inf)
    cases["metric num-examples is not a finite number (got nan)"] = client_reply(104, perturbed(3), num_examples=math.nan)
    cases["metric train-loss is not a finite number"] = client_reply(104, perturbed(3), train_loss=math.nan)
    cases["metric train-loss is too large to aggregate"] = client_reply(104, perturbed(3), train_loss=1e308)
    return cases


@pytest.mark.parametrize("defect", list(broken_replies()))
def test_a_broken_reply_is_refused_with_its_reason_and_the_round_goes_on(defect: str) -> None:
    strategy = FedIT(ROSTER, clients_per_round=4, seed=0)
    start_round(strategy)
    good = [client_reply(101, perturbed(0)), client_reply(102, perturbed(1)), client_reply(103, perturbed(2))]
    broken = broken_replies()[defect]
    arrays, metrics = strategy.aggregate_train(1, good + [broken])
    rejected = strategy.last_round.rejected
    assert len(rejected) == 1 and defect.split(" ")[0].lower() in str(rejected[0]["reason"]).lower()
    assert arrays is not None and metrics["num-replies"] == 3
    # The aggregate is exactly the weighted mean of the valid replies.
    new = LoraState.from_array_record(arrays)
    weights = torch.tensor([10, 30, 60], dtype=torch.float64) / 100
    for layer in ("layer0", "layer1"):
        for part in "AB":
            expected = sum(w * perturbed(i).factors[layer][part].double() for i, w in enumerate(weights.tolist()))
            torch.testing.assert_close(new.factors[layer][part].double(), expected, rtol=1e-6, atol=1e-6)


def test_too_few_valid_replies_skip_the_round() -> None:
    strategy = FedIT(ROSTER, clients_per_round=2, min_replies=2, seed=0)
    first, second = start_round(strategy)
    nan = perturbed(1)
    nan.factors["layer0"]["A"][0, 0] = math.nan
    arrays, _ = strategy.aggregate_train(1, [client_reply(first, perturbed(0)), client_reply(second, nan)])
    assert arrays is None and strategy.last_round.skipped


def test_sampling_is_seeded_by_round_and_independent_of_node_ids() -> None:
    a = FedIT(ROSTER, clients_per_round=2, seed=3)
    b = FedIT(Roster({n + 1000: c for n, c in NODES.items()}, DECLARED), clients_per_round=2, seed=3)
    for server_round in range(1, 6):
        assert [a.clients[n] for n in a.sample_clients(server_round)] == [b.clients[n] for n in b.sample_clients(server_round)]


def test_bytes_are_counted_up_and_down() -> None:
    strategy = FedIT(ROSTER, clients_per_round=2, seed=0)
    first, second = start_round(strategy)
    state = perturbed(0)
    strategy.aggregate_train(1, [client_reply(first, state), client_reply(second, perturbed(1))])
    assert strategy.last_round.bytes_up_factors == 2 * state.factor_bytes()
    assert strategy.last_round.bytes_up == 2 * state.num_bytes()
    assert strategy.last_round.bytes_down == 2 * global_state().num_bytes()


def test_train_seconds_count_valid_replies_only_each_within_the_rounds_wall_time() -> None:
    strategy = FedIT(ROSTER, clients_per_round=3, seed=0)
    first, second, third = start_round(strategy)
    strategy._sent_at -= 10.0  # the round has been out for 10 s
    replies = [
        client_reply(first, perturbed(0), train_seconds=0.5),
        client_reply(second, perturbed(1), train_seconds=1e30),  # a lie: longer than the round itself
        client_reply(third, perturbed(2), num_examples=7, train_seconds=100.0),  # refused: its seconds do not count
    ]
    strategy.aggregate_train(1, replies)
    round_log = strategy.last_round
    assert round_log.accepted == sorted([NODES[first], NODES[second]]) and 10.0 <= round_log.client_seconds < 60.0
    assert round_log.train_seconds == pytest.approx(0.5 + round_log.client_seconds)


def test_duplicate_unknown_and_unsampled_replies_are_refused_and_the_valid_ones_aggregated() -> None:
    strategy = FedIT(ROSTER, clients_per_round=3, seed=0)
    sampled = start_round(strategy)
    unsampled = next(node for node in NODES if node not in sampled)
    valid = [client_reply(node, perturbed(i)) for i, node in enumerate(sampled)]
    crafted = [
        client_reply(sampled[0], perturbed(7)),  # the same node again: a second reply
        client_reply(sampled[0], perturbed(8)),  # and a third
        client_reply(999, perturbed(9)),  # a node the handshake never saw
        client_reply(unsampled, perturbed(10)),  # a member not asked this round
    ]
    arrays, metrics = strategy.aggregate_train(1, valid[:1] + crafted + valid[1:])
    reasons = [str(r["reason"]) for r in strategy.last_round.rejected]
    assert sum("second reply" in r for r in reasons) == 2
    assert any("node 999" in r and "not in the federation" in r for r in reasons)
    assert any(f"client {NODES[unsampled]}" in r and "not sampled" in r for r in reasons)
    assert strategy.last_round.accepted == sorted(NODES[n] for n in sampled) and metrics["num-replies"] == 3
    # Exactly the three first replies, under the declared weights.
    weights = torch.tensor([DECLARED[NODES[n]] for n in sampled], dtype=torch.float64)
    weights /= weights.sum()
    new = LoraState.from_array_record(arrays)
    expected = sum(w * perturbed(i).factors["layer0"]["B"].double() for i, w in enumerate(weights.tolist()))
    torch.testing.assert_close(new.factors["layer0"]["B"].double(), expected, rtol=1e-6, atol=1e-6)


def test_weights_come_from_the_declarations_capped_at_the_ratio() -> None:
    roster = Roster.of({0: 100, 1: 100, 2: 100, 3: 10_000})
    assert roster.weights("examples", max_ratio=4.0) == {0: 100.0, 1: 100.0, 2: 100.0, 3: 400.0}
    assert roster.weights("examples", max_ratio=None)[3] == 10_000.0
    assert set(roster.weights("uniform").values()) == {1.0}
