"""The CLI: config errors print one line and exit 2; the strategy listing."""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
import pytest

from fedlora import cli
from tests.conftest import run_cli

QUICKSTART = Path(__file__).resolve().parent.parent / "simulations" / "quickstart.toml"


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("model.lora_rnak=4", ["model.lora_rnak", "unknown key", "lora_rank"]),
        ("federation.lr=fast", ["federation.lr", "number"]),
        ("federation.clients_per_round=12", ["clients_per_round", "num_clients"]),
        ("privacy.accountant=moments", ["privacy.accountant", "'prv' or 'rdp'"]),
        ("strategy.name=fedmagic", ["strategy.name", "fedit"]),
        ("model.lora_rank=0", ["model.lora_rank", "greater than or equal to 1"]),
        ("model.lora_rank=1000000000000", ["model.lora_rank", "less than or equal to 4096"]),
        ("federation.rounds=1000000000000000000", ["federation.rounds", "less than or equal to 100000"]),
        ("privacy.planned_rounds=1000000000000000000", ["privacy.planned_rounds", "less than or equal to 100000"]),
        ("data.num_train=1000000000000000000", ["data.num_train", "less than or equal to 1000000"]),
    ],
)
def test_a_bad_config_prints_one_line_naming_the_key_and_exits_2(override: str, names: list[str]) -> None:
    code, output = run_cli("simulate", str(QUICKSTART), "--set", override)
    assert code == 2
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    for name in names:
        assert name in lines[0]
    assert "Traceback" not in output


def test_a_missing_config_file_is_a_one_line_error() -> None:
    code, output = run_cli("simulate", "no/such.toml")
    assert code == 2 and "not found" in output and len(output.strip().splitlines()) == 1


def test_strategies_lists_every_registered_strategy() -> None:
    from strategies import STRATEGIES

    code, output = run_cli("strategies")
    assert code == 0
    for name in STRATEGIES:
        assert name in output


def test_the_round_line_shows_privacy_spent_defence_drops_refusals_and_the_time_left() -> None:
    from fedlora.results import RoundRecord

    timer = cli.RoundTimer(rounds=5)
    first = RoundRecord(round=0, accuracy=0.125, loss=2.0)
    assert cli._round_line(first, timer.eta(first)) == "round   0  accuracy 0.1250  loss 2.0000"
    record = RoundRecord(
        round=1,
        accuracy=0.5,
        loss=1.25,
        bytes_up=1_229_000,
        seconds=30.0,
        epsilon_max=1.234,
        clients=[0, 1, 3, 4, 5, 6, 7],
        rejected=[{"client": 9, "reason": "no reply before the round timeout"}],
        refused=[{"client": 8, "reason": "budget"}, {"client": 10, "reason": "budget"}],
        extra={"dropped": [2, 11], "defence": {"name": "zprobe_refined"}},
    )
    line = cli._round_line(record, timer.eta(record))
    assert line == (
        "round   1  accuracy 0.5000  loss 1.2500  up 1.23 MB  30.0 s  eps 1.23  zprobe_refined dropped 2/9"
        "  rejected 1  refused 2  ETA 2:00"
    )
    second = RoundRecord(round=2, accuracy=0.6, loss=1.0, seconds=90.0, extra={"defence": {"name": "krum"}}, clients=[0, 1])
    assert cli._round_line(second, timer.eta(second)).endswith("krum dropped 0/2  ETA 3:00")  # 3 rounds at the mean 60 s
    last = RoundRecord(round=5, accuracy=0.7, loss=0.9, seconds=60.0)
    assert "ETA" not in cli._round_line(last, timer.eta(last))


def every_command(command: click.Command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], click.Command]]:
    """The command and, for a group, every subcommand under it, with the words that call it."""
    found = [(path, command)]
    if isinstance(command, click.Group):
        for name, sub in command.commands.items():
            found.extend(every_command(sub, (*path, name)))
    return found


def test_every_argument_and_option_of_every_command_says_what_it_is() -> None:
    undocumented = [
        f"fedlora {' '.join(path)} {param.name}"
        for path, command in every_command(cli.cli_command())
        for param in command.params
        if not (param.help or "").strip() and not getattr(param, "hidden", False)  # hidden: a removed flag's message
    ]
    assert not undocumented


@pytest.mark.parametrize(
    "words", [(), ("simulate",), ("report",), ("compare",), ("config",), ("config", "show"), ("deploy", "run")]
)
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_comes_with_h_as_well_as_help_everywhere(words: tuple[str, ...], flag: str) -> None:
    code, output = run_cli(*words, flag)
    assert code == 0 and "Usage:" in output


