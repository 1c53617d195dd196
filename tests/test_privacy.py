"""DP-SGD: the server plans and verifies every client's privacy; accounting composes; budgets hold."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from opacus.accountants import PRVAccountant, RDPAccountant

from clients.app import handle_train
from clients.trainer import TrainPlan, make_optimizer, train_local_private
from fedlora import workspace
from fedlora.accounting import PrivacyAccounts, calibrated_steps, dp_settings, plan_clients
from fedlora.config import ExperimentConfig
from fedlora.lora import LoraState
from fedlora.privacy import SIGMA_MIN, PrivacyBudgetError, PrivacyLedger, planned_participations, sample_rate
from fedlora.server import train_config
from fedlora.simulation import check_runnable
from tests.conftest import reply_from, tiny_config

pytestmark = pytest.mark.usefixtures("flower_task")
ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def private_config(*overrides: str) -> ExperimentConfig:
    return tiny_config("privacy.enabled=true", "privacy.epsilon=3.0", "federation.rounds=3", *overrides)


def declared(config: ExperimentConfig) -> dict[int, int]:
    """What every client of the tiny federation declares at the handshake."""
    return {client: len(part.labels) for client, part in enumerate(workspace.federated_task(config).partitions)}


def initial(config: ExperimentConfig) -> LoraState:
    return workspace.initial_state(config, workspace.federated_task(config).num_labels)


def train_message(
    config: ExperimentConfig, accounts: PrivacyAccounts, client: int, server_round: int, trains: str = "AB"
) -> Message:
    """Client `client`'s train message as the server sends it: its DP instruction and the server's ledger."""
    record = train_config(config, workspace.federated_task(config).num_labels)
    record.update({"server-round": server_round, "train-factors": trains, "train-head": config.model.train_head})
    record.update(dict(accounts.instruct(client)))
    content = RecordDict({"arrays": initial(config).to_array_record(), "config": record})
    content["privacy-ledger"] = accounts.ledger_record(client)
    return Message(content, dst_node_id=1, message_type=MessageType.TRAIN)


def client_context(client_id: int = 0) -> Context:
    return Context(run_id=1, node_id=1, node_config={"partition-id": client_id}, state=RecordDict(), run_config={})


def as_reply(message: Message, node: int = 1) -> Message:
    """A client's answer as the server's Grid hands it over."""
    return reply_from(node, message.content)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_the_servers_epsilon_composes_over_rounds_and_equals_opacus_accountant(accountant: str) -> None:
    config = private_config(f"privacy.accountant={accountant!r}")
    accounts = PrivacyAccounts.for_run(config, declared(config))
    context, epsilons = client_context(), []
    for server_round in (1, 2, 3):
        reply = as_reply(handle_train(train_message(config, accounts, 0, server_round), context, config))
        assert "refused" not in reply.content["metrics"]
        accounts.charge([0], [reply], {1: 0})
        assert accounts.check_reply(0, reply) is None  # the client's figures agree with the server's
        plan = accounts.plans[0]
        reference = ACCOUNTANTS[accountant]()
        reference.history = [(plan.noise_multiplier, plan.sample_rate, server_round * config.federation.local_steps)]
        epsilons.append(accounts.epsilon(0))
        assert epsilons[-1] == pytest.approx(reference.get_epsilon(delta=config.privacy.delta), abs=1e-6)
    assert epsilons[0] < epsilons[1] < epsilons[2] <= config.privacy.epsilon + 1e-9


def test_participation_aware_calibration_needs_less_noise_than_the_worst_case() -> None:
    base = ("federation.num_clients=10", "federation.clients_per_round=2", "federation.rounds=10", "data.num_train=400")
    expected = private_config(*base)
    worst = private_config(*base, "privacy.calibration='worst_case'")
    quantile = private_config(*base, "privacy.calibration='quantile'", "privacy.participation_quantile=0.9")
    assert calibrated_steps(expected) == 2 * expected.federation.local_steps  # ceil(10 rounds * 2 / 10)
    assert calibrated_steps(worst) == 10 * worst.federation.local_steps
    assert planned_participations(10, 2, 10, "quantile", 0.9) == 4  # P(Binomial(10, 0.2) <= 4) >= 0.9
    sizes = declared(expected)
    sigma = {name: plan_clients(c, sizes)[0].noise_multiplier for name, c in (("exp", expected), ("q", quantile), ("wc", worst))}
    assert sigma["exp"] < sigma["q"] < sigma["wc"]


def test_clients_of_one_sample_rate_share_one_calibration() -> None:
    config = private_config()
    plans = plan_clients(config, {0: 80, 1: 80, 2: 40})
    assert plans[0] == plans[1] and plans[0].sample_rate == sample_rate(80, config.federation.batch_size)
    assert plans[2].sample_rate > plans[0].sample_rate and plans[2].noise_multiplier > plans[0].noise_multiplier


def honest_reply(config: ExperimentConfig) -> tuple[PrivacyAccounts, Message]:
    accounts = PrivacyAccounts.for_run(config, declared(config))
    reply = as_reply(handle_train(train_message(config, accounts, 0, 1), client_context(), config))
    accounts.charge([0], [reply], {1: 0})
    return accounts, reply


def lie(reply: Message, *, epsilon: float | None = None, ledger_edit=None) -> Message:
    """The reply with its claimed epsilon or its ledger rewritten."""
    content = RecordDict({key: value for key, value in reply.content.items() if key not in ("metrics", "privacy-ledger")})
    metrics = dict(reply.content["metrics"])
    if epsilon is not None:
        metrics["epsilon"] = epsilon
    content["metrics"] = MetricRecord(metrics)
    ledger = PrivacyLedger.from_record(reply.content["privacy-ledger"])
    if ledger_edit is not None:
        ledger = ledger_edit(ledger)
    content["privacy-ledger"] = ledger.to_record()
    return reply_from(1, content)


def _less_noise(ledger: PrivacyLedger) -> PrivacyLedger:
    return replace(ledger, history=[(n / 2, q, s) for n, q, s in ledger.history])


def _higher_rate(ledger: PrivacyLedger) -> PrivacyLedger:
    return replace(ledger, history=[(n, min(1.0, 2 * q), s) for n, q, s in ledger.history])


def _more_steps(ledger: PrivacyLedger) -> PrivacyLedger:
    return replace(ledger, history=[(n, q, 2 * s) for n, q, s in ledger.history])


def _fewer_steps(ledger: PrivacyLedger) -> PrivacyLedger:
    return replace(ledger, history=[(n, q, s - 1) for n, q, s in ledger.history])


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"epsilon": 0.001}, "claims epsilon 0.001"),
        ({"epsilon": -7.0}, "claims epsilon -7.0"),
        ({"ledger_edit": _less_noise}, "below the instructed"),
        ({"ledger_edit": _higher_rate}, "above the instructed"),
        ({"ledger_edit": _more_steps}, "more than the"),
        ({"ledger_edit": _fewer_steps}, "differs from the instructed"),
    ],
    ids=["lower-epsilon", "negative-epsilon", "less-noise", "higher-sample-rate", "more-steps", "other-history"],
)
def test_a_reply_whose_privacy_figures_disagree_with_the_instructions_is_refused(edit: dict, reason: str) -> None:
    accounts, reply = honest_reply(private_config())
    before = accounts.epsilon(0)
    problem = accounts.check_reply(0, lie(reply, **edit))
    assert problem is not None and reason in problem and problem.startswith("privacy:")
    assert accounts.epsilon(0) == before  # the record is the server's, whatever the reply said


def test_a_reply_without_a_ledger_is_refused() -> None:
    accounts, reply = honest_reply(private_config())
    content = RecordDict({key: value for key, value in reply.content.items() if key != "privacy-ledger"})
    assert "no privacy ledger" in accounts.check_reply(0, reply_from(1, content))


def test_a_client_refuses_an_instruction_its_budget_cannot_afford() -> None:
    config = private_config("privacy.planned_rounds=1")  # calibrated for one round: the second overspends
    accounts = PrivacyAccounts.for_run(config, declared(config))
    context = client_context()
    first = as_reply(handle_train(train_message(config, accounts, 0, 1), context, config))
    accounts.charge([0], [first], {1: 0})
    assert "refused" not in first.content["metrics"] and accounts.spent() == {0: accounts.spent()[0]}
    second = handle_train(train_message(config, accounts, 0, 2), context, config)  # the server would not send it
    assert second.content["metrics"]["refused"] == 1.0 and "arrays" not in second.content
    assert "privacy budget" in second.content["info"]["refused-reason"]
    accounts.charge([0], [as_reply(second)], {1: 0})  # an explicit refusal costs nothing
    assert accounts.epsilon(0) == pytest.approx(float(first.content["metrics"]["epsilon"]))


def test_a_client_refuses_a_sample_rate_its_data_does_not_give() -> None:
    config = private_config()
    sizes = declared(config)
    accounts = PrivacyAccounts.for_run(config, {**sizes, 0: 10 * sizes[0]})  # the server believes in more data
    reply = handle_train(train_message(config, accounts, 0, 1), client_context(), config)
    assert reply.content["metrics"]["refused"] == 1.0 and "sample rate" in reply.content["info"]["refused-reason"]


@pytest.mark.parametrize("trains", ["B", "AB"])
def test_a_dp_round_changes_the_trained_factors_and_leaves_frozen_ones_bit_identical(trains: str) -> None:
    config = private_config("model.train_head=false")
    num_labels = workspace.federated_task(config).num_labels
    state = initial(config)
    model = workspace.lora_model(config, num_labels)
    state.load_into(model)
    plan = plan_clients(config, declared(config))[0]
    ledger = PrivacyLedger(config.privacy.accountant, plan.noise_multiplier, plan.sample_rate)
    examples = workspace.client_examples(config, 0)
    train = TrainPlan(trains, False, config.federation.local_steps, config.federation.lr, config.federation.batch_size, seed=1)
    result = train_local_private(model, examples, train, dp_settings(config), ledger)
    assert ledger.steps == train.local_steps
    for layer, parts in result.state.factors.items():
        for part, tensor in parts.items():
            if part in trains:
                assert not torch.equal(tensor, state.factors[layer][part]), f"{layer}.{part} did not train"
            else:
                assert torch.equal(tensor, state.factors[layer][part]), f"{layer}.{part} moved while frozen"
    assert all(torch.equal(result.state.head[k], state.head[k]) for k in state.head)


def test_sgd_is_selectable_as_the_client_optimizer() -> None:
    config = tiny_config("federation.optimizer='sgd'", "federation.momentum=0.9", "federation.lr=0.05")
    record = train_config(config, 2)
    assert (record["optimizer"], record["momentum"]) == ("sgd", 0.9)
    optimizer = make_optimizer([torch.nn.Parameter(torch.zeros(2))], TrainPlan("AB", True, 1, 0.05, 4, 0, "sgd", 0.9, 0.0))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.defaults["momentum"] == 0.9


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (("privacy.delta=0.5",), "privacy.delta: 0.5 is at least 1/n"),
        (("privacy.epsilon=1e6",), f"more than any noise multiplier >= {SIGMA_MIN:g} spends"),
        (("privacy.epsilon=1e-6",), "the smallest feasible epsilon is about"),
        (("privacy.planned_rounds=100000",), "privacy.accountant: 'prv' cannot account for 300000 DP steps a client"),
        (("federation.rounds=100000", 'privacy.calibration="worst_case"'), "set privacy.accountant = 'rdp'"),
    ],
    ids=["delta-at-least-1/n", "epsilon-1e6", "epsilon-1e-6", "prv-planned-rounds", "prv-rounds"],
)
def test_impossible_budgets_are_refused_in_one_line_within_seconds(overrides: tuple[str, ...], message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(PrivacyBudgetError) as caught:
        check_runnable(private_config(*overrides))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert time.perf_counter() - started < 20.0


def test_the_instruction_travels_in_each_clients_own_config() -> None:
    config = private_config()
    accounts = PrivacyAccounts.for_run(config, declared(config))
    record = ConfigRecord(dict(accounts.instruct(1)))
    assert record["dp-noise-multiplier"] == accounts.plans[1].noise_multiplier
    assert record["dp-sample-rate"] == accounts.plans[1].sample_rate
    assert record["dp-steps"] == config.federation.local_steps and record["dp-epsilon"] == 3.0
