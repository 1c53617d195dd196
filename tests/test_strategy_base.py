"""LoraStrategy plumbing: replies are validated before any math, and the round goes on."""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedlora.lora import LoraState
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY
from strategies.fedit import FedIT
from tests.conftest import reply_from

pytestmark = pytest.mark.usefixtures("flower_task")

NODES = {101: 0, 102: 1, 103: 2, 104: 3}


def global_state() -> LoraState:
    g = torch.Generator().manual_seed(0)
    return LoraState(
        factors={f"layer{i}": {"A": torch.randn(2, 5, generator=g), "B": torch.randn(6, 2, generator=g)} for i in range(2)},
        head={"classifier.weight": torch.randn(3, 6, generator=g), "classifier.bias": torch.zeros(3)},
    )


def client_reply(node: int, state: LoraState, num_examples: int = 10) -> Message:
    content = RecordDict(
        {
            ARRAYS_KEY: state.to_array_record(),
            METRICS_KEY: MetricRecord({"num-examples": num_examples, "train-loss": 1.0}),
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


def start_round(strategy: FedIT) -> None:
    messages = list(strategy.configure_train(1, global_state().to_array_record(), ConfigRecord(), grid=None))
    assert len(messages) == strategy.clients_per_round
    assert messages[0].content["config"]["train-factors"] == "AB"


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
    cases["client error"] = Message(metadata=client_reply(104, perturbed(3)).metadata, error=Error(code=0, reason="boom"))
    cases["num-examples"] = client_reply(104, perturbed(3), num_examples=0)
    return cases


@pytest.mark.parametrize("defect", list(broken_replies()))
def test_a_broken_reply_is_refused_with_its_reason_and_the_round_goes_on(defect: str) -> None:
    strategy = FedIT(NODES, clients_per_round=4, seed=0)
    start_round(strategy)
    good = [client_reply(101, perturbed(0), 10), client_reply(102, perturbed(1), 30), client_reply(103, perturbed(2), 60)]
    broken = broken_replies()[defect]
    arrays, metrics = strategy.aggregate_train(1, good + [broken])
    rejected = strategy.last_round.rejected
    assert len(rejected) == 1 and defect.lower() in str(rejected[0]["reason"]).lower()
    assert arrays is not None and metrics["num-replies"] == 3
    # The aggregate is exactly the weighted mean of the valid replies.
    new = LoraState.from_array_record(arrays)
    weights = torch.tensor([10, 30, 60], dtype=torch.float64) / 100
    for layer in ("layer0", "layer1"):
        for part in "AB":
            expected = sum(w * perturbed(i).factors[layer][part].double() for i, w in enumerate(weights.tolist()))
            torch.testing.assert_close(new.factors[layer][part].double(), expected, rtol=1e-6, atol=1e-6)


def test_too_few_valid_replies_skip_the_round() -> None:
    strategy = FedIT(NODES, clients_per_round=2, min_replies=2, seed=0)
    start_round(strategy)
    nan = perturbed(1)
    nan.factors["layer0"]["A"][0, 0] = math.nan
    arrays, _ = strategy.aggregate_train(1, [client_reply(101, perturbed(0)), client_reply(102, nan)])
    assert arrays is None and strategy.last_round.skipped


def test_sampling_is_seeded_by_round_and_independent_of_node_ids() -> None:
    a = FedIT(NODES, clients_per_round=2, seed=3)
    b = FedIT({n + 1000: c for n, c in NODES.items()}, clients_per_round=2, seed=3)
    for server_round in range(1, 6):
        assert [a.clients[n] for n in a.sample_clients(server_round)] == [b.clients[n] for n in b.sample_clients(server_round)]


def test_bytes_are_counted_up_and_down() -> None:
    strategy = FedIT(NODES, clients_per_round=2, seed=0)
    start_round(strategy)
    state = perturbed(0)
    strategy.aggregate_train(1, [client_reply(101, state), client_reply(102, perturbed(1))])
    assert strategy.last_round.bytes_up_factors == 2 * state.factor_bytes()
    assert strategy.last_round.bytes_up == 2 * state.num_bytes()
    assert strategy.last_round.bytes_down == 2 * global_state().num_bytes()