def test_the_help_of_simulate_and_report_describes_their_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    _, simulate_help = run_cli("simulate", "-h")
    assert "Experiment TOML, e.g. simulations/quickstart.toml." in simulate_help
    _, report_help = run_cli("report", "-h")
    assert "Run directories, or sweep directories (their runs)." in report_help


def test_version_names_fedlora_and_the_packages_it_runs_on() -> None:
    from importlib import metadata

    for flag in ("--version", "-V"):
        code, output = run_cli(flag)
        assert code == 0
        assert output.splitlines()[0] == f"fedlora {metadata.version('fedlora')}"
        for package in ("torch", "flwr", "ray", "opacus", "transformers", "peft"):
            assert f"{package} {metadata.version(package)}" in output


def test_config_show_prints_the_resolved_config_as_toml_that_reads_back_the_same(tmp_path: Path) -> None:
    from fedlora.config import load_config

    dp_fedsvd = QUICKSTART.parent / "dp_fedsvd.toml"  # extends quickstart.toml
    sets = ["--set", "federation.rounds=3", "--set", "output.trackers=['tensorboard']"]
    code, output = run_cli("config", "show", str(dp_fedsvd), *sets)
    assert code == 0
    parsed = tomllib.loads(output)
    assert parsed["federation"]["rounds"] == 3 and parsed["strategy"]["name"] == "fedsvd" and parsed["privacy"]["enabled"]
    assert parsed["model"]["tiny"]["hidden_size"] == 32  # defaults are filled in, nested sections too
    printed = tmp_path / "resolved.toml"
    printed.write_text(output)
    assert load_config(printed) == load_config(dp_fedsvd, ["federation.rounds=3", "output.trackers=['tensorboard']"])


def test_config_show_refuses_a_bad_key_in_one_line() -> None:
    code, output = run_cli("config", "show", str(QUICKSTART), "--set", "federation.roundz=3")
    assert code == 2 and len(output.strip().splitlines()) == 1 and "federation.roundz: unknown key" in output


def test_config_keys_lists_every_key_with_type_default_and_description(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from fedlora.config import ExperimentConfig, ModelConfig

    monkeypatch.setattr(cli, "console", Console(width=1000))
    code, output = run_cli("config", "keys")
    assert code == 0
    lines = output.splitlines()  # "key  type; default D", then the description indented, one line at this width
    rows = {}
    for head, description in zip(lines[::2], lines[1::2]):
        key, _, rest = head.partition("  ")
        kind, _, default = rest.partition("; default ")
        assert description.startswith("    "), description
        rows[key] = [kind, default, description.strip()]
    leaves = []
    for section, field in ExperimentConfig.model_fields.items():
        inner = getattr(field.annotation, "model_fields", None)
        if inner is None:
            leaves.append((section, field.description))
            continue
        for key, sub in inner.items():
            nested = getattr(sub.annotation, "model_fields", None)
            leaves.extend(
                [(f"{section}.{key}.{k}", f.description) for k, f in nested.items()]
                if nested
                else [(f"{section}.{key}", sub.description)]
            )
    assert {key for key, _ in leaves} <= set(rows)
    for key, description in leaves:
        assert description and rows[key][2] == description, key
    assert rows["federation.rounds"][:2] == ["integer, at least 1, at most 100000", "5"]  # sizes have documented bounds
    assert rows["federation.lr"][0] == "number, above 0"
    assert rows["privacy.accountant"][:2] == ['"prv" | "rdp"', '"prv"']
    assert rows["federation.max_weight_ratio"][:2] == ["number (or unset), at least 1", "4.0"]
    assert rows["output.name"][1] == "unset"
    assert rows["model.target_modules"][:2] == ["list of string (or unset)", "unset"]  # resolved per task kind
    assert (
        rows["model.tiny.hidden_size"][2] == ModelConfig.model_fields["tiny"].annotation.model_fields["hidden_size"].description
    )


def test_config_show_of_a_sweep_prints_the_base_resolved_and_the_sweep_as_written() -> None:
    sweep_config = QUICKSTART.parent / "compare_strategies.toml"
    code, output = run_cli("config", "show", str(sweep_config))
    assert code == 0
    parsed = tomllib.loads(output)
    assert parsed["sweep"] == tomllib.loads(sweep_config.read_text())["sweep"]
    assert parsed["federation"]["num_clients"] == 10  # the base, resolved from what it extends
