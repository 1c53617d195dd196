"""A causal-LM client's step under DP-SGD, ghost clipping and hooks, against the same step without DP.

The tiny Llama of simulations/instruct_tiny.toml (random weights, LoRA on its target modules,
A and B trained) on batches of the built-in instruction task, as the clients train it:

- no DP: the model's own loss (token mean over the response tokens), backward, AdamW step
  (`clients.trainer.train_local`);
- DP, hooks: per-sample gradients of every trained parameter, the loss of each sequence the
  mean over its response tokens, clipping, noise (`clients.trainer.train_local_private`);
- DP, ghost: Opacus' ghost clipping (per-sample gradient norms without per-sample gradients,
  two backward passes), the default for causal LMs (privacy.grad_sample_mode).

The three take their steps in turn on the same batch, so that all see the same load on a shared
machine; each figure is the median over the timed steps after warm-up, beside the median of the
per-turn ratios (the steadier figure on a busy machine). One torch thread by default, what a
simulated client gets (federation.client_cpus = 1).

    python -m tests.benchmarks.bench_causal_dp_step [--config simulations/instruct_tiny.toml]
        [--device cpu|cuda] [--batch 16] [--steps 10] [--warmup 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from collections.abc import Callable

import torch

from clients.trainer import TrainPlan, make_optimizer, private_loss, set_trainable
from fedlora import workspace
from fedlora.config import load_config
from fedlora.data.instruct import CausalExamples
from fedlora.privacy import DPSettings, PrivacyLedger, PrivateTraining, make_private
from tests.benchmarks.bench_dp_step import StepTimes, _clock, pick_device, quiet

MODES = ("none", "hooks", "ghost")
SEED = 0
Step = Callable[[], tuple[float, float, float]]


def plain(model: torch.nn.Module, batch: dict[str, torch.Tensor], now: Callable[[], float]) -> Step:
    """One step as train_local takes it; returns (forward, backward, optimizer) seconds."""
    params = set_trainable(model, "AB", False)
    optimizer = make_optimizer(params, TrainPlan("AB", False, 1, 1e-3, len(batch["labels"]), SEED))

    def step() -> tuple[float, float, float]:
        t0 = now()
        loss = model(**batch).loss
        t1 = now()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = now()
        optimizer.step()
        return t1 - t0, t2 - t1, now() - t2

    return step


def private(training: PrivateTraining, batch: dict[str, torch.Tensor], now: Callable[[], float]) -> Step:
    """One step as train_local_private takes it."""
    device = batch["input_ids"].device

    def step() -> tuple[float, float, float]:
        t0 = now()
        logits = training.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = private_loss(training, logits, batch["labels"], device)
        t1 = now()
        training.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = now()
        training.optimizer.step()
        return t1 - t0, t2 - t1, now() - t2

    return step


def wrapped(model: torch.nn.Module, data: CausalExamples, batch_size: int, mode: str) -> PrivateTraining:
    """A frozen copy of the model wrapped by Opacus in `mode`, at any noise (it does not change the cost)."""
    copied = copy.deepcopy(model)
    params = set_trainable(copied, "AB", False)
    optimizer = make_optimizer(params, TrainPlan("AB", False, 1, 1e-3, batch_size, SEED))
    settings = DPSettings(epsilon=3.0, delta=1e-5, max_grad_norm=1.0, accountant="prv", grad_sample_mode=mode)
    ledger = PrivacyLedger(accountant="prv", noise_multiplier=1.0, sample_rate=batch_size / len(data))
    return make_private(copied, optimizer, data, batch_size, settings, ledger, torch.Generator().manual_seed(SEED))


def main(
    config_path: str = "simulations/instruct_tiny.toml",
    device_name: str | None = None,
    batch_size: int = 16,
    steps: int = 10,
    warmup: int = 3,
    threads: int = 1,
) -> dict[str, dict[str, float]]:
    """Print the step times and the DP / no-DP ratios per mode; return them by mode."""
    quiet()
    if threads > 0:
        torch.set_num_threads(threads)
    device = pick_device(device_name)
    now = _clock(device)
    config = load_config(config_path)
    data = workspace.client_examples(config, 0)
    model = copy.deepcopy(workspace.lora_model(config, workspace.federated_task(config).num_labels)).to(device)
    batch = {k: v.to(device) for k, v in data.batch(torch.arange(batch_size)).items()}
    steps_of: dict[str, Step] = {mode: private(wrapped(model, data, batch_size, mode), batch, now) for mode in MODES[1:]}
    steps_of["none"] = plain(model, batch, now)
    times = {mode: StepTimes([], [], []) for mode in MODES}
    for i in range(warmup + steps):
        for mode in MODES[i % 3 :] + MODES[: i % 3]:  # rotate who goes first
            forward, backward, optimizer = steps_of[mode]()
            if i >= warmup:
                times[mode].forward.append(forward)
                times[mode].backward.append(backward)
                times[mode].step.append(optimizer)
    tiny = config.model.tiny
    on = f"{device}, {torch.get_num_threads()} torch thread(s)" if device.type == "cpu" else str(device)
    print(
        f"causal dp step: tiny Llama (hidden {tiny.hidden_size}, {tiny.num_layers} layers, vocabulary {model.config.vocab_size}),"
        f" LoRA r={config.model.lora_rank} on {'+'.join(config.model.target_modules or ['default'])}, A+B;"
        f" batch {batch_size} x {batch['input_ids'].shape[1]} tokens on {on}; load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    figures: dict[str, dict[str, float]] = {}
    base = times["none"].total()
    for mode in MODES:
        row = times[mode].medians()
        row["ratio"] = row["step_s"] / statistics.median(base)
        row["paired_ratio"] = statistics.median(t / b for t, b in zip(times[mode].total(), base))
        figures[mode] = row
        print(
            f"  {mode:<5} {row['step_s'] * 1e3:7.1f} ms (forward / backward / optimizer"
            f" {row['forward_s'] * 1e3:.1f} / {row['backward_s'] * 1e3:.1f} / {row['optimizer_s'] * 1e3:.1f})"
            f"   / no DP {row['ratio']:.2f} (median of paired steps {row['paired_ratio']:.2f})",
            flush=True,
        )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/instruct_tiny.toml")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    main(args.config, args.device, args.batch, args.steps, args.warmup, args.threads)
