"""Sample-level DP-SGD for clients (Opacus), with accounting that composes across rounds.

Who decides what
----------------
The server decides each client's privacy: it knows every client's declared example count (the
handshake), the batch size, the rounds and the participation, so it computes each client's
Poisson sample rate q_k = 1 / ceil(n_k / batch) and calibrates its noise multiplier once, for
the run (`calibrate_noise`), and sends both in every train message (`DPInstruction`). The
client checks the instruction against its own data and budget, trains, and reports its ledger;
the server keeps its own ledger of what it asked each client to do and computes every epsilon
itself (fedlora/accounting.py). Never a fresh accountant per round.

Calibration for the participation a client will actually have
--------------------------------------------------------------
A client joins a round with probability p = clients_per_round / num_clients, so over R rounds
it joins Binomial(R, p) of them. The noise is calibrated for P rounds of `local_steps` steps
each (`planned_participations`):
- "expected" (default, as the official FedSVD code does): P = ceil(R p);
- "quantile": P = the `participation_quantile` quantile of Binomial(R, p), so that few clients
  run out of budget before the end;
- "worst_case": P = R, as if every client joined every round (the most noise);
- `planned_rounds`, when set, fixes P directly.
The guard stays whatever the rule: the server samples only clients whose next round keeps
them within epsilon, so a client sampled more often than planned stops being sampled once its
budget is spent, and a client that is asked anyway refuses.

The noise multiplier is searched within [SIGMA_MIN, SIGMA_MAX]: a target epsilon that needs
less noise than SIGMA_MIN (epsilon enormous) or is out of reach even at SIGMA_MAX (epsilon
tiny) is refused before anything starts, in one line that says what is feasible. So is a delta
of at least 1 / n for the smallest client (Opacus' advice: delta well below 1 / n).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from flwr.app import ConfigRecord
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant
from scipy.stats import binom
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedlora.config import ConfigError
from fedlora.data.encode import EncodedExamples

# Opacus calls logging.basicConfig() when imported (opacus/utils/module_utils.py), giving the root
# logger a stderr handler; Flower's logger propagates to the root, so every line it prints (each
# round, in `flwr run`'s log) would print twice, the second time with Opacus' format. Take that
# one handler off again; a root handler the user configured has another format and stays.
_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def _drop_opacus_root_handler() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.formatter is not None and handler.formatter._fmt == _OPACUS_FORMAT:
            root.removeHandler(handler)


_drop_opacus_root_handler()

ACCOUNTANTS: dict[str, type[IAccountant]] = {"prv": PRVAccountant, "rdp": RDPAccountant}
# Calibration aims a little under the target so that rounding in the accountant never tips a
# client that follows its plan over its budget; it accepts anything in [aim - tolerance, aim].
CALIBRATION_AIM = 0.99
CALIBRATION_TOLERANCE = 0.005
# The noise multipliers calibration may choose from. Below SIGMA_MIN the accountants get slow
# and the guarantee meaningless; above SIGMA_MAX training is noise.
SIGMA_MIN = 0.3
SIGMA_MAX = 100.0
SEARCH_STEPS = 40
# A step that would exceed the target by less than this is float noise, not overspending.
BUDGET_SLACK = 1e-9
# What an out-of-reach example-level target can change (the user level has its own: fedlora/user_privacy.py).
EXAMPLE_LEVEL_REMEDY = "train fewer steps, larger batches, more data per client"

History = tuple[tuple[float, float, int], ...]


class PrivacyBudgetError(ConfigError):
    """A privacy target no noise multiplier can meet for these settings."""


@dataclass(frozen=True)
class DPSettings:
    """What the server asks of every client under DP (travels in the train config as dp-*)."""

    epsilon: float
    delta: float
    max_grad_norm: float
    accountant: str = "prv"
    grad_sample_mode: str = "hooks"

    def to_config(self) -> dict[str, object]:
        """Entries of the train message's ConfigRecord."""
        return {
            "dp-epsilon": self.epsilon,
            "dp-delta": self.delta,
            "dp-max-grad-norm": self.max_grad_norm,
            "dp-accountant": self.accountant,
            "dp-grad-sample-mode": self.grad_sample_mode,
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
        )


