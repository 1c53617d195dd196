"""A client's local training step under DP-SGD (Opacus, hooks mode) against the same step without DP.

For B-only training (FFA-LoRA, FedSVD) and A+B training (FedIT, LoRA-FAIR) of the LoRA model
`fedlora.model.build_lora_model` builds (default: all-MiniLM-L6-v2 with the default config's
adapters on query and value, rank 8, trainable head), times one optimizer step on a fixed batch:

- no DP: forward with labels, backward, AdamW step, as `clients.trainer.train_local` does;
- DP: the model wrapped by `fedlora.privacy.make_private` (per-sample clipping of every trained
  parameter, Gaussian noise, accountant hook), step as `clients.trainer.train_local_private`
  takes it: logits, cross-entropy, backward, DP optimizer step.

The two models take their steps alternately, so that both see the same load on a shared
machine; each figure is the median over the timed steps after some warm-up steps. Beside the
ratio of the medians, the median of the per-pair ratios and the ratio of the fastest steps
are printed: on a busy machine they are the steadier estimates. The DP
optimizer draws noise on every step and the Opacus engine is built once, outside the timing:
its one-off cost per round (copying the model, wrapping it) is printed separately.
The batch has `--batch` examples of `--seq` tokens (no padding); the defaults are the
quickstart config's batch size (16) and model.max_length (64), the widest a batch gets there.
On CPU it runs with one torch thread by default, what `fedlora.simulation` gives each client
(federation.client_cpus = 1); --threads 0 leaves torch's default (one per core).

    python -m tests.benchmarks.bench_dp_step [--model default|tiny|roberta-large-shape]
        [--device cpu|cuda] [--batch 16] [--seq 64] [--steps 10] [--warmup 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn

from clients.trainer import set_trainable
from fedlora.config import ExperimentConfig, ModelConfig
from fedlora.data.encode import EncodedExamples
from fedlora.lora import LoraState
from fedlora.model import build_lora_model, lora_config
from fedlora.privacy import (
    DPSettings,
    PrivacyLedger,
    PrivateTraining,
    calibrate_noise,
    epsilon_of,
    make_private,
    planned_participations,
    sample_rate,
)

MODELS = ("default", "tiny", "roberta-large-shape")
MODES = ("B", "AB")
NUM_LABELS = 8  # classes of the built-in corpus
SEED = 0
# RoBERTa-large's dimensions (355M parameters), random weights: nothing to download.
ROBERTA_LARGE = {
    "vocab_size": 50265,
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "intermediate_size": 4096,
    "max_position_embeddings": 514,
    "type_vocab_size": 1,
    "pad_token_id": 1,
}


def build_model(name: str) -> tuple[nn.Module, int, str]:
    """The LoRA model, its vocabulary size and a description, for a --model choice."""
    if name == "default":
        config = ExperimentConfig().model
        model = build_lora_model(config, NUM_LABELS, SEED)
        return model, model.config.vocab_size, f"all-MiniLM-L6-v2 (pretrained), {_adapters(config)}"
    if name == "tiny":
        from tests.conftest import tiny_config

        config = tiny_config().model
        model = build_lora_model(config, NUM_LABELS, SEED)
        return model, model.config.vocab_size, f"tiny BERT (tests.conftest), {_adapters(config)}"
    if name == "roberta-large-shape":
        from peft import get_peft_model
        from transformers import RobertaConfig, RobertaForSequenceClassification

        config = ExperimentConfig().model
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            base = RobertaForSequenceClassification(RobertaConfig(num_labels=NUM_LABELS, **ROBERTA_LARGE))
            model = get_peft_model(base, lora_config(config))
        return model, ROBERTA_LARGE["vocab_size"], f"RoBERTa-large shape (random weights), {_adapters(config)}"
    raise ValueError(f"--model: one of {', '.join(MODELS)}")


def _adapters(config: ModelConfig) -> str:
    head = ", trainable head" if config.train_head else ""
    return f"LoRA r={config.lora_rank} on {'+'.join(config.target_modules)}{head}"


def fixed_batch(batch: int, seq: int, vocab_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Random token ids, full attention, random labels: the same batch for every step."""
    g = torch.Generator().manual_seed(SEED)
    return {
        "input_ids": torch.randint(5, vocab_size, (batch, seq), generator=g).to(device),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long).to(device),
        "labels": torch.randint(0, NUM_LABELS, (batch,), generator=g).to(device),
    }


