"""One client cannot stop or poison a round with finite values too large for the aggregation.

A reply holding a value beyond `MAX_VALUE` is refused with its reason before any defence or rule
runs (it used to crash zPROBE's fixed-point ring and FLoRA's SVD, or turn FedEx-LoRA's and
FedSVD's state into NaN); a client metric beyond float32 is refused (it used to reach the history
as Infinity); and a state a rule still breaks is not installed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.lora import LoraState
from fedlora.results import HISTORY, read_history, read_summary
from fedlora.roster import Roster
from fedlora.simulation import simulate
from strategies import DEFENCES, STRATEGIES
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY, LoraStrategy
from strategies.fedit import FedIT
from strategies.reply_values import MAX_VALUE, finite_metrics
from strategies.robust import Defence
from tests.conftest import reply_from, tiny_config
from tests.test_strategy_base import global_state

pytestmark = pytest.mark.usefixtures("flower_task")

N = 15  # zprobe needs 14 valid replies: 14 honest clients and the hostile one
HOSTILE = 4
NODES = {100 + k: k for k in range(N)}
EXAMPLES = 10
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def new_strategy(name: str, defence: str | None = None) -> LoraStrategy:
    """A registered strategy over N clients who all declared EXAMPLES, behind a registered defence."""
    chosen: Defence | None = None if defence is None else DEFENCES[defence](0.25)
    return STRATEGIES[name](Roster(NODES, dict.fromkeys(NODES.values(), EXAMPLES)), clients_per_round=N, defence=chosen)


def honest_state(strategy: LoraStrategy, client: int) -> LoraState:
    """The global state moved by a small random step, in the factors the strategy's clients train."""
    state = strategy.global_state.select(strategy.uploads, head=True).clone()
    g = torch.Generator().manual_seed(client)
    for tensor in state.tensors().values():
        tensor += 0.01 * torch.randn(tensor.shape, generator=g)
    return state


def alternating(state: LoraState, value: float) -> LoraState:
    """Every trained value set to +value, -value, +value, ... (sums cancel, products overflow)."""
    state = state.clone()
    for tensor in state.tensors().values():
        signs = torch.ones(tensor.numel())
        signs[1::2] = -1.0
        tensor.copy_((value * signs).reshape(tensor.shape))
    return state


def scaled_step(strategy: LoraStrategy, state: LoraState, factor: float) -> LoraState:
    """What the `scaling` attack sends: the client's step from the global state times `factor`."""
    reference = strategy.global_state.select(strategy.uploads, head=True)
    step = state.minus(reference)
    return reference.plus(step.unflatten(factor * step.flatten()))


def reply(strategy: LoraStrategy, client: int, state: LoraState, train_loss: float = 1.0) -> Message:
    """A well-formed reply from a client, with the broadcast A's digest (FFA-LoRA checks it)."""
    content = RecordDict(
        {
            ARRAYS_KEY: state.to_array_record(),
            METRICS_KEY: MetricRecord({"num-examples": EXAMPLES, "train-loss": train_loss}),
            INFO_KEY: ConfigRecord({"a-digest": strategy.global_state.digest("A")}),
        }
    )
    return reply_from(100 + client, content)


Attack = Callable[[LoraStrategy, LoraState], LoraState]  # (strategy, honest state) -> what HOSTILE sends


def run_round(strategy: LoraStrategy, attack: Attack | None = None, hostile_loss: float = 1.0):
    """Round 1 with every client honest except HOSTILE, which sends attack(strategy, its honest state)
    and reports `hostile_loss`."""
    start = strategy.initial_state(global_state())  # as the server starts: Fed-SB's and RAVAN's cores in it
    list(strategy.configure_train(1, start.to_array_record(), ConfigRecord(), grid=None))
    replies = []
    for client in range(N):
        state = honest_state(strategy, client)
        if client == HOSTILE:
            hostile = state if attack is None else attack(strategy, state)
            assert all(torch.isfinite(t).all() for t in hostile.tensors().values())  # finite, maybe too large
            replies.append(reply(strategy, client, strategy.pack_reply(hostile), hostile_loss))
        else:
            replies.append(reply(strategy, client, strategy.pack_reply(state)))
    return strategy.aggregate_train(1, replies)


def refusal_of(strategy: LoraStrategy, client: int) -> str | None:
    """The reason the round refused a client's reply, or None."""
    return next((str(r["reason"]) for r in strategy.last_round.rejected if r.get("client") == client), None)


def assert_installable(arrays) -> None:
    """The new global state holds only finite values within MAX_VALUE."""
    for key, tensor in LoraState.from_array_record(arrays).tensors().items():
        assert torch.isfinite(tensor).all() and float(tensor.abs().max()) <= MAX_VALUE, key


# Issue 24's hostile pass (what each did before: see the module docstring).
ISSUE_CASES: dict[str, tuple[str, str | None, Attack]] = {
    "zprobe, a scaling attacker at 1e12": ("fedit", "zprobe", lambda s, h: scaled_step(s, h, 1e12)),
    "zprobe_refined, a scaling attacker at 1e12": ("fedit", "zprobe_refined", lambda s, h: scaled_step(s, h, 1e12)),
    "flora at 1e38": ("flora", None, lambda s, h: alternating(h, 1e38)),
    "fedex_lora at +-2e38": ("fedex_lora", None, lambda s, h: alternating(h, 2e38)),
    "fedsvd at alternating +-3.4e38": ("fedsvd", None, lambda s, h: alternating(h, 3.4e38)),
}


