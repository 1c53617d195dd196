"""Local training of the factors the server asks for (A and B, or B only), plus the head."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
from torch import nn

from fedlora.data.encode import EncodedExamples
from fedlora.lora import LoraState, locate_parameter
from fedlora.privacy import DPSettings, PrivacyLedger, make_private, zero_step_on_empty_batch


@dataclass(frozen=True)
class TrainPlan:
    """What one round of local training does, as the server's train message says."""

    trains: str  # "AB" or "B"
    train_head: bool
    local_steps: int
    lr: float
    batch_size: int
    seed: int


@dataclass(frozen=True)
class TrainResult:
    """How local training went, and the adapter state it ended with (trained and frozen parts)."""

    loss: float
    steps: int
    seconds: float
    state: LoraState


def set_trainable(model: nn.Module, trains: str, train_head: bool) -> list[nn.Parameter]:
    """Freeze everything but the named LoRA factors (and the head if asked); return the trainable."""
    trainable = []
    for name, param in model.named_parameters():
        located = locate_parameter(name)
        wanted = located is not None and (
            (located[0] == "factor" and located[2] in trains) or (located[0] == "head" and train_head)
        )
        param.requires_grad_(wanted)
        if wanted:
            trainable.append(param)
    if not trainable:
        raise ValueError(f"nothing to train: factors {trains!r}, head {train_head}")
    return trainable


def batch_indices(num_examples: int, batch_size: int, steps: int, generator: torch.Generator) -> list[torch.Tensor]:
    """`steps` mini-batches drawn by walking seeded random permutations (epochs) of the data."""
    batches: list[torch.Tensor] = []
    order = torch.randperm(num_examples, generator=generator)
    cursor = 0
    while len(batches) < steps:
        if cursor + batch_size > num_examples and cursor > 0:
            order, cursor = torch.randperm(num_examples, generator=generator), 0
        batches.append(order[cursor : cursor + batch_size])
        cursor += batch_size
    return batches


def train_local(model: nn.Module, data: EncodedExamples, plan: TrainPlan) -> TrainResult:
    """Train for `plan.local_steps` steps with a fresh optimizer (no state carried across rounds)."""
    started = time.perf_counter()
    params = set_trainable(model, plan.trains, plan.train_head)
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    device = params[0].device
    generator = torch.Generator().manual_seed(plan.seed)
    model.train()
    losses = []
    for index in batch_indices(len(data), plan.batch_size, plan.local_steps, generator):
        batch = {k: v.to(device) for k, v in data.batch(index).items()}
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    state = LoraState.from_model(model)
    return TrainResult(sum(losses) / len(losses), len(losses), time.perf_counter() - started, state)


def poisson_sample_rate(num_examples: int, batch_size: int) -> float:
    """The sample rate Opacus' Poisson loader uses for this data and batch size."""
    return 1.0 / math.ceil(num_examples / batch_size)


def train_local_private(
    model: nn.Module, data: EncodedExamples, plan: TrainPlan, settings: DPSettings, ledger: PrivacyLedger
) -> TrainResult:
    """DP-SGD for `plan.local_steps` Poisson-sampled steps; the ledger gains this round's steps.

    Trains a copy of the model: Opacus hooks its modules in place, and the caller's model is
    shared across rounds and clients in a simulation process.
    """
    started = time.perf_counter()
    model = copy.deepcopy(model)
    if not ledger.calibrated:
        raise ValueError("calibrate the privacy ledger's noise before training")
    params = set_trainable(model, plan.trains, plan.train_head)  # freeze before make_private
    optimizer = torch.optim.AdamW(params, lr=plan.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(plan.seed)
    training = make_private(model, optimizer, data, plan.batch_size, settings, ledger, generator)
    device = params[0].device
    training.module.train()
    losses: list[float] = []
    steps = 0
    while steps < plan.local_steps:
        for input_ids, mask, labels in training.loader:
            if steps == plan.local_steps:
                break
            steps += 1
            if len(labels) == 0:
                zero_step_on_empty_batch(training)
                continue
            width = int(mask.sum(dim=1).max())
            logits = training.module(input_ids=input_ids[:, :width].to(device), attention_mask=mask[:, :width].to(device)).logits
            criterion = training.criterion or nn.functional.cross_entropy
            loss = criterion(logits, labels.to(device))
            training.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            training.optimizer.step()
            losses.append(float(loss.item()))
    training.record_into(ledger)
    # Opacus prefixes parameter names with "_module."; LoraState reads through it.
    state = LoraState.from_model(training.module)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(mean_loss, steps, time.perf_counter() - started, state)
