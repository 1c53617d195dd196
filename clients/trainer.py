"""Local training of the factors the server asks for (A and B, or B only), plus the head.

Both task kinds train the same way: the model's own loss without DP (for a causal LM, the
token-mean cross-entropy on the response tokens that the labels mark), and under DP-SGD a loss
per example: cross-entropy of its class, or, for a causal LM, the mean cross-entropy over its own
response tokens (one sequence is one example: DP's unit of privacy), so that no example's
clipped gradient depends on another's tokens.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from torch import nn

from fedlora.causal import sequence_losses, shifted
from fedlora.data.encode import EncodedExamples
from fedlora.data.instruct import CausalExamples
from fedlora.lora import LoraState, locate_parameter
from fedlora.privacy import DPSettings, PrivacyLedger, PrivateTraining, make_private, zero_step_on_empty_batch


@dataclass(frozen=True)
class TrainPlan:
    """What one round of local training does, as the server's train message says."""

    trains: str  # "AB" or "B"
    train_head: bool
    local_steps: int
    lr: float
    batch_size: int
    seed: int
    optimizer: str = "adamw"  # or "sgd"
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0


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


def make_optimizer(params: list[nn.Parameter], plan: TrainPlan) -> torch.optim.Optimizer:
    """The round's fresh optimizer, as the server's train message names it."""
    if plan.optimizer == "sgd":
        return torch.optim.SGD(params, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)
    if plan.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=plan.lr, weight_decay=plan.weight_decay)
    raise ValueError(f"unknown optimizer {plan.optimizer!r} (adamw or sgd)")


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


def train_local(model: nn.Module, data: EncodedExamples | CausalExamples, plan: TrainPlan) -> TrainResult:
    """Train for `plan.local_steps` steps with a fresh optimizer (no state carried across rounds)."""
    started = time.perf_counter()
    params = set_trainable(model, plan.trains, plan.train_head)
    optimizer = make_optimizer(params, plan)
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


def train_local_private(
    model: nn.Module, data: EncodedExamples | CausalExamples, plan: TrainPlan, settings: DPSettings, ledger: PrivacyLedger
) -> TrainResult:
    """DP-SGD for `plan.local_steps` Poisson-sampled steps at the ledger's noise; the ledger gains them.

    Trains a copy of the model: Opacus hooks its modules in place, and the caller's model is
    shared across rounds and clients in a simulation process.
    """
    started = time.perf_counter()
    model = copy.deepcopy(model)
    if ledger.noise_multiplier <= 0:
        raise ValueError("the privacy ledger has no noise multiplier: the server's instruction sets it")
    params = set_trainable(model, plan.trains, plan.train_head)  # freeze before make_private
    optimizer = make_optimizer(params, plan)
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
            loss = private_loss(training, logits, labels[:, :width] if labels.dim() == 2 else labels, device)
            training.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            training.optimizer.step()
            losses.append(float(loss.item()))
    training.record_into(ledger)
    # Opacus prefixes parameter names with "_module."; LoraState reads through it.
    state = LoraState.from_model(training.module)
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    return TrainResult(mean_loss, steps, time.perf_counter() - started, state)


def private_loss(training: PrivateTraining, logits: torch.Tensor, labels: torch.Tensor, device: torch.device):
    """The batch loss DP-SGD differentiates: the mean over examples of each example's own loss.

    Labels of shape [B] are classes; [B, T] are a causal LM's token labels (see the module
    docstring). Ghost clipping gets the per-example losses through Opacus' wrapped criterion,
    which reduces a [B, T] token loss to per-sequence means over the positions not ignored.
    """
    labels = labels.to(device)
    if labels.dim() == 1:
        return (training.criterion or nn.functional.cross_entropy)(logits, labels)
    if training.criterion is None:
        return sequence_losses(logits, labels).mean()
    predicted, targets = shifted(logits, labels)
    return training.criterion(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1), shape=predicted.shape)
