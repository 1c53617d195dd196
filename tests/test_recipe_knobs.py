"""Recipe knobs: learning-rate schedule with warmup, gradient accumulation, LoRA dropout, adapters every N rounds."""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.optimization import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import clients.trainer as trainer
from clients.trainer import TrainPlan, backward_batch, batch_indices, lr_factor, train_local, train_local_private
from fedlora import workspace
from fedlora.accounting import dp_settings, plan_clients
from fedlora.config import ConfigError
from fedlora.data.instruct import IGNORE_INDEX, CausalExamples
from fedlora.interrupt import RunInterrupted
from fedlora.lora import LoraState
from fedlora.model import seeded
from fedlora.privacy import PrivacyLedger
from fedlora.results import read_history
from fedlora.server import train_config
from fedlora.task import build_lora_model
from tests.conftest import causal_config, tiny_config, without_timings

TOTAL, WARMUP = 100, 10


# --- the learning-rate schedule ---


@pytest.mark.parametrize(
    ("schedule", "step", "expected"),
    [
        ("constant", 0, 0.0),  # warmup starts from 0, as transformers' schedules do
        ("constant", 5, 0.5),
        ("constant", 10, 1.0),
        ("constant", 99, 1.0),
        ("linear", 4, 0.4),
        ("linear", 10, 1.0),
        ("linear", 55, 0.5),  # halfway from the end of warmup to the last step
        ("linear", 99, 1 / 90),
        ("cosine", 10, 1.0),
        ("cosine", 55, 0.5),
        ("cosine", 32, 0.5 * (1 + math.cos(math.pi * 22 / 90))),
        ("cosine", 100, 0.0),
    ],
)
def test_schedule_factors_equal_the_formulas(schedule: str, step: int, expected: float) -> None:
    assert lr_factor(schedule, step, WARMUP, TOTAL) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("schedule", "make"), [("linear", get_linear_schedule_with_warmup), ("cosine", get_cosine_schedule_with_warmup)]
)
def test_schedules_are_transformers_own(schedule: str, make) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = make(optimizer, WARMUP, TOTAL).lr_lambdas[0]
    assert all(lr_factor(schedule, step, WARMUP, TOTAL) == pytest.approx(theirs(step), abs=1e-12) for step in range(TOTAL + 1))


def test_without_warmup_a_constant_schedule_is_the_learning_rate_itself() -> None:
    assert all(lr_factor("constant", step, 0, TOTAL) == 1.0 for step in range(TOTAL))
    assert lr_factor("linear", 0, 0, TOTAL) == 1.0 and lr_factor("cosine", 0, 0, TOTAL) == 1.0


def train_message(tiny, server_round: int, **keys) -> dict:
    """A client's train config: the server's keys plus what the strategy adds."""
    config = dict(train_config(tiny, num_labels=8))
    return config | {"server-round": server_round, "train-factors": "AB", "train-head": True} | keys


def test_a_clients_step_is_its_round_times_local_steps_plus_its_local_step() -> None:
    config = tiny_config("federation.lr_schedule='linear'", "federation.warmup_steps=2", "federation.local_steps=3")
    plan = TrainPlan.from_config(train_message(config, server_round=2), seed=0)
    assert (plan.first_step, plan.schedule_steps, plan.warmup_steps) == (3, 6, 2)  # 2 rounds x 3 local steps
    # Round 2's local step 1 is the run's step 4 of 6, two past warmup: 1 - 2 / 4.
    assert plan.lr_at(1) == pytest.approx(config.federation.lr * 0.5)


