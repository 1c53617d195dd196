"""fedlora.report.reproduce: the shared settings as TOML and each run's --set overrides read back exactly."""

from __future__ import annotations

import tomllib

import pytest

from fedlora.config import _parse_value
from fedlora.report.reproduce import config_toml, override_value, set_nested, toml_value

TREE = {
    "seed": 3,
    "model": {"name": "tiny", "target_modules": ["query", "value"], "lora_alpha": 16.0, "tiny": {"hidden_size": 32}},
    "data": {"source": 'quote " and \\ backslash', "test_split": None},
    "attack": {"name": "ipm", "options": {"eps": 0.5, "odd key": "x"}},
    "privacy": {"enabled": True, "delta": 1e-05},
}


def test_config_toml_reads_back_as_the_tree_without_its_none_values() -> None:
    expected = {**TREE, "data": {"source": TREE["data"]["source"]}}
    assert tomllib.loads(config_toml(TREE)) == expected


@pytest.mark.parametrize(
    "value", ["fedit", "two words", "", " padded", "true", "3", "[1]", 7, 0.001, 1e-05, True, [1, 2], ["a", "b"]]
)
def test_an_override_value_reads_back_as_the_value(value) -> None:
    assert _parse_value(override_value(value)) == value


def test_special_floats_and_set_nested() -> None:
    assert toml_value(float("inf")) == "inf" and toml_value(float("-inf")) == "-inf" and toml_value(float("nan")) == "nan"
    tree: dict = {}
    set_nested(tree, "strategy.robust", "zprobe")
    set_nested(tree, "seed", 1)
    assert tree == {"strategy": {"robust": "zprobe"}, "seed": 1}