@pytest.mark.parametrize("case", list(ISSUE_CASES))
def test_an_overflowing_reply_is_refused_and_the_round_aggregates_the_rest(case: str) -> None:
    name, defence, attack = ISSUE_CASES[case]
    strategy = new_strategy(name, defence)
    arrays, metrics = run_round(strategy, attack)
    assert "exceeds" in str(refusal_of(strategy, HOSTILE))
    assert arrays is not None and not strategy.last_round.skipped
    assert strategy.last_round.accepted and HOSTILE not in strategy.last_round.accepted
    assert metrics["num-replies"] == len(strategy.last_round.accepted)
    assert_installable(arrays)


@pytest.mark.parametrize("magnitude", [FLOAT32_MAX, MAX_VALUE], ids=["float32-max", "at-the-bound"])
@pytest.mark.parametrize("defence", [None, *DEFENCES])
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_strategy_and_defence_survive_one_reply_at_the_edge(name: str, defence: str | None, magnitude: float) -> None:
    """Near float32's max the reply is refused; at the bound it is aggregated (or dropped) into a
    finite state, or the state is not installed with its reason: never NaN, never an exception."""
    strategy = new_strategy(name, defence)
    arrays, _ = run_round(strategy, lambda s, honest: alternating(honest, magnitude))
    refused = refusal_of(strategy, HOSTILE)
    assert (refused is not None) == (magnitude > MAX_VALUE)
    if arrays is None:
        assert strategy.last_round.skipped and strategy.last_round.extra["not_installed"]
    else:
        assert_installable(arrays)


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_a_train_loss_beyond_float32_is_refused_never_infinity(name: str) -> None:
    strategy = new_strategy(name)
    arrays, metrics = run_round(strategy, hostile_loss=1e308)
    assert "train-loss" in str(refusal_of(strategy, HOSTILE)) and HOSTILE not in strategy.last_round.client_metrics
    assert arrays is not None and metrics["train-loss"] == pytest.approx(1.0)


class BrokenRule(FedIT):
    """A rule that still breaks on accepted replies: NaN out, or its linear algebra fails."""

    name = "broken"
    failure = "nan"

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor) -> LoraState:
        if self.failure == "linalg":
            torch.linalg.cholesky(-torch.eye(2))  # not positive definite: LinAlgError
        state = super().aggregate_factors(global_state, updates, weights)
        next(iter(state.factors.values()))["B"][0, 0] = math.nan
        return state


@pytest.mark.parametrize(("failure", "reason"), [("nan", "NaN or Inf"), ("linalg", "linear algebra failed")])
def test_a_broken_new_state_is_not_installed_and_the_reason_recorded(failure: str, reason: str) -> None:
    strategy = BrokenRule(Roster(NODES, dict.fromkeys(NODES.values(), EXAMPLES)), clients_per_round=N)
    strategy.failure = failure
    arrays, metrics = run_round(strategy)
    assert arrays is None and metrics is None and strategy.last_round.skipped
    assert reason in str(strategy.last_round.extra["not_installed"])
    assert torch.equal(strategy.global_state.flatten(), global_state().flatten())  # the previous state stays


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_one_scaling_attacker_at_1e12_behind_zprobe_is_refused_and_the_run_finishes(tmp_path: Path) -> None:
    """Issue 24's worst case through the real simulation: it used to end the run with the ring's ValueError."""
    config = tiny_config(
        f"federation.num_clients={N}",
        f"federation.clients_per_round={N}",
        "federation.min_replies=5",
        "federation.rounds=1",
        "federation.local_steps=1",
        "attack.name='scaling'",
        f"attack.fraction={1.5 / N}",  # one attacker
        "attack.options.factor=1e12",
        "strategy.robust='zprobe'",
        "strategy.phi_max=0.2",
    )
    simulate(config, tmp_path / "run")
    history, summary = read_history(tmp_path / "run"), read_summary(tmp_path / "run")
    (attacker,) = summary["malicious"]
    assert [record["round"] for record in history] == [0, 1]
    for record in history[1:]:
        reasons = [r["reason"] for r in record["rejected"] if r.get("client") == attacker]
        assert len(reasons) == 1 and "exceeds" in reasons[0]
        assert not record["skipped"] and attacker not in record["clients"] and math.isfinite(record["train_loss"])
    text = (tmp_path / "run" / HISTORY).read_text()
    assert "Infinity" not in text and "NaN" not in text


def test_an_integer_metric_beyond_float_is_refused_not_raised() -> None:
    # Before: math.isfinite(10**400) raised OverflowError out of the reply checks.
    assert "401 digits" in finite_metrics(MetricRecord({"train-loss": 10**400}))
    assert "not a finite number" in finite_metrics(MetricRecord({"train-loss": math.inf}))
    assert finite_metrics(MetricRecord({"train-loss": 2**60})) == {"train-loss": float(2**60)}
