"""Local training of the factors the server asks for (A and B, or B only), plus the head.

Both task kinds train the same way: the model's own loss without DP (for a causal LM, the
token-mean cross-entropy on the response tokens that the labels mark), and under DP-SGD a loss
per example: cross-entropy of its class, or, for a causal LM, the mean cross-entropy over its own
response tokens (one sequence is one example: DP's unit of privacy), so that no example's
clipped gradient depends on another's tokens.

The learning rate follows the run's schedule (federation.lr_schedule, warmup_steps) over the
run's rounds x local_steps steps. A client's step in round t is (t - 1) x local_steps + its local
step, counted from 0: every client of a round trains at the same point of the schedule, however
many rounds it sat out (the optimizer is fresh every round anyway). The factor at step s of T,
after w warmup steps, is transformers' (get_*_schedule_with_warmup): s / w during warmup, then
1 (constant), 1 - p (linear) or (1 + cos(pi p)) / 2 (cosine), with p = (s - w) / max(1, T - w).

Gradient accumulation (federation.grad_accumulation = k, without DP) splits each step's batch
into k micro-batches, backpropagates them one at a time and steps once: each micro-batch's mean
loss weighted by its share of the batch's loss terms (examples; a causal LM's response tokens),
so that the step is the whole batch's, to rounding, with the activations of one micro-batch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedlora.causal import sequence_losses, shifted
from fedlora.data.encode import EncodedExamples
from fedlora.data.instruct import IGNORE_INDEX, CausalExamples
from fedlora.lora import LoraState, locate_parameter
from fedlora.privacy import DPSettings, PrivacyLedger, PrivateTraining, make_private, zero_step_on_empty_batch


@dataclass(frozen=True)
class TrainPlan:
    """What one round of local training does, as the server's train message says."""

    trains: str  # "AB", "A" or "B"
    train_head: bool
    local_steps: int
    lr: float
    batch_size: int
    seed: int
    optimizer: str = "adamw"  # or "sgd"
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0
    lr_schedule: str = "constant"  # or "linear", "cosine" (see the module docstring)
    warmup_steps: int = 0
    schedule_steps: int = 0  # the steps the schedule spans: the run's rounds x local_steps
    first_step: int = 0  # the schedule's step of this round's first local step: (round - 1) x local_steps
    grad_accumulation: int = 1  # micro-batches a step's batch is split into (no DP)
    keeps: str = ""  # of the trained factors, those the client keeps to itself and never sends (FedSA-LoRA's B)

    @classmethod
    def from_config(cls, config: Mapping[str, object], seed: int) -> TrainPlan:
        """The plan a train message's config sets (fedlora/server.py train_config; the strategy's
        train-factors and train-head), with the client's seed for the round."""
        local_steps = int(config["local-steps"])
        return cls(
            trains=str(config["train-factors"]),
            train_head=bool(config["train-head"]),
            local_steps=local_steps,
            lr=float(config["lr"]),
            batch_size=int(config["batch-size"]),
            seed=seed,
            optimizer=str(config.get("optimizer", "adamw")),
            momentum=float(config.get("momentum", 0.0)),
            weight_decay=float(config.get("weight-decay", 0.0)),
            lr_schedule=str(config.get("lr-schedule", "constant")),
            warmup_steps=int(config.get("warmup-steps", 0)),
            schedule_steps=int(config.get("schedule-steps", 0)),
            first_step=(int(config["server-round"]) - 1) * local_steps,
            grad_accumulation=int(config.get("grad-accumulation", 1)),
            keeps=str(config.get("keep-factors", "")),
        )

    @property
    def uploads(self) -> str:
        """The trained factors the reply carries: all but those the client keeps."""
        return "".join(part for part in self.trains if part not in self.keeps)

    def lr_at(self, local_step: int) -> float:
        """The learning rate of local step `local_step` (from 0) of this round."""
        return self.lr * lr_factor(self.lr_schedule, self.first_step + local_step, self.warmup_steps, self.schedule_steps)


def lr_factor(schedule: str, step: int, warmup_steps: int, total_steps: int) -> float:
    """The schedule's multiple of the peak learning rate at `step` (from 0) of `total_steps` (module docstring)."""
    if step < warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown learning-rate schedule {schedule!r} (constant, linear or cosine)")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate, for the next step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


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
    for local_step, index in enumerate(batch_indices(len(data), plan.batch_size, plan.local_steps, generator)):
        set_lr(optimizer, plan.lr_at(local_step))
        optimizer.zero_grad(set_to_none=True)
        losses.append(backward_batch(model, data, index, plan.grad_accumulation, device))
        optimizer.step()
    state = LoraState.from_model(model)
    return TrainResult(sum(losses) / len(losses), len(losses), time.perf_counter() - started, state)


def backward_batch(
    model: nn.Module, data: EncodedExamples | CausalExamples, index: torch.Tensor, micro_batches: int, device: torch.device
) -> float:
    """Backpropagate the mean loss of the batch `index`, in `micro_batches` parts (module docstring); its value."""
    if micro_batches == 1:
        loss = model(**_on(device, data.batch(index))).loss
        loss.backward()
        return loss.item()
    parts = [_on(device, data.batch(part)) for part in index.tensor_split(micro_batches) if len(part)]
    terms = [loss_terms(part["labels"]) for part in parts]
    total, value = sum(terms), 0.0
    for part, count in zip(parts, terms):
        if count:  # a part without a response token adds nothing (and its mean would be NaN)
            loss = model(**part).loss * (count / total)
            loss.backward()
            value += loss.item()
    return value


def loss_terms(labels: torch.Tensor) -> int:
    """The terms a batch's mean loss averages: its examples, or a causal LM's response tokens after the shift."""
    return len(labels) if labels.dim() == 1 else int((labels[:, 1:] != IGNORE_INDEX).sum())


def _on(device: torch.device, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


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
            set_lr(training.optimizer, plan.lr_at(steps))
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
