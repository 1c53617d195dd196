"""Local training of the factors the server asks for (A and B, or B only), plus the head."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from fedlora.data.encode import EncodedExamples
from fedlora.lora import locate_parameter


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
    """How local training went."""

    loss: float
    steps: int
    seconds: float


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
    return TrainResult(loss=sum(losses) / len(losses), steps=len(losses), seconds=time.perf_counter() - started)
