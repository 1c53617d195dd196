"""Sample-level DP-SGD for clients (Opacus), with accounting that composes across rounds.

A client's privacy loss composes over every local step of every round it joins. Its accountant
history, the (noise multiplier, sample rate, steps) triples Opacus keeps, lives in a
`PrivacyLedger` that the ClientApp saves in `context.state` after each round and restores
before the next (and the server checkpoint can carry). Never a fresh accountant per round.

The noise multiplier is calibrated once, at the client's first round, for the planned total of
its steps (`DPSettings.planned_steps`) and the target (epsilon, delta); it stays fixed. A client
whose next round would take it past the target refuses to train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from flwr.app import ConfigRecord
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlora.data.encode import EncodedExamples

ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}
# Calibration aims a little under the target so that rounding in the accountant never tips a
# client that follows its plan over its budget.
CALIBRATION_TOLERANCE = 0.01
# A step that would exceed the target by less than this is float noise, not overspending.
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class DPSettings:
    """What the server asks of every client under DP (travels in the train config as dp-*)."""

    epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"
    planned_steps: int = 1

    def to_config(self) -> dict[str, object]:
        """Entries of the train message's ConfigRecord."""
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-max-grad-norm": self.max_grad_norm,
            "dp-accountant": self.accountant,
            "dp-grad-sample-mode": self.grad_sample_mode,
            "dp-planned-steps": self.planned_steps,
        }

    @classmethod
    def from_config(cls, config: ConfigRecord | dict) -> DPSettings | None:
        """Read back from a train config; None when the message asks for no DP."""
        if "dp-epsilon" not in config:
            return None
        return cls(
            epsilon=float(config["dp-epsilon"]),
            delta=float(config["dp-delta"]),
            max_grad_norm=float(config["dp-max-grad-norm"]),
            accountant=str(config["dp-accountant"]),
            grad_sample_mode=str(config["dp-grad-sample-mode"]),
            planned_steps=int(config["dp-planned-steps"]),
        )


@dataclass
class PrivacyLedger:
    """One client's accountant history and its calibrated noise, kept across rounds."""

    accountant: str = "prv"
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """DP steps taken so far, over all rounds."""
        return sum(steps for _, _, steps in self.history)

    @property
    def calibrated(self) -> bool:
        """Whether the noise multiplier has been set (at the client's first DP round)."""
        return self.noise_multiplier > 0

    def calibrate(self, settings: DPSettings, sample_rate: float) -> None:
        """Fix the noise multiplier for the planned steps at this sample rate (once)."""
        self.accountant = settings.accountant
        self.sample_rate = sample_rate
        self.noise_multiplier = get_noise_multiplier(
            target_epsilon=settings.epsilon * (1 - CALIBRATION_TOLERANCE),
            target_delta=settings.delta,
            sample_rate=sample_rate,
            steps=settings.planned_steps,
            accountant=settings.accountant,
            epsilon_tolerance=CALIBRATION_TOLERANCE * settings.epsilon / 2,
        )

    def make_accountant(self) -> IAccountant:
        """An Opacus accountant holding this ledger's history."""
        accountant = ACCOUNTANTS[self.accountant]()
        accountant.history = list(self.history)
        return accountant

    def epsilon(self, delta: float, extra_steps: int = 0) -> float:
        """Cumulative epsilon so far, or after `extra_steps` more steps at the calibrated noise."""
        accountant = self.make_accountant()
        if extra_steps:
            accountant.history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        if not accountant.history:
            return 0.0
        return float(accountant.get_epsilon(delta=delta))

    def can_afford(self, settings: DPSettings, steps: int) -> bool:
        """Whether `steps` more steps keep the client within its epsilon."""
        return self.epsilon(settings.delta, steps) <= settings.epsilon + BUDGET_SLACK

    def to_record(self) -> ConfigRecord:
        """Encode for `context.state`."""
        return ConfigRecord(
            {
                "accountant": self.accountant,
                "noise-multiplier": self.noise_multiplier,
                "sample-rate": self.sample_rate,
                "history-noise": [float(n) for n, _, _ in self.history],
                "history-rate": [float(q) for _, q, _ in self.history],
                "history-steps": [int(s) for _, _, s in self.history],
            }
        )

    @classmethod
    def from_record(cls, record: ConfigRecord) -> PrivacyLedger:
        """Decode from `context.state`."""
        history = zip(record["history-noise"], record["history-rate"], record["history-steps"])
        return cls(
            accountant=str(record["accountant"]),
            noise_multiplier=float(record["noise-multiplier"]),
            sample_rate=float(record["sample-rate"]),
            history=[(float(n), float(q), int(s)) for n, q, s in history],
        )


@dataclass
class PrivateTraining:
    """A model, optimizer and Poisson-sampled loader wrapped by Opacus for one round."""

    module: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: PrivacyEngine
    criterion: nn.Module | None  # ghost clipping's wrapped loss; None in the other modes

    def record_into(self, ledger: PrivacyLedger) -> None:
        """Copy the accountant's history (old rounds + this one) back into the ledger."""
        ledger.history = [(float(n), float(q), int(s)) for n, q, s in self.engine.accountant.history]


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: EncodedExamples,
    batch_size: int,
    settings: DPSettings,
    ledger: PrivacyLedger,
    generator: torch.Generator,
) -> PrivateTraining:
    """Wrap for DP-SGD; the engine's accountant continues the ledger's history.

    Freeze what must not train before calling: Opacus hooks only trainable modules.
    """
    engine = PrivacyEngine(accountant=ledger.accountant)
    engine.accountant.history = list(ledger.history)
    dataset = TensorDataset(data.input_ids, data.attention_mask, data.labels)
    loader = DataLoader(dataset, batch_size=batch_size, generator=generator)
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=ledger.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        poisson_sampling=True,
        grad_sample_mode=settings.grad_sample_mode,
        criterion=nn.CrossEntropyLoss(),
    )
    if len(wrapped) == 4:  # ghost clipping: (module, optimizer, wrapped criterion, loader)
        module, optimizer, criterion, loader = wrapped
        return PrivateTraining(module, optimizer, loader, engine, criterion)
    module, optimizer, loader = wrapped
    return PrivateTraining(module, optimizer, loader, engine, None)


def zero_step_on_empty_batch(training: PrivateTraining) -> None:
    """A Poisson batch can be empty: still take the (noise-only) step the accountant counts."""
    for group in training.optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
