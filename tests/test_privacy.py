"""DP-SGD clients: accounting composes across rounds, budgets are enforced, training is real."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, Message, MessageType, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from clients.app import handle_train
from clients.trainer import TrainPlan, poisson_sample_rate, train_local_private
from fedlora import workspace
from fedlora.config import ExperimentConfig
from fedlora.lora import LoraState
from fedlora.privacy import PrivacyLedger
from fedlora.server import dp_settings, train_config
from tests.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("flower_task")


def train_message(config: ExperimentConfig, state: LoraState, server_round: int, trains: str = "AB") -> Message:
    record = train_config(config, workspace.federated_task(config).num_labels)
    record.update({"server-round": server_round, "train-factors": trains, "train-head": config.model.train_head})
    content = RecordDict({"arrays": state.to_array_record(), "config": record})
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def client_context(client_id: int = 0) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": client_id}, state=RecordDict(), run_config={})


def private_config(*overrides: str) -> ExperimentConfig:
    return tiny_config("privacy.enabled=true", "privacy.epsilon=3.0", "federation.rounds=3", *overrides)


def initial(config: ExperimentConfig) -> LoraState:
    return workspace.initial_state(config, workspace.federated_task(config).num_labels)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_composes_over_rounds_and_matches_opacus_accountant(accountant: str) -> None:
    config = private_config(f"privacy.accountant={accountant!r}")
    context, state = client_context(), initial(config)
    epsilons = []
    for server_round in (1, 2, 3):
        reply = handle_train(train_message(config, state, server_round), context, config)
        metrics = reply.content["metrics"]
        assert "refused" not in metrics
        epsilons.append(float(metrics["epsilon"]))
        # Opacus' own accountant fed the same history the client reports.
        reference = {"prv": PRVAccountant, "rdp": RDPAccountant}[accountant]()
        rounds_so_far = server_round * config.federation.local_steps
        reference.history = [(float(metrics["noise-multiplier"]), float(metrics["sample-rate"]), rounds_so_far)]
        assert metrics["dp-steps"] == rounds_so_far
        assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta=config.privacy.delta), abs=1e-6)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= config.privacy.epsilon + 1e-9


def test_a_client_whose_budget_is_spent_refuses_to_train() -> None:
    # Calibrated for one round: the second round would overspend.
    config = private_config("privacy.planned_rounds=1")
    context, state = client_context(), initial(config)
    first = handle_train(train_message(config, state, 1), context, config)
    assert "refused" not in first.content["metrics"]
    second = handle_train(train_message(config, state, 2), context, config)
    assert second.content["metrics"]["refused"] == 1.0
    assert "privacy budget" in second.content["info"]["refused-reason"]
    assert "arrays" not in second.content
    # The ledger did not move: the refused round cost nothing.
    assert second.content["metrics"]["epsilon"] == pytest.approx(first.content["metrics"]["epsilon"])


@pytest.mark.parametrize("trains", ["B", "AB"])
def test_a_dp_round_changes_the_trained_factors_and_leaves_frozen_ones_bit_identical(trains: str) -> None:
    config = private_config("model.train_head=false")
    num_labels = workspace.federated_task(config).num_labels
    state = initial(config)
    model = workspace.lora_model(config, num_labels)
    state.load_into(model)
    settings = dp_settings(config)
    ledger = PrivacyLedger(accountant=settings.accountant)
    examples = workspace.client_examples(config, 0)
    ledger.calibrate(settings, poisson_sample_rate(len(examples), config.federation.batch_size))
    plan = TrainPlan(trains, False, config.federation.local_steps, config.federation.lr, config.federation.batch_size, seed=1)
    result = train_local_private(model, examples, plan, settings, ledger)
    assert ledger.steps == plan.local_steps
    for layer, parts in result.state.factors.items():
        for part, tensor in parts.items():
            if part in trains:
                assert not torch.equal(tensor, state.factors[layer][part]), f"{layer}.{part} did not train"
            else:
                assert torch.equal(tensor, state.factors[layer][part]), f"{layer}.{part} moved while frozen"
    assert all(torch.equal(result.state.head[k], state.head[k]) for k in state.head)
    # The reply carries exactly the trained factors.
    reply = handle_train(train_message(config, state, 1, trains), client_context(), config)
    sent = LoraState.from_array_record(reply.content["arrays"])
    assert all(set(parts) == set(trains) for parts in sent.factors.values()) and not sent.head


def test_noise_is_calibrated_for_the_planned_steps() -> None:
    config = private_config()
    settings = dp_settings(config)
    assert settings.planned_steps == config.federation.rounds * config.federation.local_steps
    reply = handle_train(train_message(config, initial(config), 1), client_context(), config)
    metrics = reply.content["metrics"]
    planned = PRVAccountant()
    planned.history = [(float(metrics["noise-multiplier"]), float(metrics["sample-rate"]), settings.planned_steps)]
    assert planned.get_epsilon(delta=settings.delta) <= settings.epsilon
    assert planned.get_epsilon(delta=settings.delta) > 0.95 * settings.epsilon