@dataclass(frozen=True)
class DPInstruction:
    """What one client must do this round under DP: its noise, its sample rate, its steps."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def to_config(self) -> dict[str, object]:
        """Entries of that client's train config."""
        return {"dp-noise-multiplier": self.noise_multiplier, "dp-sample-rate": self.sample_rate, "dp-steps": self.steps}

    @classmethod
    def from_config(cls, config: ConfigRecord | dict) -> DPInstruction:
        """Read back from a client's train config."""
        return cls(float(config["dp-noise-multiplier"]), float(config["dp-sample-rate"]), int(config["dp-steps"]))


def sample_rate(num_examples: int, batch_size: int) -> float:
    """The Poisson sample rate Opacus uses for this data and batch size: 1 / ceil(n / batch)."""
    return 1.0 / math.ceil(num_examples / batch_size)


def planned_participations(
    rounds: int, clients_per_round: int, num_clients: int, rule: str, quantile: float = 0.9, planned_rounds: int | None = None
) -> int:
    """Rounds a client's noise is calibrated for (see the module docstring)."""
    if planned_rounds is not None:
        return planned_rounds
    p = clients_per_round / num_clients
    if rule == "worst_case" or p >= 1.0:
        return rounds
    if rule == "expected":
        return max(1, math.ceil(rounds * p - 1e-9))
    if rule == "quantile":
        return max(1, int(binom.ppf(quantile, rounds, p)))
    raise ValueError(f"unknown calibration rule {rule!r}")


def merged_history(history: list[tuple[float, float, int]] | History) -> History:
    """A history with consecutive entries of the same (noise, rate) merged, as Opacus' accountant keeps it."""
    merged: list[tuple[float, float, int]] = []
    for noise, rate, steps in history:
        if merged and merged[-1][:2] == (float(noise), float(rate)):
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + int(steps))
        else:
            merged.append((float(noise), float(rate), int(steps)))
    return tuple(merged)


@lru_cache(maxsize=4096)
def epsilon_of(accountant: str, history: History, delta: float) -> float:
    """Epsilon of a (merged) accountant history at delta, by Opacus' own accountant (cached)."""
    if not history:
        return 0.0
    engine = ACCOUNTANTS[accountant]()
    engine.history = list(history)
    return float(engine.get_epsilon(delta=delta))


def check_delta(delta: float, smallest_client: int) -> None:
    """Refuse a delta that is no privacy at all for the smallest client (Opacus: delta << 1 / n)."""
    if delta >= 1.0 / smallest_client:
        raise PrivacyBudgetError(
            f"privacy.delta: {delta:g} is at least 1/n = 1/{smallest_client} for the smallest client, which lets a "
            f"mechanism reveal whole examples; use a delta well below {1.0 / smallest_client:.2g} (Opacus advises < 1/n)"
        )


@lru_cache(maxsize=256)
def calibrate_noise(
    accountant: str, epsilon: float, delta: float, rate: float, steps: int, remedy: str = EXAMPLE_LEVEL_REMEDY
) -> float:
    """The noise multiplier that spends just under `epsilon` over `steps` steps at sample rate `rate`.

    Brackets the aim (CALIBRATION_AIM * epsilon) searching outwards from sigma = 1 within
    [SIGMA_MIN, SIGMA_MAX], then narrows the bracket by interpolation in log-log space until the
    epsilon spent lies within CALIBRATION_TOLERANCE * epsilon under the aim; PrivacyBudgetError,
    naming what is feasible (and `remedy`, what else could change), when the target lies outside
    what that range can give.
    """
    aim, tolerance = CALIBRATION_AIM * epsilon, CALIBRATION_TOLERANCE * epsilon

    def spent(sigma: float) -> float:
        return epsilon_of(accountant, ((sigma, rate, steps),), delta)

    low, high = _bracket(spent, aim, epsilon, delta, rate, steps, remedy)
    for _ in range(SEARCH_STEPS):
        if spent(high) >= aim - tolerance:
            break
        # log epsilon is nearly linear in log sigma: interpolate there, kept inside the bracket so
        # that every step shrinks it by at least a tenth.
        reach = (math.log(spent(low)) - math.log(aim)) / (math.log(spent(low)) - math.log(spent(high)))
        middle = math.exp(math.log(low) + min(max(reach, 0.1), 0.9) * (math.log(high) - math.log(low)))
        if spent(middle) > aim:
            low = middle
        else:
            high = middle
    return high


