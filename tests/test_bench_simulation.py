"""The simulation benchmark's own input checks (the benchmark itself: tests/benchmarks/bench_simulation.py)."""

from __future__ import annotations

import pytest

from tests.benchmarks import bench_simulation


def test_one_round_is_refused_in_one_line_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """Round 1 builds the actors' models: with no later round the breakdown had nothing to divide by
    (it ran both engines, then crashed on max() of an empty sequence)."""
    with pytest.raises(SystemExit) as caught:
        bench_simulation.main(rounds=1)
    assert caught.value.code == 2
    line = capsys.readouterr().err
    assert line.startswith("--rounds 1: at least 2") and line.count("\n") == 1
