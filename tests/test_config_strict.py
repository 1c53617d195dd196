"""The config is strictly typed (no silent coercion), finite, in range, and its data paths are
relative to the file that names them (issue 14's config cases and issue 15's paths, by name)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlora import simulation
from fedlora.config import ConfigError, ExperimentConfig, config_from_dict, load_config
from fedlora.results import CONFIG, resumable_config
from tests.conftest import one_line_refusal
from tests.test_cli import QUICKSTART


@pytest.fixture(autouse=True)
def no_simulation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing here may reach the simulation engine: if a refusal is missing, fail instead of starting Ray."""

    def started(**_: object) -> None:
        raise AssertionError("the simulation engine started: nothing refused the input")

    monkeypatch.setattr(simulation, "run_simulation", started)


def refused_line(*args: str) -> str:
    """`fedlora simulate ARGS`: exit 2, exactly one line, no traceback; that line."""
    return one_line_refusal("simulate", *args)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("federation.lr=inf", "federation.lr: must be a finite number, got inf"),
        ("privacy.epsilon=inf", "privacy.epsilon: must be a finite number, got inf"),
        ("privacy.max_grad_norm=nan", "privacy.max_grad_norm: must be a finite number, got nan"),
        ("model.lora_alpha=-inf", "model.lora_alpha: must be a finite number, got -inf"),
        ("attack.options.eps=nan", "attack.options.eps: must be a finite number or a string, got nan"),
        ("seed=-1", "seed: Input should be greater than or equal to 0 (got -1)"),
        ("seed=12345678901234567890", "seed: Input should be less than or equal to 4294967295 (got 12345678901234567890)"),
        ("federation.rounds=true", "federation.rounds: must be an integer, got true (a boolean)"),
        ("federation.rounds=2.0", "federation.rounds: must be an integer, got 2.0 (a number)"),
        ("privacy.enabled='yes'", "privacy.enabled: must be true or false, got 'yes' (a string)"),
        ("privacy.enabled=1", "privacy.enabled: must be true or false, got 1 (an integer)"),
        ("federation.lr='1e-3'", "federation.lr: must be a number, got '1e-3' (a string); write numbers without quotes"),
        ("model.target_modules='query'", "model.target_modules: must be a list, got 'query' (a string)"),
        (".rounds=3", "--set '.rounds=3': the key '.rounds' has an empty part"),
        ("federation.=3", "--set 'federation.=3': the key 'federation.' has an empty part"),
        ("=3", "--set '=3': expected section.key=value"),
        ("federation..rounds=3", "the key 'federation..rounds' has an empty part"),
        ("federation.ro unds=3", "the key 'federation.ro unds' has 'ro unds', which is not a key name"),
        ("federation.client_gpus=0.5", "federation.client_gpus: 0.5 GPU per client, but torch"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_naming_the_key_and_the_value(monkeypatch, override: str, expected: str) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the GPU case, on any machine
    assert expected in refused_line(str(QUICKSTART), "--set", override)


def test_an_integer_where_a_number_is_expected_is_fine() -> None:
    config = config_from_dict({"federation": {"lr": 1, "round_timeout": 60}, "privacy": {"epsilon": 2}})
    assert config.federation.lr == 1.0 and isinstance(config.federation.lr, float) and config.privacy.epsilon == 2.0


def test_the_largest_seed_is_accepted() -> None:
    assert config_from_dict({}, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
            "not UTF-8 text (byte 0x89 at offset 0); a config is a TOML file saved as UTF-8",
        ),
        ("seed = 3\n[model]\nname = 'café'\n".encode("latin-1"), "not UTF-8 text (byte 0xe9 at offset 28)"),
        (b"seed = 1\x00\n", "not valid TOML"),
        (b"seed = 1979-05-27\n", "seed: must be an integer, got datetime.date(1979, 5, 27) (a TOML date or time)"),
    ],
    ids=["binary", "latin-1", "nul", "date"],
)
def test_a_config_file_that_is_not_utf8_toml_is_refused_naming_the_file(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    line = refused_line(str(path))
    assert expected in line and (str(path) in line or "seed" in line)


def test_a_resolved_config_json_validates_again_for_resume(tmp_path: Path) -> None:
    config = load_config(
        QUICKSTART, ["federation.lr=1", "privacy.enabled=true", "seed=4294967295", "attack.name=ipm", "attack.options.eps=2"]
    )
    (tmp_path / CONFIG).write_text(config.to_json())
    assert resumable_config(tmp_path) == config
    assert ExperimentConfig.model_validate_json(config.to_json()).to_json() == config.to_json()


def test_resuming_from_a_tampered_config_json_is_one_line(tmp_path: Path) -> None:
    recorded = json.loads(load_config(QUICKSTART).to_json())
    recorded["federation"]["rounds"] = "5"
    (tmp_path / CONFIG).write_text(json.dumps(recorded))
    line = refused_line("--resume", str(tmp_path))
    assert f"{tmp_path / CONFIG}: federation.rounds: must be an integer, got '5' (a string)" in line


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_data_path_in_a_config_file_is_relative_to_that_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    config_file = write(tmp_path, "experiments/exp.toml", '[data]\nsource = "../data/train.csv"\n')
    config = load_config(config_file)
    assert config.data.source == str(tmp_path / "data" / "train.csv")
    recorded = json.loads(config.to_json())["data"]["source"]
    assert Path(recorded).is_absolute() and recorded == config.data.source


def test_each_file_of_an_extends_chain_resolves_its_own_data_path(tmp_path: Path) -> None:
    write(tmp_path, "bases/base.toml", '[data]\nsource = "corpus.jsonl"\n')
    inherits = write(tmp_path, "runs/a.toml", 'extends = "../bases/base.toml"\n[federation]\nrounds = 2\n')
    overrides = write(tmp_path, "runs/b.toml", 'extends = "../bases/base.toml"\n[data]\nsource = "mine.parquet"\n')
    assert load_config(inherits).data.source == str(tmp_path / "bases" / "corpus.jsonl")
    assert load_config(overrides).data.source == str(tmp_path / "runs" / "mine.parquet")


def test_a_data_path_given_with_set_is_relative_to_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file = write(tmp_path, "experiments/exp.toml", '[data]\nsource = "train.csv"\n')
    monkeypatch.chdir(tmp_path)
    assert load_config(config_file, ["data.source=other/x.csv"]).data.source == str(tmp_path / "other" / "x.csv")
    assert load_config(config_file, [f"data.source={tmp_path}/abs.csv"]).data.source == f"{tmp_path}/abs.csv"


@pytest.mark.parametrize("source", ["builtin", "hf:fancyzhx/ag_news", "hf:imdb"])
def test_builtin_and_hub_sources_are_not_paths(tmp_path: Path, source: str) -> None:
    config_file = write(tmp_path, "exp.toml", f'[data]\nsource = "{source}"\n')
    assert load_config(config_file).data.source == source
    assert load_config(config_file, [f"data.source='{source}'"]).data.source == source


def test_a_missing_data_file_named_in_a_config_is_reported_where_it_was_looked_for(tmp_path: Path) -> None:
    config_file = write(tmp_path, "exp/exp.toml", '[model]\nname = "tiny"\n[data]\nsource = "nowhere.csv"\n')
    line = refused_line(str(config_file))
    assert f"data.source: file not found: {tmp_path / 'exp' / 'nowhere.csv'}" in line


def test_client_cpus_beyond_this_machine_are_refused() -> None:
    line = refused_line(str(QUICKSTART), "--set", "federation.client_cpus=4096")
    assert "federation.client_cpus: 4096.0 CPUs per client, but this machine has" in line


def test_resources_are_not_judged_for_a_ray_cluster() -> None:
    config = config_from_dict({}, ["federation.client_gpus=1", "federation.ray_address='ray://cluster:10001'"])
    simulation.check_resources(config.federation)  # the cluster's GPUs are not this machine's to count


def test_a_wrong_type_in_a_file_names_the_key_too(tmp_path: Path) -> None:
    config_file = write(tmp_path, "exp.toml", "[federation]\nrounds = true\n")
    with pytest.raises(ConfigError, match=r"^federation.rounds: must be an integer, got true \(a boolean\)"):
        load_config(config_file)
