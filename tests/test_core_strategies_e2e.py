"""Fed-SB and RAVAN end to end through the Ray simulation engine under DP-SGD (tiny model: 3 clients, 2 rounds)."""

from __future__ import annotations

import pytest
import torch

from fedlora import workspace
from fedlora.checkpoint import load_checkpoint
from fedlora.lora import LoraState
from fedlora.model import load_exported_adapter
from fedlora.results import read_history, read_summary
from fedlora.simulation import simulate
from tests.conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]

DP = ("privacy.enabled=true", "privacy.epsilon=3.0")
# RAVAN's clients clip with ghost clipping: the core's per-example norms come from functorch there too.
RUNS: dict[str, tuple[str, ...]] = {"fed_sb": DP, "ravan": (*DP, "privacy.grad_sample_mode='ghost'", "strategy.ravan_heads=2")}


@pytest.mark.parametrize("strategy", list(RUNS))
def test_a_dp_federation_trains_the_core_sends_it_alone_and_exports_plain_lora(tmp_path, strategy: str) -> None:
    config = tiny_config(f"strategy.name={strategy!r}", *RUNS[strategy])
    simulate(config, tmp_path)
    history, summary = read_history(tmp_path), read_summary(tmp_path)
    assert summary["status"] == "finished" and [h["round"] for h in history] == [0, 1, 2]
    assert all(len(h["clients"]) == 3 for h in history[1:]) and not any(h["rejected"] for h in history)
    assert all(0 < h["epsilon_max"] <= 3.0 for h in history[1:])

    final = LoraState.from_tensors(load_checkpoint(tmp_path).tensors)
    trained = final.select("RS", head=False)
    assert all(parts["R"].any() for parts in trained.factors.values())  # every core trained away from its zero start
    assert all(h["bytes_up_factors"] == 3 * trained.factor_bytes() for h in history[1:])  # the core alone, a reply

    num_labels = workspace.federated_task(config).num_labels
    exported = LoraState.from_model(load_exported_adapter(config.model, num_labels, config.seed, tmp_path / "adapter"))
    for layer, parts in final.folded().factors.items():
        assert torch.allclose(exported.factors[layer]["B"], parts["B"]) and torch.equal(exported.factors[layer]["A"], parts["A"])