@dataclass
class StepTimes:
    """Seconds of each timed step, split into forward, backward and optimizer step."""

    forward: list[float]
    backward: list[float]
    step: list[float]

    def total(self) -> list[float]:
        """Whole-step seconds, one per timed step."""
        return [f + b + s for f, b, s in zip(self.forward, self.backward, self.step)]

    def medians(self) -> dict[str, float]:
        """Median seconds of each phase and of the whole step."""
        return {
            "step_s": statistics.median(self.total()),
            "forward_s": statistics.median(self.forward),
            "backward_s": statistics.median(self.backward),
            "optimizer_s": statistics.median(self.step),
        }


def _clock(device: torch.device) -> Callable[[], float]:
    if device.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return now
    return time.perf_counter


def plain_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], now: Callable[[], float]
) -> tuple[float, float, float]:
    """One step as `train_local` takes it; (forward, backward, optimizer) seconds."""
    t0 = now()
    loss = model(**batch).loss
    t1 = now()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = now()
    optimizer.step()
    t3 = now()
    return t1 - t0, t2 - t1, t3 - t2


def private_step(
    training: PrivateTraining, batch: dict[str, torch.Tensor], now: Callable[[], float]
) -> tuple[float, float, float]:
    """One step as `train_local_private` takes it; (forward, backward, optimizer) seconds."""
    t0 = now()
    logits = training.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    criterion = training.criterion or nn.functional.cross_entropy
    loss = criterion(logits, batch["labels"])
    t1 = now()
    training.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    t2 = now()
    training.optimizer.step()
    t3 = now()
    return t1 - t0, t2 - t1, t3 - t2


def make_private_copy(
    model: nn.Module, trains: str, train_head: bool, batch: dict[str, torch.Tensor], grad_sample_mode: str
) -> PrivateTraining:
    """What `train_local_private` builds before its first step: a copy, frozen, wrapped."""
    private = copy.deepcopy(model)
    params = set_trainable(private, trains, train_head)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    # The loader is built but not used: every step gets the same fixed batch. Data of 10
    # batches gives the sample rate of a client with 160 examples.
    n = len(batch["labels"])
    data = EncodedExamples(
        input_ids=batch["input_ids"].cpu().repeat(10, 1),
        attention_mask=batch["attention_mask"].cpu().repeat(10, 1),
        labels=batch["labels"].cpu().repeat(10),
    )
    settings = DPSettings(epsilon=3.0, delta=1e-5, max_grad_norm=1.0, accountant="prv", grad_sample_mode=grad_sample_mode)
    # Calibrating takes seconds and does not change the step's cost: any noise level will do.
    ledger = PrivacyLedger(accountant="prv", noise_multiplier=1.0, sample_rate=1 / 10)
    return make_private(private, optimizer, data, n, settings, ledger, torch.Generator().manual_seed(SEED))


