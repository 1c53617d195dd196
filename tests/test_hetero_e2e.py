"""The heterogeneous-rank strategies end to end through the Ray simulation engine (tiny model, 3 clients, 2 rounds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.results import read_history, read_summary
from fedlora.simulation import simulate
from tests.conftest import tiny_config

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]

MIXED = ("model.lora_rank=16", "model.client_ranks=[4, 8, 16]")


@pytest.mark.parametrize(
    ("strategy", "overrides"),
    [("flexlora", MIXED), ("flora", MIXED), ("fedex_lora", MIXED), ("fedsa_lora", ()), ("rolora", ())],
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
        personal = [e["personalized"] for e in extra]
        assert all(sorted(p["accuracy"]) == ["0", "1", "2"] and 0 <= p["accuracy_mean"] <= 1 for p in personal)
