"""The heterogeneous-rank strategies end to end through the Ray simulation engine (tiny model, 3 clients, 2 rounds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora import workspace
from fedlora.results import read_history, read_summary
from fedlora.simulation import simulate
from tests.conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]

MIXED = ("model.lora_rank=16", "model.client_ranks=[4, 8, 16]")


@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [("flexlora", MIXED), ("flora", MIXED), ("fedex_lora", MIXED), ("fedsa_lora", ("evaluation.clients=1",)), ("rolora", ())],
)
def test_strategy_runs_through_ray(tmp_path: Path, strategy: str, overrides: tuple[str, ...]) -> None:
    config = tiny_config(f"strategy.name={strategy!r}", *overrides)
    simulate(config, tmp_path / "run")
    history, summary = read_history(tmp_path / "run"), read_summary(tmp_path / "run")
    assert summary["status"] == "finished" and [h["round"] for h in history] == [0, 1, 2]
    rounds = history[1:]
    assert all(h["clients"] == [0, 1, 2] and not h["rejected"] for h in rounds)  # every reply matched its own rank
    extra = [h["extra"] for h in rounds]
    if strategy == "flexlora":
        assert all(set(e["truncation"]) == {"4", "8", "16"} for e in extra)
    if strategy in ("flora", "fedex_lora"):
        # The merged delta travels down: more bytes in round 2 than the adapters alone of round 1.
        assert all(e["merged_rank_max"] > 0 for e in extra) and rounds[1]["bytes_down"] > rounds[0]["bytes_down"]
    if strategy == "fedsa_lora":
        # B stays on the clients: each round's uplink is three clients' A, half of A and B on the square layers.
        initial = workspace.initial_state(config, workspace.federated_task(config).num_labels)
        a_bytes = initial.select("A", head=False).factor_bytes()
        assert a_bytes * 2 == initial.factor_bytes() and all(h["bytes_up_factors"] == 3 * a_bytes for h in rounds)
        # Each client evaluates its own model (its B, the shared A) on its held-out share.
        assert all(sorted(e["client_eval"]) == ["0", "1", "2"] for e in extra)