def recorded_lrs(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The learning rate of every optimizer step train_local takes from now on."""
    seen: list[float] = []
    make = trainer.make_optimizer

    def recording(params, plan):
        optimizer = make(params, plan)
        step = optimizer.step

        def step_and_record(*args, **kwargs):
            seen.append(optimizer.param_groups[0]["lr"])
            return step(*args, **kwargs)

        optimizer.step = step_and_record
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", recording)
    return seen


def test_training_steps_at_the_scheduled_rates_warmup_included(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config("federation.lr_schedule='cosine'", "federation.warmup_steps=4", "federation.local_steps=3")
    seen = recorded_lrs(monkeypatch)
    model, data = build_lora_model(config.model, 8, config.seed), workspace.client_examples(config, 0)
    for server_round in (1, 2):
        train_local(model, data, TrainPlan.from_config(train_message(config, server_round), seed=server_round))
    lr = config.federation.lr
    expected = [lr * s / 4 for s in range(4)] + [lr * 0.5 * (1 + math.cos(math.pi * p / 2)) for p in (0, 1)]
    assert seen == pytest.approx(expected, rel=1e-12, abs=0)


def test_dp_sgd_steps_at_the_scheduled_rates_too(monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_config(
        "privacy.enabled=true", "privacy.epsilon=8.0", "federation.lr_schedule='linear'", "federation.warmup_steps=2"
    )
    seen = recorded_lrs(monkeypatch)  # Opacus' optimizer steps through the one make_optimizer made
    examples = workspace.client_examples(config, 0)
    sizes = {client: len(part.labels) for client, part in enumerate(workspace.federated_task(config).partitions)}
    plan = plan_clients(config, sizes)[0]
    ledger = PrivacyLedger(config.privacy.accountant, plan.noise_multiplier, plan.sample_rate)
    train = TrainPlan.from_config(train_message(config, server_round=2), seed=1)
    train_local_private(build_lora_model(config.model, 8, config.seed), examples, train, dp_settings(config), ledger)
    lr = config.federation.lr
    assert seen == pytest.approx([lr * (1 - p / 4) for p in (1, 2, 3)], rel=1e-12, abs=0)  # the run's steps 3, 4, 5 of 6


# --- defaults: training as before ---


def train_as_before(model: nn.Module, data, plan: TrainPlan) -> LoraState:
    """The local training loop as it was before the schedule and accumulation existed."""
    params = trainer.set_trainable(model, plan.trains, plan.train_head)
    optimizer = trainer.make_optimizer(params, plan)
    model.train()
    for index in batch_indices(len(data), plan.batch_size, plan.local_steps, torch.Generator().manual_seed(plan.seed)):
        loss = model(**data.batch(index)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return LoraState.from_model(model)


def test_default_recipe_trains_bit_for_bit_as_before() -> None:
    config = tiny_config()
    data = workspace.client_examples(config, 1)
    plan = TrainPlan.from_config(train_message(config, server_round=2), seed=5)
    with seeded(plan.seed):  # the base's own dropout draws from the global generator, as on a client
        before = train_as_before(build_lora_model(config.model, 8, config.seed), data, plan)
    with seeded(plan.seed):
        now = train_local(build_lora_model(config.model, 8, config.seed), data, plan).state
    assert before.tensors().keys() == now.tensors().keys()
    assert all(torch.equal(before.tensors()[key], now.tensors()[key]) for key in before.tensors())


# --- gradient accumulation ---


def gradients(model: nn.Module, data, index: torch.Tensor, micro_batches: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = backward_batch(model, data, index, micro_batches, torch.device("cpu"))
    return loss, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def uneven(data):
    """A causal LM's examples with responses of different lengths (the built-in task's are all two tokens): the
    first response token of examples 3.. left out of the loss. A classifier's examples as they are."""
    if not isinstance(data, CausalExamples):
        return data
    labels = data.labels.clone()
    for row in range(3, len(labels)):
        labels[row, int((labels[row] != IGNORE_INDEX).nonzero()[0])] = IGNORE_INDEX
    return replace(data, labels=labels)