def measure_mode(
    model: nn.Module, trains: str, batch: dict[str, torch.Tensor], steps: int, warmup: int, grad_sample_mode: str = "hooks"
) -> dict[str, float]:
    """Median step seconds with and without DP for one choice of trained factors."""
    device = batch["input_ids"].device
    now = _clock(device)
    train_head = any("modules_to_save" in name for name, _ in model.named_parameters())
    # The private side first: it copies the model before set_trainable touches the original.
    started = now()
    copied = copy.deepcopy(model)
    copy_s = now() - started
    del copied
    started = now()
    training = make_private_copy(model, trains, train_head, batch, grad_sample_mode)
    setup_s = now() - started
    training.module.train()
    params = set_trainable(model, trains, train_head)
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    model.train()
    plain, private = StepTimes([], [], []), StepTimes([], [], [])
    for i in range(warmup + steps):
        # Alternate which goes first, so neither always follows the other's allocations.
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for which in order:
            if which == 0:
                phases = plain_step(model, optimizer, batch, now)
                target = plain
            else:
                phases = private_step(training, batch, now)
                target = private
            if i >= warmup:
                target.forward.append(phases[0])
                target.backward.append(phases[1])
                target.step.append(phases[2])
    if training.criterion is None:  # ghost clipping computes norms, never per-sample gradients
        check_per_sample_clipping(training, batch)
    trained = sum(p.numel() for p in params)
    figures = {f"plain_{k}": v for k, v in plain.medians().items()}
    figures.update({f"dp_{k}": v for k, v in private.medians().items()})
    figures.update(
        ratio=figures["dp_step_s"] / figures["plain_step_s"],
        ratio_of_minimums=min(private.total()) / min(plain.total()),
        # Step i of each side ran back to back: their ratio shares the machine's load of the moment.
        paired_ratio=statistics.median(d / p for d, p in zip(private.total(), plain.total())),
        copy_s=copy_s,
        make_private_s=setup_s,
        trained_params=trained,
    )
    return figures


def measure_accounting(round_steps: int) -> dict[str, float]:
    """Seconds of the privacy accounting a DP round costs besides its steps, as the server and clients/app.py do it.

    The default experiment's settings: its privacy section, a client with 1/10 of the built-in
    corpus (sample rate 1/ceil(300/16)), noise calibrated for the rounds it is expected to join.
    Per round the client computes its epsilon before training, checks it can afford the round
    (an epsilon with the round's steps added) and reports its epsilon after; once per run the
    server calibrates the noise multiplier.
    """
    config = ExperimentConfig()
    privacy, federation = config.privacy, config.federation
    client_examples = config.data.num_train // federation.num_clients
    rate = sample_rate(client_examples, federation.batch_size)
    planned = planned_participations(federation.rounds, federation.clients_per_round, federation.num_clients, privacy.calibration)
    calibrate_noise.cache_clear()
    epsilon_of.cache_clear()
    started = time.perf_counter()
    noise = calibrate_noise(privacy.accountant, privacy.epsilon, privacy.delta, rate, planned * round_steps)
    calibrate_s = time.perf_counter() - started
    epsilon_of.cache_clear()  # what a client process, which calibrated nothing, computes afresh
    ledger = PrivacyLedger(accountant=privacy.accountant, noise_multiplier=noise, sample_rate=rate)
    ledger.history = [(noise, rate, round_steps)]  # one round done
    started = time.perf_counter()
    ledger.epsilon(privacy.delta)
    ledger.can_afford(privacy.epsilon, privacy.delta, round_steps)
    ledger.history = [(noise, rate, 2 * round_steps)]
    ledger.epsilon(privacy.delta)
    return {"calibrate_s": calibrate_s, "accounting_s": time.perf_counter() - started, "accountant": privacy.accountant}


def check_per_sample_clipping(training: PrivateTraining, batch: dict[str, torch.Tensor]) -> None:
    """After a DP backward, every trained parameter holds one gradient per example (and only they do)."""
    training.optimizer.zero_grad(set_to_none=True)
    logits = training.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    (training.criterion or nn.functional.cross_entropy)(logits, batch["labels"]).backward()
    n = len(batch["labels"])
    for name, param in training.module.named_parameters():
        sample = getattr(param, "grad_sample", None)
        if param.requires_grad and (sample is None or tuple(sample.shape) != (n, *param.shape)):
            raise AssertionError(f"{name}: no per-sample gradient of shape ({n}, {tuple(param.shape)})")
        if not param.requires_grad and sample is not None:
            raise AssertionError(f"{name}: frozen, yet has per-sample gradients")
    training.optimizer.zero_grad(set_to_none=True)