def _bracket(spent, aim: float, epsilon: float, delta: float, rate: float, steps: int, remedy: str) -> tuple[float, float]:
    """(low, high) with spent(low) > aim >= spent(high), searched outwards from sigma = 1."""
    where = f"at sample rate {rate:.4g} over {steps} steps, delta {delta:g}"
    sigma = 1.0
    if spent(sigma) > aim:
        while spent(sigma) > aim:
            if sigma >= SIGMA_MAX:
                raise PrivacyBudgetError(
                    f"privacy.epsilon: {epsilon:g} is out of reach {where}: even noise multiplier {SIGMA_MAX:g} spends "
                    f"{spent(SIGMA_MAX):.3g}; the smallest feasible epsilon is about {spent(SIGMA_MAX) / CALIBRATION_AIM:.3g} "
                    f"(or {remedy})"
                )
            sigma = min(SIGMA_MAX, sigma * 4.0)
        return sigma / 4.0, sigma
    while spent(sigma) <= aim:
        if sigma <= SIGMA_MIN:
            raise PrivacyBudgetError(
                f"privacy.epsilon: {epsilon:g} is more than any noise multiplier >= {SIGMA_MIN:g} spends {where} "
                f"(at most {spent(SIGMA_MIN):.3g}): use an epsilon of at most {spent(SIGMA_MIN):.3g}, or turn privacy off"
            )
        sigma = max(SIGMA_MIN, sigma / 2.0)
    return sigma, sigma * 2.0


@dataclass
class PrivacyLedger:
    """One client's accountant history and its instructed noise, kept across rounds."""

    accountant: str = "prv"
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    history: list[tuple[float, float, int]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """DP steps taken so far, over all rounds."""
        return sum(steps for _, _, steps in self.history)

    def merged(self) -> History:
        """The history as Opacus keeps it (consecutive equal entries merged)."""
        return merged_history(self.history)

    def epsilon(self, delta: float, extra_steps: int = 0) -> float:
        """Cumulative epsilon so far, or after `extra_steps` more steps at the instructed noise."""
        history = list(self.history)
        if extra_steps:
            history.append((self.noise_multiplier, self.sample_rate, extra_steps))
        return epsilon_of(self.accountant, merged_history(history), delta)

    def can_afford(self, epsilon: float, delta: float, steps: int) -> bool:
        """Whether `steps` more steps keep the client within `epsilon`."""
        return self.epsilon(delta, steps) <= epsilon + BUDGET_SLACK

    def to_record(self) -> ConfigRecord:
        """Encode for `context.state` and messages."""
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
    def from_record(cls, record: ConfigRecord | dict) -> PrivacyLedger:
        """Decode from `context.state` or a message (ValueError/KeyError/TypeError if malformed)."""
        history = zip(record["history-noise"], record["history-rate"], record["history-steps"], strict=True)
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
    """Wrap for DP-SGD at the ledger's instructed noise; the engine's accountant continues its history.

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
    """A Poisson batch can be empty: still take the (noise-only) step the accountant counts.

    Hooks mode sums per-sample gradients (none here); ghost clipping sums the already-clipped
    gradient in `grad`: both start from zero.
    """
    for group in training.optimizer.param_groups:
        for param in group["params"]:
            if param.requires_grad:
                param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
                param.grad = torch.zeros_like(param)
    training.optimizer.step()
    training.optimizer.zero_grad(set_to_none=True)
