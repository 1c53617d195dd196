"""The server's privacy accounts: what it asked each client to do, and the epsilon that follows.

The server holds the record; a client's figures are a check (DESIGN.md sections 4 and 7):
- at the start it plans every client's noise from what it knows (declared example count, batch
  size, rounds, participation; `fedlora.privacy.calibrate_noise`), once for the run;
- each round it samples only clients whose next round keeps them within epsilon (`spent`), and
  tells each sampled client its noise multiplier, sample rate and steps (`instruct`);
- every client it asked to train is charged the instructed steps (`charge`), whether or not its
  update arrives or is accepted, since the client may have trained and the release happened;
  only an explicit refusal (the client did not train) costs nothing;
- a reply's ledger must be exactly the server's ledger of that client, and its reported epsilon
  the server's own figure (`check_reply`): one that claims less noise, a higher sample rate, more
  steps or a smaller epsilon is refused with its reason;
- epsilon per client is computed by Opacus' accountant from the server's ledger, never taken
  from a reply; the checkpoint keeps plans and ledgers, so a resumed run goes on from them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from logging import INFO
from typing import Any

from flwr.app import ConfigRecord, Message
from flwr.common.logger import log

from fedlora.config import ExperimentConfig
from fedlora.privacy import (
    DPInstruction,
    DPSettings,
    PrivacyBudgetError,
    PrivacyLedger,
    calibrate_noise,
    check_delta,
    planned_participations,
    sample_rate,
)

LEDGER_KEY = "privacy-ledger"  # the record a reply's ledger travels in (as clients/app.py names it)
METRICS_KEY = "metrics"
# Reported and server-computed epsilons are computed by the same code from the same history:
# they agree to the last digits, so anything beyond this is a wrong report.
EPSILON_AGREEMENT = 1e-6


def dp_settings(config: ExperimentConfig) -> DPSettings:
    """The DP-SGD settings every client gets."""
    privacy = config.privacy
    return DPSettings(
        epsilon=privacy.epsilon,
        delta=privacy.delta,
        max_grad_norm=privacy.max_grad_norm,
        accountant=privacy.accountant,
        grad_sample_mode=privacy.grad_sample_mode,
    )


# Opacus' PRV accountant discretises the privacy loss on a mesh that grows with the steps: one
# epsilon at 100,000 steps takes about half a minute, calibration asks for a dozen, and far beyond
# it runs for hours or out of memory ("Maximum allowed size exceeded"). RDP's cost does not grow.
MAX_PRV_STEPS = 100_000


def calibrated_steps(config: ExperimentConfig) -> int:
    """DP steps each client's noise is calibrated for: planned participations x local steps.

    PrivacyBudgetError where the accountant cannot count that many (see MAX_PRV_STEPS).
    """
    federation, privacy = config.federation, config.privacy
    rounds = planned_participations(
        federation.rounds,
        federation.clients_per_round,
        federation.num_clients,
        privacy.calibration,
        privacy.participation_quantile,
        privacy.planned_rounds,
    )
    steps = rounds * federation.local_steps
    if privacy.accountant == "prv" and steps > MAX_PRV_STEPS:
        planned = "privacy.planned_rounds" if privacy.planned_rounds is not None else "planned from federation.rounds"
        raise PrivacyBudgetError(
            f"privacy.accountant: 'prv' cannot account for {steps} DP steps a client ({rounds} rounds, {planned}, x "
            f"federation.local_steps {federation.local_steps}; at most {MAX_PRV_STEPS}): set privacy.accountant = 'rdp', "
            "or plan fewer rounds or local steps"
        )
    return steps


@dataclass(frozen=True)
class ClientPlan:
    """A client's DP plan for the run: its Poisson sample rate and calibrated noise."""

    sample_rate: float
    noise_multiplier: float


def plan_clients(config: ExperimentConfig, examples: dict[int, int]) -> dict[int, ClientPlan]:
    """Every client's plan from its declared example count (PrivacyBudgetError if infeasible).

    Clients with the same sample rate share one calibration (it is cached), so a federation of
    equal clients calibrates once.
    """
    settings = dp_settings(config)
    check_delta(settings.delta, min(examples.values()))
    steps = calibrated_steps(config)
    rates = {client: sample_rate(n, config.federation.batch_size) for client, n in examples.items()}
    noise = {
        rate: calibrate_noise(settings.accountant, settings.epsilon, settings.delta, rate, steps)
        for rate in sorted(set(rates.values()), reverse=True)
    }
    return {client: ClientPlan(rate, noise[rate]) for client, rate in rates.items()}


