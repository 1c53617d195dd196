"""Config files: `extends` merges a base underneath, errors name the file; every shipped scenario resolves."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedlora.config import ConfigError, load_config, read_config_file
from fedlora.sweep import load_sweep
from tests.conftest import one_line_refusal

SIMULATIONS = Path(__file__).resolve().parent.parent / "simulations"
BASE = """
seed = 3
[model]
name = "tiny"
lora_rank = 4
target_modules = ["query", "value"]
[federation]
num_clients = 6
clients_per_round = 3
lr = 0.01
"""


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_file_overrides_its_base_key_by_key_and_inherits_the_rest(tmp_path: Path) -> None:
    write(tmp_path, "base.toml", BASE)
    child = write(
        tmp_path,
        "child.toml",
        'extends = "base.toml"\n[model]\nlora_rank = 2\ntarget_modules = ["query"]\n[strategy]\nname = "fedsvd"\n',
    )
    config = load_config(child)
    assert config.seed == 3 and config.model.name == "tiny"  # inherited
    assert config.model.lora_rank == 2 and config.model.target_modules == ["query"]  # a list replaces, never appends
    assert config.federation.num_clients == 6 and config.federation.lr == 0.01
    assert config.strategy.name == "fedsvd"
    assert "extends" not in read_config_file(child)


def test_extends_chains_with_paths_relative_to_each_file(tmp_path: Path) -> None:
    write(tmp_path, "bases/base.toml", BASE)
    write(tmp_path, "bases/dp.toml", 'extends = "base.toml"\n[privacy]\nenabled = true\nepsilon = 2.0\n')
    leaf = write(tmp_path, "runs/leaf.toml", 'extends = "../bases/dp.toml"\n[federation]\nclients_per_round = 6\n')
    config = load_config(leaf, ["privacy.epsilon=4.0"])
    assert config.model.lora_rank == 4 and config.privacy.enabled and config.federation.clients_per_round == 6
    assert config.privacy.epsilon == 4.0  # --set still has the last word


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a.toml": 'extends = "b.toml"', "b.toml": 'extends = "a.toml"'}, "circle (a.toml -> b.toml -> a.toml)"),
        ({"a.toml": 'extends = "a.toml"'}, "circle (a.toml -> a.toml)"),
        ({"a.toml": 'extends = "missing.toml"'}, "config file not found"),
        ({"a.toml": "extends = 3"}, "extends must be the path of another config file, got 3"),
        ({"a.toml": 'extends = "b.toml"', "b.toml": "[model\n"}, "b.toml: not valid TOML"),
    ],
)
def test_a_bad_extends_is_refused_in_one_line_naming_the_file(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        write(tmp_path, name, text)
    with pytest.raises(ConfigError) as refused:
        load_config(tmp_path / "a.toml")
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_the_cli_prints_a_bad_extends_in_one_line_and_exits_2(tmp_path: Path) -> None:
    config = write(tmp_path, "a.toml", 'extends = "a.toml"')
    assert "circle" in one_line_refusal("simulate", str(config))


def test_a_sweep_inherits_its_base_and_sweeps_over_it(tmp_path: Path) -> None:
    write(tmp_path, "base.toml", BASE)
    sweep = write(tmp_path, "sweep.toml", 'extends = "base.toml"\n[sweep]\nseed = [0, 1]\n"model.lora_rank" = [2, 8]\n')
    variants = load_sweep(sweep).variants
    assert len(variants) == 4
    assert {(v.config.seed, v.config.model.lora_rank) for v in variants} == {(0, 2), (0, 8), (1, 2), (1, 8)}
    assert all(v.config.model.name == "tiny" and v.config.federation.num_clients == 6 for v in variants)


@pytest.mark.parametrize("path", sorted(SIMULATIONS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_scenario_resolves(path: Path) -> None:
    if "sweep" in read_config_file(path):
        assert load_sweep(path).variants
    else:
        load_config(path)


def test_a_sweep_value_may_set_several_keys_of_a_section(tmp_path: Path) -> None:
    sweep = write(
        tmp_path,
        "sweep.toml",
        "[privacy]\ndelta = 1e-6\n[sweep]\n"
        '"privacy" = [{enabled = false}, {enabled = true, epsilon = 1.0}, {enabled = true, epsilon = 8.0}]\n',
    )
    variants = load_sweep(sweep).variants
    assert [(v.config.privacy.enabled, v.config.privacy.epsilon) for v in variants] == [(False, 3.0), (True, 1.0), (True, 8.0)]
    assert all(v.config.privacy.delta == 1e-6 for v in variants)  # the rest of the section stays
    assert variants[1].name == "privacy-enabled-true+epsilon-1.0"