@pytest.mark.parametrize("make_config", [tiny_config, causal_config], ids=["classifier", "causal_lm"])
def test_accumulated_micro_batches_give_the_whole_batchs_gradient(make_config) -> None:
    config = make_config()
    model = build_lora_model(config.model, 8, config.seed)
    trainer.set_trainable(model, "AB", config.model.train_head)
    model.eval()  # no dropout: the same network for both ways of computing the gradient
    data, index = uneven(workspace.client_examples(config, 0)), torch.arange(8)
    whole_loss, whole = gradients(model, data, index, 1)
    split_loss, split = gradients(model, data, index, 3)  # 3 + 3 + 2 examples: uneven parts
    assert whole.keys() == split.keys() and whole
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=0, atol=1e-6, msg=name)
    assert split_loss == pytest.approx(whole_loss, rel=1e-6)  # a float32 loss near 18 for the causal LM


def test_config_refuses_what_accumulation_cannot_do_in_one_line() -> None:
    with pytest.raises(ConfigError) as refused:
        tiny_config("federation.grad_accumulation=2", "privacy.enabled=true")
    assert "federation.grad_accumulation: not with DP-SGD" in str(refused.value) and "\n" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"grad_accumulation \(9\) must be at most batch_size \(8\)"):
        tiny_config("federation.grad_accumulation=9")
    with pytest.raises(ConfigError, match=r"warmup_steps \(7\) must be at most the run's rounds x local_steps \(6\)"):
        tiny_config("federation.warmup_steps=7")


# --- LoRA dropout ---


@pytest.mark.parametrize("make_config", [tiny_config, causal_config], ids=["classifier", "causal_lm"])
def test_lora_dropout_reaches_peft(make_config) -> None:
    assert build_lora_model(make_config().model, 8, 0).peft_config["default"].lora_dropout == 0.0
    model = build_lora_model(make_config("model.lora_dropout=0.25").model, 8, 0)
    assert model.peft_config["default"].lora_dropout == 0.25
    dropouts = [m for name, m in model.named_modules() if name.endswith("lora_dropout.default")]
    assert dropouts and all(isinstance(m, nn.Dropout) and m.p == 0.25 for m in dropouts)


# --- adapters every N rounds, through the simulation engine ---

DEFAULT_RECIPE = (
    "federation.lr_schedule='constant'",
    "federation.warmup_steps=0",
    "federation.grad_accumulation=1",
    "model.lora_dropout=0.0",
)


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_adapters_every_round_survive_a_resume_and_defaults_change_nothing(tmp_path: Path) -> None:
    from fedlora.api import load_run
    from fedlora.simulation import simulate

    simulate(tiny_config(), tmp_path / "default")
    # The recipe keys at their defaults, plus adapter folders every round (which do not touch training),
    # stopped after round 1 and resumed.
    config, run_dir, stop = tiny_config(*DEFAULT_RECIPE, "output.adapter_every=1"), tmp_path / "every", threading.Event()
    with pytest.raises(RunInterrupted):
        simulate(config, run_dir, on_round=lambda record: stop.set() if record.round == 1 else None, stop=stop)
    assert (run_dir / "adapter-rounds" / "round-1" / "adapter_config.json").is_file()
    assert not (run_dir / "adapter-rounds" / "round-2").exists() and not (run_dir / "adapter").exists()
    simulate(config, run_dir, resume=True)

    assert without_timings(read_history(run_dir)) == without_timings(read_history(tmp_path / "default"))
    assert sorted(p.name for p in (run_dir / "adapter-rounds").iterdir()) == ["round-1", "round-2"]
    run = load_run(run_dir)
    final, last, first = run.adapter_model(), run.adapter_model(round=2), run.adapter_model(round=1)
    final_state, first_state = LoraState.from_model(final).tensors(), LoraState.from_model(first).tensors()
    assert all(torch.equal(t, LoraState.from_model(last).tensors()[k]) for k, t in final_state.items())
    assert any(not torch.equal(t, first_state[k]) for k, t in final_state.items())
    with pytest.raises(ConfigError, match="adapters of rounds 1, 2 were written"):
        run.adapter_dir(round=3)