def quiet() -> None:
    """Keep library chatter that says nothing about speed out of the table."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # Opacus, on every engine
    # Opacus' full backward hooks on a LoRA module whose input needs no gradient (layer 0).
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")  # accountant analysis


def pick_device(name: str | None) -> torch.device:
    """--device, or cuda when there is one."""
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(
    model_name: str = "default",
    device_name: str | None = None,
    batch_size: int = 16,
    seq: int = 64,
    steps: int = 10,
    warmup: int = 3,
    modes: tuple[str, ...] = MODES,
    grad_sample_mode: str = "hooks",
    threads: int = 1,
    round_steps: int = 20,
) -> dict[str, dict[str, float]]:
    """Print a table of step times with and without DP per mode; return the figures by mode."""
    quiet()
    if threads > 0:
        torch.set_num_threads(threads)
    device = pick_device(device_name)
    model, vocab_size, description = build_model(model_name)
    model.to(device)
    batch = fixed_batch(batch_size, seq, vocab_size, device)
    on = f"{device}, {torch.get_num_threads()} torch thread(s)" if device.type == "cpu" else str(device)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"dp step: {description}; batch {batch_size} x {seq} tokens on {on} (load average {load}); Opacus {grad_sample_mode} mode"
    )
    print(f"  median of {steps} steps after {warmup} warm-up; per step: forward / backward / optimizer (ms)")
    initial = LoraState.from_model(model)
    figures = {}
    for trains in modes:
        initial.load_into(model)  # each mode starts from the freshly built adapters
        row = measure_mode(model, trains, batch, steps, warmup, grad_sample_mode)
        figures[trains] = row
        label = "B only" if trains == "B" else "A+B"
        print(
            f"  {label:<6} ({row['trained_params']:>9,} trained)  no DP {row['plain_step_s'] * 1e3:8.1f} ms"
            f" ({_phases(row, 'plain')})   DP {row['dp_step_s'] * 1e3:8.1f} ms ({_phases(row, 'dp')})"
            f"   DP/no-DP {row['ratio']:.2f} (median of paired steps {row['paired_ratio']:.2f},"
            f" of the fastest {row['ratio_of_minimums']:.2f})",
            flush=True,
        )
    one_off = figures[modes[0]]
    print(
        f"  once per DP round, not in the steps above: deepcopy of the model {one_off['copy_s'] * 1e3:.0f} ms,"
        f" copy + freeze + make_private {one_off['make_private_s'] * 1e3:.0f} ms"
    )
    if round_steps > 0:
        accounting = measure_accounting(round_steps)
        print(
            f"  and in clients/app.py ({accounting['accountant']} accountant): epsilon before, can-afford check and"
            f" epsilon after, {accounting['accounting_s'] * 1e3:.0f} ms a round; the server calibrates the noise"
            f" once per run, {accounting['calibrate_s'] * 1e3:.0f} ms"
        )
        for trains, row in figures.items():
            plain_round = round_steps * row["plain_step_s"]
            private_round = round_steps * row["dp_step_s"] + row["make_private_s"] + accounting["accounting_s"]
            row["round_ratio"] = private_round / plain_round
            row["first_round_ratio"] = (private_round + accounting["calibrate_s"]) / plain_round
            label = "B only" if trains == "B" else "A+B"
            print(
                f"  a client's round of {round_steps} steps, {label}: DP / no DP {row['round_ratio']:.2f}"
                f" (its first round {row['first_round_ratio']:.2f}), composed from the figures above"
            )
    return figures


def _phases(row: dict[str, float], side: str) -> str:
    return " / ".join(f"{row[f'{side}_{phase}_s'] * 1e3:.0f}" for phase in ("forward", "backward", "optimizer"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="default")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--modes", default="B,AB", help="comma-separated: B, AB")
    parser.add_argument(
        "--grad-sample-mode",
        choices=("hooks", "ghost", "functorch"),
        default="hooks",
        help="Opacus grad_sample_mode (default: hooks, as privacy.grad_sample_mode)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads: 1 (default) is what a simulated client gets (federation.client_cpus); 0: torch's default",
    )
    parser.add_argument(
        "--round-steps",
        type=int,
        default=20,
        help="local steps of a client's round, for the per-round figures (default: federation.local_steps); 0: skip them",
    )
    args = parser.parse_args()
    main(
        args.model,
        args.device,
        args.batch,
        args.seq,
        args.steps,
        args.warmup,
        tuple(args.modes.split(",")),
        args.grad_sample_mode,
        args.threads,
        args.round_steps,
    )
