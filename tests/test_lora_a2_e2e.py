"""LoRA-A2 end to end through the Ray simulation engine (tiny model, 3 clients, 2 rounds), with and without DP."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora import workspace
from fedlora.lora import LoraState
from fedlora.model import load_exported_adapter
from fedlora.results import read_history, read_summary
from fedlora.simulation import simulate
from tests.conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]

UPLOAD_RANK = 2  # of the tiny adapter's 4 components a layer


@pytest.mark.parametrize("private", [False, True], ids=["plain", "dp"])
def test_lora_a2_trains_b_then_a_and_each_client_sends_its_budget_of_components(tmp_path: Path, private: bool) -> None:
    dp = ("privacy.enabled=true", "privacy.epsilon=3.0") if private else ()
    config = tiny_config("strategy.name='lora_a2'", f"strategy.upload_rank={UPLOAD_RANK}", *dp)
    simulate(config, tmp_path / "run")
    history, summary = read_history(tmp_path / "run"), read_summary(tmp_path / "run")
    assert summary["status"] == "finished" and [h["round"] for h in history] == [0, 1, 2]
    rounds = history[1:]
    assert all(h["clients"] == [0, 1, 2] and not h["rejected"] for h in rounds)
    num_labels = workspace.federated_task(config).num_labels
    initial = workspace.initial_state(config, num_labels)
    final = LoraState.from_model(load_exported_adapter(config.model, num_labels, config.seed, tmp_path / "run" / "adapter"))
    # Round 1 trained B, round 2 A: both moved.
    assert all(
        not torch.equal(final.factors[layer][part], initial.factors[layer][part]) for layer in final.factors for part in "AB"
    )
    # Each reply: UPLOAD_RANK x layers components, a column of B (round 1) or a row of A (round 2) and an int64 index each.
    (d_out,), (d_in,) = {p["B"].shape[0] for p in initial.factors.values()}, {p["A"].shape[1] for p in initial.factors.values()}
    components = 3 * UPLOAD_RANK * len(initial.factors)
    assert [h["bytes_up_factors"] for h in rounds] == [components * (4 * d_out + 8), components * (4 * d_in + 8)]
    assert all(h["bytes_up_factors"] < initial.select("B", head=False).factor_bytes() * 3 for h in rounds)  # below RoLoRA's
    if private:
        assert all(0 < h["epsilon_max"] <= 3.0 for h in rounds)
