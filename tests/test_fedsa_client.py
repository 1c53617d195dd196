"""FedSA-LoRA on the client: B stays in the client's own state, A alone travels up (tiny model, no Ray)."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from clients.app import KEPT_KEY, handle_evaluate, handle_train, with_kept_factors
from fedlora import workspace
from fedlora.accounting import PrivacyAccounts
from fedlora.checkpoint import Checkpoint
from fedlora.config import ConfigError, ExperimentConfig
from fedlora.lora import LoraState
from fedlora.roster import Roster
from fedlora.server import check_restorable, train_config
from strategies import build_strategy
from tests.conftest import tiny_config
from tests.test_privacy import declared, private_config, train_message

pytestmark = pytest.mark.usefixtures("flower_task")


def num_labels(config: ExperimentConfig) -> int:
    return workspace.federated_task(config).num_labels


def message(config: ExperimentConfig, state: LoraState, server_round: int, keeps: str, lr: float | None = None) -> Message:
    record = train_config(config, num_labels(config))
    record.update({"server-round": server_round, "train-factors": "AB", "keep-factors": keeps, "train-head": True})
    if lr is not None:
        record["lr"] = lr
    return Message(
        RecordDict({"arrays": state.to_array_record(), "config": record}), dst_node_id=1, message_type=MessageType.TRAIN
    )


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(), run_config={})


def sent(reply: Message) -> LoraState:
    return LoraState.from_array_record(reply.content["arrays"])


def kept(client: Context) -> LoraState:
    return LoraState.from_array_record(client.state[KEPT_KEY])


def test_a_client_keeps_its_b_sends_a_alone_and_trains_from_its_own_b_next_round() -> None:
    config = tiny_config()
    broadcast = workspace.initial_state(config, num_labels(config))
    client = context()
    reply = sent(handle_train(message(config, broadcast, 1, keeps="B"), client, config))
    assert {part for parts in reply.factors.values() for part in parts} == {"A"} and reply.head
    own_b = kept(client)
    layer = own_b.layers()[0]
    assert set(own_b.factors[layer]) == {"B"} and torch.any(own_b.factors[layer]["B"] != broadcast.factors[layer]["B"])
    # Round 2 at learning rate 0: the B the client ends with is the B it started from, its own, not the broadcast zeros.
    handle_train(message(config, broadcast, 2, keeps="B", lr=0.0), client, config)
    for layer in own_b.layers():
        torch.testing.assert_close(kept(client).factors[layer]["B"], own_b.factors[layer]["B"])


def test_the_uplink_of_a_client_that_keeps_b_is_half_of_one_that_sends_both() -> None:
    config = tiny_config()
    broadcast = workspace.initial_state(config, num_labels(config))
    both = sent(handle_train(message(config, broadcast, 1, keeps=""), context(), config))
    a_only = sent(handle_train(message(config, broadcast, 1, keeps="B"), context(), config))
    assert a_only.factor_bytes() * 2 == both.factor_bytes() > 0  # the tiny model's adapted layers are square


def test_with_kept_factors_replaces_the_broadcast_b_by_the_clients_own_and_a_fresh_client_takes_the_broadcast() -> None:
    broadcast = LoraState(factors={"l": {"A": torch.ones(2, 3), "B": torch.zeros(3, 2)}}, head={"w": torch.ones(1)})
    fresh = context()
    assert with_kept_factors(broadcast, fresh) is broadcast
    fresh.state[KEPT_KEY] = LoraState(factors={"l": {"B": torch.full((3, 2), 5.0)}}).to_array_record()
    mixed = with_kept_factors(broadcast, fresh)
    assert torch.equal(mixed.factors["l"]["A"], broadcast.factors["l"]["A"]) and torch.equal(mixed.head["w"], torch.ones(1))
    assert torch.equal(mixed.factors["l"]["B"], torch.full((3, 2), 5.0))


def test_a_client_evaluates_its_own_b_with_the_broadcast_a() -> None:
    config = tiny_config("evaluation.clients=1")
    broadcast = workspace.initial_state(config, num_labels(config))
    client = context()
    handle_train(message(config, broadcast, 1, keeps="B", lr=0.05), client, config)
    evaluation = Message(
        RecordDict(
            {"arrays": broadcast.to_array_record(), "config": ConfigRecord({"server-round": 1, "num-labels": num_labels(config)})}
        ),
        dst_node_id=1,
        message_type=MessageType.EVALUATE,
    )
    own = handle_evaluate(evaluation, client, config).content["metrics"]["loss"]
    without = handle_evaluate(evaluation, context(), config).content["metrics"]["loss"]
    assert own != without  # B_0 = 0 adds nothing: only the client's own B changes the loss


def test_under_dp_a_client_trains_both_factors_privately_keeps_b_and_sends_a() -> None:
    config = private_config()
    accounts = PrivacyAccounts.for_run(config, declared(config))
    train = train_message(config, accounts, 0, 1)
    train.content["config"]["keep-factors"] = "B"
    client = context()
    reply = handle_train(train, client, config)
    assert "refused" not in reply.content["metrics"] and reply.content["metrics"]["dp-steps"] == config.federation.local_steps
    assert {part for parts in sent(reply).factors.values() for part in parts} == {"A"}
    own_b = kept(client)
    assert any(torch.any(parts["B"] != 0) for parts in own_b.factors.values())  # B trained (under DP) and kept


@pytest.mark.parametrize(
    ("strategy", "after_round", "refused"), [("fedsa_lora", 1, True), ("fedsa_lora", 0, False), ("fedit", 1, False)]
)
def test_a_resume_that_could_not_restore_the_clients_own_b_is_refused(tmp_path, strategy, after_round, refused) -> None:
    config = tiny_config(f"strategy.name={strategy!r}")
    built = build_strategy(config, Roster({n: n for n in range(3)}, dict.fromkeys(range(3), 10)))
    checkpoint = Checkpoint(round=after_round, tensors={})
    if refused:
        with pytest.raises(ConfigError, match="keep their own B between rounds"):
            check_restorable(built, checkpoint, tmp_path)
    else:
        check_restorable(built, checkpoint, tmp_path)
