"""DP-SGD on causal LMs: one sequence is one example; ghost clipping by default; the accounting of classification."""

from __future__ import annotations

import copy

import pytest
import torch

from clients.app import handle_train
from clients.trainer import TrainPlan, make_optimizer, private_loss, set_trainable
from fedlora import workspace
from fedlora.accounting import PrivacyAccounts
from fedlora.causal import sequence_losses
from fedlora.lora import LoraState
from fedlora.privacy import DPSettings, PrivacyLedger, make_private, zero_step_on_empty_batch
from tests.conftest import causal_config, tiny_config
from tests.test_privacy import ACCOUNTANTS, as_reply, client_context, declared, train_message

pytestmark = pytest.mark.usefixtures("flower_task")


def private_causal(*overrides: str):
    return causal_config("privacy.enabled=true", "privacy.epsilon=3.0", "federation.rounds=3", *overrides)


def one_dp_round(config) -> tuple[PrivacyAccounts, LoraState, LoraState]:
    """Client 0's first DP round through the ClientApp's train handler, charged by the server."""
    accounts = PrivacyAccounts.for_run(config, declared(config))
    before = workspace.initial_state(config, workspace.federated_task(config).num_labels)
    reply = as_reply(handle_train(train_message(config, accounts, 0, 1, trains="B"), client_context(), config))
    assert "refused" not in reply.content["metrics"], reply.content["info"]
    accounts.charge([0], [reply], {1: 0})
    assert accounts.check_reply(0, reply) is None  # the client's ledger and epsilon are the server's
    return accounts, before, LoraState.from_array_record(reply.content["arrays"])


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_a_dp_causal_round_charges_the_ledger_as_a_classification_round_and_epsilon_is_opacus(mode: str) -> None:
    # Same example counts per client as the classification federation (240 examples, 3 clients, IID).
    config = private_causal(f"privacy.grad_sample_mode={mode!r}", "data.num_train=240")
    classification = tiny_config("privacy.enabled=true", "privacy.epsilon=3.0", "federation.rounds=3")
    assert declared(config) == declared(classification)
    accounts, before, trained = one_dp_round(config)
    reference_accounts, _, _ = one_dp_round(classification)
    plan = accounts.plans[0]
    assert accounts.ledgers[0].history == [(plan.noise_multiplier, plan.sample_rate, config.federation.local_steps)]
    assert accounts.ledgers[0].history == reference_accounts.ledgers[0].history
    assert accounts.epsilon(0) == reference_accounts.epsilon(0)
    reference = ACCOUNTANTS[config.privacy.accountant]()
    reference.history = list(accounts.ledgers[0].history)
    assert accounts.epsilon(0) == pytest.approx(reference.get_epsilon(delta=config.privacy.delta), abs=1e-6)
    # The adapter moved: B trained and sent, A neither.
    assert set(trained.factors) == set(before.factors)
    for layer, parts in trained.factors.items():
        assert set(parts) == {"B"} and not torch.equal(parts["B"], before.factors[layer]["B"])


def test_ghost_clipping_reduces_token_losses_to_the_per_sequence_means_hooks_use() -> None:
    """Opacus' wrapped criterion gives each sequence the mean over its response tokens: our loss per example."""
    config = private_causal()
    data = workspace.client_examples(config, 0)
    model = copy.deepcopy(workspace.lora_model(config, workspace.federated_task(config).num_labels))
    plan = TrainPlan("AB", False, 1, 1e-3, 8, 0)
    optimizer = make_optimizer(set_trainable(model, plan.trains, plan.train_head), plan)
    settings = DPSettings(3.0, 1e-5, 1.0, "prv", "ghost")
    ledger = PrivacyLedger("prv", noise_multiplier=1.0, sample_rate=0.2)
    training = make_private(model, optimizer, data, 8, settings, ledger, torch.Generator().manual_seed(0))
    assert training.criterion is not None
    batch = data.batch(torch.arange(8))
    logits = training.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    wrapped = private_loss(training, logits, batch["labels"], torch.device("cpu"))
    torch.testing.assert_close(wrapped.loss_per_sample, sequence_losses(logits, batch["labels"]), rtol=1e-5, atol=1e-6)
    # A sequence's loss does not depend on the other sequences of its batch.
    alone = sequence_losses(logits[:1], batch["labels"][:1])
    torch.testing.assert_close(alone, sequence_losses(logits, batch["labels"])[:1])


def test_per_sequence_clipping_bounds_each_sequence_s_gradient() -> None:
    """Hooks mode: after the backward, every sequence's gradient is one row of grad_sample, clipped by the optimizer."""
    config = private_causal("privacy.grad_sample_mode='hooks'")
    data = workspace.client_examples(config, 0)
    model = copy.deepcopy(workspace.lora_model(config, workspace.federated_task(config).num_labels))
    plan = TrainPlan("AB", False, 1, 1e-3, 8, 0)
    optimizer = make_optimizer(set_trainable(model, plan.trains, plan.train_head), plan)
    settings = DPSettings(3.0, 1e-5, 0.01, "prv", "hooks")
    ledger = PrivacyLedger("prv", noise_multiplier=1.0, sample_rate=0.2)
    training = make_private(model, optimizer, data, 8, settings, ledger, torch.Generator().manual_seed(0))
    batch = data.batch(torch.arange(8))
    logits = training.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    private_loss(training, logits, batch["labels"], torch.device("cpu")).backward()
    params = [p for p in training.module.parameters() if p.requires_grad]
    norms = torch.stack([p.grad_sample.reshape(8, -1).norm(dim=1) for p in params]).norm(dim=0)
    assert (norms > settings.max_grad_norm).all()  # big enough that clipping binds
    training.optimizer.pre_step()
    clipped = [p.summed_grad for p in params]
    assert torch.cat([c.reshape(-1) for c in clipped]).norm() <= 8 * settings.max_grad_norm + 1e-6


def test_a_dp_round_of_the_tiny_gpt2_is_accepted_by_the_server() -> None:
    """GPT-2's fused Conv1D attention under ghost clipping: the LoRA factors are plain linear layers."""
    accounts, before, trained = one_dp_round(private_causal("model.name='tiny-gpt2'"))
    assert accounts.ledgers[0].steps == 3
    assert all(layer.endswith("c_attn") for layer in trained.factors)
    assert all(not torch.equal(parts["B"], before.factors[layer]["B"]) for layer, parts in trained.factors.items())


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_an_empty_poisson_batch_still_takes_the_noise_only_step_the_accountant_counts(mode: str) -> None:
    config = private_causal(f"privacy.grad_sample_mode={mode!r}")
    data = workspace.client_examples(config, 0)
    model = copy.deepcopy(workspace.lora_model(config, workspace.federated_task(config).num_labels))
    plan = TrainPlan("B", False, 1, 1e-3, 8, 0)
    params = set_trainable(model, plan.trains, plan.train_head)
    before = [p.detach().clone() for p in params]
    settings = DPSettings(3.0, 1e-5, 1.0, "prv", mode)
    ledger = PrivacyLedger("prv", noise_multiplier=1.0, sample_rate=0.2)
    training = make_private(model, make_optimizer(params, plan), data, 8, settings, ledger, torch.Generator().manual_seed(0))
    zero_step_on_empty_batch(training)
    training.record_into(ledger)
    assert ledger.steps == 1
    assert any(not torch.equal(p, b) for p, b in zip(params, before))  # noise moved the factors
