"""A sweep of thousands of variants is expanded and validated in seconds, and a bad value among
them is refused in one line before anything runs."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from fedlora.sweep import load_sweep, run_status
from tests.conftest import one_line_refusal
from tests.test_run_dirs import tiny_file

SEEDS = 10_000
# Measured 1.4 s on two shared cores; it was about 2 s a variant (each variant's data read and split).
BOUND_SECONDS = 20


def seed_sweep(tmp_path: Path, seeds: list[int]) -> Path:
    """The tiny experiment swept over `seeds`."""
    path = tmp_path / "seeds.toml"
    path.write_text(tiny_file(tmp_path).read_text() + f"\n[sweep]\nseed = [{', '.join(map(str, seeds))}]\n")
    return path


def test_ten_thousand_seeds_are_expanded_and_validated_in_seconds(tmp_path: Path) -> None:
    started = time.perf_counter()
    variants = load_sweep(seed_sweep(tmp_path, list(range(SEEDS)))).variants
    elapsed = time.perf_counter() - started
    assert [variant.config.seed for variant in variants] == list(range(SEEDS))
    assert elapsed < BOUND_SECONDS, f"{elapsed:.1f} s"


def test_one_bad_seed_among_ten_thousand_is_refused_in_one_line_in_seconds(tmp_path: Path) -> None:
    sweep = seed_sweep(tmp_path, [0])
    seeds = f"sweep.seed=[{', '.join(map(str, range(SEEDS)))}, -1]"
    started = time.perf_counter()
    line = one_line_refusal("compare", str(sweep), "--set", seeds, "--out", str(tmp_path / "out"))
    elapsed = time.perf_counter() - started
    assert "seed--1" in line and "seed: Input should be greater than or equal to 0" in line
    assert elapsed < BOUND_SECONDS, f"{elapsed:.1f} s"
    assert not (tmp_path / "out").exists()


def test_what_only_a_start_shows_is_checked_once_per_setting_of_the_other_axes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedlora import simulation

    checked: list[tuple[str, int]] = []
    monkeypatch.setattr(simulation, "check_runnable", lambda config: checked.append((config.strategy.name, config.seed)))
    sweep = seed_sweep(tmp_path, [0, 1, 2])
    sweep.write_text(sweep.read_text() + '"strategy.name" = ["fedit", "ffa_lora"]\n')
    assert len(load_sweep(sweep).variants) == 6
    assert checked == [("fedit", 0), ("ffa_lora", 0)]


def test_a_summary_that_is_not_an_object_is_a_pending_run_not_a_crash(tmp_path: Path) -> None:
    # Before: run_status called .get on the list and raised AttributeError out of the sweep.
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert run_status(tmp_path) == "pending"