class PrivacyAccounts:
    """The server's ledger of every client (see the module docstring)."""

    def __init__(self, settings: DPSettings, local_steps: int, plans: dict[int, ClientPlan]) -> None:
        self.settings = settings
        self.local_steps = local_steps
        self.plans = dict(plans)
        self.ledgers = {
            client: PrivacyLedger(settings.accountant, plan.noise_multiplier, plan.sample_rate) for client, plan in plans.items()
        }
        self.reported: dict[int, float] = {}  # client id -> the epsilon its last reply stated

    @classmethod
    def for_run(cls, config: ExperimentConfig, examples: dict[int, int]) -> PrivacyAccounts:
        """Plan every client of a run from the handshake's declared example counts."""
        log(INFO, "calibrating DP noise for %d clients", len(examples))
        return cls(dp_settings(config), config.federation.local_steps, plan_clients(config, examples))

    # --- each round ------------------------------------------------------------------------
    def spent(self) -> dict[int, str]:
        """Clients whose next round would exceed epsilon: they are not sampled again."""
        epsilon, delta = self.settings.epsilon, self.settings.delta
        return {
            client: f"privacy budget spent: another round would take epsilon to {ledger.epsilon(delta, self.local_steps):.3f}"
            for client, ledger in self.ledgers.items()
            if not ledger.can_afford(epsilon, delta, self.local_steps)
        }

    def instruct(self, client: int) -> ConfigRecord:
        """The dp-* entries of this client's train config, with the server's copy of its ledger."""
        plan = self.plans[client]
        entries = DPInstruction(plan.noise_multiplier, plan.sample_rate, self.local_steps).to_config()
        return ConfigRecord({**self.settings.to_config(), **entries})

    def ledger_record(self, client: int) -> ConfigRecord:
        """The server's ledger of a client, sent along so a client that lost its own goes on from it."""
        return self.ledgers[client].to_record()

    def charge(self, sampled: list[int], replies: list[Message], clients: dict[int, int]) -> None:
        """Charge every sampled client the instructed steps, except those that explicitly refused."""
        refused = {clients[m.metadata.src_node_id] for m in replies if _is_refusal(m) and m.metadata.src_node_id in clients}
        for client in sampled:
            if client not in refused:
                ledger = self.ledgers[client]
                ledger.history.append((ledger.noise_multiplier, ledger.sample_rate, self.local_steps))
                ledger.history = list(ledger.merged())

    def check_reply(self, client: int, message: Message) -> str | None:
        """Why a trained reply's privacy figures disagree with the server's instructions, or None."""
        record = message.content.config_records.get(LEDGER_KEY)
        if record is None:
            return "privacy: the reply carries no privacy ledger"
        try:
            reported = PrivacyLedger.from_record(record)
        except (KeyError, TypeError, ValueError) as err:
            return f"privacy: the reply's ledger is malformed ({type(err).__name__}: {err})"
        problem = ledger_mismatch(reported, self.ledgers[client])
        if problem:
            return f"privacy: {problem}"
        claimed = message.content[METRICS_KEY].get("epsilon")
        computed = self.epsilon(client)
        if not isinstance(claimed, (int, float)) or not math.isclose(claimed, computed, rel_tol=EPSILON_AGREEMENT, abs_tol=1e-9):
            return f"privacy: the reply claims epsilon {claimed!r}, the server computes {computed:.6f} from its instructions"
        self.reported[client] = float(claimed)
        return None

    # --- figures ---------------------------------------------------------------------------
    def epsilon(self, client: int) -> float:
        """The client's cumulative epsilon, from the server's ledger."""
        return self.ledgers[client].epsilon(self.settings.delta)

    def trained(self) -> list[int]:
        """Clients charged at least one step."""
        return [client for client, ledger in self.ledgers.items() if ledger.steps]

    def epsilon_max_mean(self) -> tuple[float | None, float | None]:
        """Max and mean epsilon over the clients that have trained."""
        values = [self.epsilon(client) for client in self.trained()]
        if not values:
            return None, None
        return max(values), sum(values) / len(values)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per client: noise multiplier, sample rate, steps, epsilon (the server's), the last reported, delta."""
        out = {}
        for client in sorted(self.ledgers):
            ledger = self.ledgers[client]
            out[str(client)] = {
                "noise-multiplier": ledger.noise_multiplier,
                "sample-rate": ledger.sample_rate,
                "dp-steps": ledger.steps,
                "epsilon": self.epsilon(client),
                "reported-epsilon": self.reported.get(client),
                "delta": self.settings.delta,
            }
        return out

    # --- checkpoint ------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: plans, ledgers and the last reported figures."""
        return {
            "plans": {client: [plan.sample_rate, plan.noise_multiplier] for client, plan in self.plans.items()},
            "ledgers": {client: dict(ledger.to_record()) for client, ledger in self.ledgers.items()},
            "reported": dict(self.reported),
        }

    @classmethod
    def from_state(cls, config: ExperimentConfig, state: dict[str, Any]) -> PrivacyAccounts:
        """Accounts as a checkpoint kept them (no recalibration: the plan is part of the run)."""
        plans = {int(client): ClientPlan(float(rate), float(noise)) for client, (rate, noise) in state["plans"].items()}
        accounts = cls(dp_settings(config), config.federation.local_steps, plans)
        accounts.ledgers = {int(c): PrivacyLedger.from_record(record) for c, record in state["ledgers"].items()}
        accounts.reported = {int(c): float(e) for c, e in state["reported"].items()}
        return accounts


def ledger_mismatch(reported: PrivacyLedger, expected: PrivacyLedger) -> str | None:
    """How a client's reported ledger departs from the server's, or None when they agree exactly."""
    if reported.accountant != expected.accountant:
        return f"accountant {reported.accountant!r}, instructed {expected.accountant!r}"
    for noise, rate, _ in reported.history:
        if noise < expected.noise_multiplier:
            return f"noise multiplier {noise:.6g} below the instructed {expected.noise_multiplier:.6g}"
        if rate > expected.sample_rate:
            return f"sample rate {rate:.6g} above the instructed {expected.sample_rate:.6g}"
    if reported.steps > expected.steps:
        return f"{reported.steps} DP steps, more than the {expected.steps} the server asked for"
    if reported.merged() != expected.merged():
        return f"history {list(reported.merged())} differs from the instructed {list(expected.merged())}"
    return None


def _is_refusal(message: Message) -> bool:
    if message.has_error() or METRICS_KEY not in message.content.metric_records:
        return False
    flag = message.content[METRICS_KEY].get("refused", 0)
    return isinstance(flag, (int, float)) and flag == 1
