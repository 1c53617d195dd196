"""Every strategy, and DP training, end to end through the Ray simulation engine (tiny model)."""

from __future__ import annotations

import pytest
import torch

from fedlora import workspace
from fedlora.lora import LoraState
from fedlora.model import load_exported_adapter
from fedlora.results import read_history, read_summary
from fedlora.simulation import simulate
from tests.conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]


DP = ("privacy.enabled=true", "privacy.epsilon=3.0")
# One federation per strategy; FedSVD's runs under DP, so that it serves both tests below.
RUNS: dict[str, tuple[str, ...]] = {"ffa_lora": (), "fedsvd": DP, "lora_fair": (), "fedit": DP}


def run_config(strategy: str):
    return tiny_config(f"strategy.name={strategy!r}", *RUNS[strategy])


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """(history, summary, final global state) of a strategy's federation, simulated on first use."""
    root, done = tmp_path_factory.mktemp("strategies-e2e"), {}

    def run(strategy: str) -> tuple[list[dict], dict, LoraState]:
        if strategy not in done:
            config = run_config(strategy)
            simulate(config, root / strategy)
            num_labels = workspace.federated_task(config).num_labels
            adapter = load_exported_adapter(config.model, num_labels, config.seed, root / strategy / "adapter")
            done[strategy] = (read_history(root / strategy), read_summary(root / strategy), LoraState.from_model(adapter))
        return done[strategy]

    return run


def b_bytes(state: LoraState) -> int:
    return state.select("B", head=False).factor_bytes()


@pytest.mark.parametrize("strategy", ["ffa_lora", "fedsvd", "lora_fair"])
def test_each_strategy_runs_through_ray_and_changes_the_global_model(runs, strategy: str) -> None:
    history, summary, final = runs(strategy)
    config = run_config(strategy)
    initial = workspace.initial_state(config, workspace.federated_task(config).num_labels)
    assert summary["status"] == "finished" and [h["round"] for h in history] == [0, 1, 2]
    assert all(not torch.equal(final.factors[layer]["B"], initial.factors[layer]["B"]) for layer in final.factors)
    replies = [len(h["clients"]) for h in history[1:]]
    assert all(n == 3 for n in replies) and not any(h["rejected"] for h in history)
    if strategy in ("ffa_lora", "fedsvd"):
        # The uplink carries B only: exactly the bytes of the B factors per reply...
        assert all(h["bytes_up_factors"] == n * b_bytes(final) for h, n in zip(history[1:], replies))
    else:
        # ...which is half of what an A+B strategy sends where layers are square (tiny: 32 x 32).
        assert all(h["bytes_up_factors"] == n * 2 * b_bytes(final) for h, n in zip(history[1:], replies))


@pytest.mark.parametrize("strategy", ["fedsvd", "fedit"])
def test_dp_federation_runs_through_ray_and_records_epsilon(runs, strategy: str) -> None:
    history, summary, _ = runs(strategy)
    epsilons = [h["epsilon_max"] for h in history[1:]]
    assert all(e is not None and 0 < e <= 3.0 for e in epsilons)
    assert epsilons[0] < epsilons[1]  # every client trains both rounds: epsilon composes
    clients = summary["privacy"]
    assert len(clients) == 3
    for figures in clients.values():
        assert figures["noise-multiplier"] > 0 and 0 < figures["sample-rate"] <= 1
        assert figures["dp-steps"] == 2 * tiny_config().federation.local_steps
