"""The CLI: config errors print one line and exit 2; the strategy listing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fedlora import cli

QUICKSTART = Path(__file__).resolve().parent.parent / "simulations" / "quickstart.toml"


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["fedlora", *args])
    try:
        cli.main()
        code = 0
    except SystemExit as done:
        code = int(done.code or 0)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("model.lora_rnak=4", ["model.lora_rnak", "unknown key", "lora_rank"]),
        ("federation.lr=fast", ["federation.lr", "number"]),
        ("federation.clients_per_round=12", ["clients_per_round", "num_clients"]),
        ("privacy.accountant=moments", ["privacy.accountant", "'prv' or 'rdp'"]),
        ("strategy.name=fedmagic", ["strategy.name", "fedit"]),
        ("model.lora_rank=0", ["model.lora_rank", "greater than or equal to 1"]),
    ],
)
def test_a_bad_config_prints_one_line_naming_the_key_and_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], override: str, names: list[str]
) -> None:
    code, output = run_cli(monkeypatch, capsys, "simulate", str(QUICKSTART), "--set", override)
    assert code == 2
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    for name in names:
        assert name in lines[0]
    assert "Traceback" not in output


def test_a_missing_config_file_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    code, output = run_cli(monkeypatch, capsys, "simulate", "no/such.toml")
    assert code == 2 and "not found" in output and len(output.strip().splitlines()) == 1


def test_strategies_lists_every_registered_strategy(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from strategies import STRATEGIES

    code, output = run_cli(monkeypatch, capsys, "strategies")
    assert code == 0
    for name in STRATEGIES:
        assert name in output
