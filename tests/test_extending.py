"""Outside strategies, defences and attacks (import paths, entry points) and the Python API (docs/extending.md)."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import fedlora
from fedlora.attacks import Adversary, check_attack
from fedlora.config import ConfigError
from fedlora.lora import LoraState
from strategies import defence_class, strategy_class
from strategies.base import LoraStrategy
from strategies.fedit import FedIT
from strategies.robust import Defence
from tests.conftest import TINY, one_line_refusal, tiny_config

ROOT = Path(__file__).resolve().parent.parent
MODULE = "outside_fedlora_plugins"  # not a name anything installed uses
OUTSIDE = '''
"""A strategy, a defence and an attack from outside the package, each noting its calls (and the process)."""
import os
from pathlib import Path

from strategies.fedit import FedIT
from strategies.robust import Defence, Screening

CALLS = Path(__file__).with_name("calls.txt")


def note(what):
    with CALLS.open("a") as handle:
        handle.write(f"{what} {os.getpid()}\\n")


class RecordingFedIT(FedIT):
    name = "recording_fedit"
    description = "FedIT that notes every aggregation"

    def aggregate_factors(self, global_state, updates, weights):
        note("aggregate")
        return super().aggregate_factors(global_state, updates, weights)


class KeepAll(Defence):
    name = "keep_all"
    description = "keeps every update, noting each screening"

    def screen(self, updates, weights, seed):
        note("screen")
        return Screening(kept=list(range(len(updates))))


def negate(honest, own, generator=None, *, scale=1.0):
    note("attack")
    return -scale * own


class NotAStrategy:
    pass


NOT_A_FUNCTION = 3
'''


def write_module(folder: Path, name: str, source: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`name`.py in `folder`, importable from this process (only) for the test."""
    (folder / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(folder))
    importlib.invalidate_caches()


@pytest.fixture
def outside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The outside module, written to tmp_path; forgotten after the test (another test writes its own)."""
    write_module(tmp_path, MODULE, OUTSIDE, monkeypatch)
    yield tmp_path
    sys.modules.pop(MODULE, None)


# --- registration by import path ---


def test_an_outside_class_is_found_by_import_path(outside: Path) -> None:
    found = strategy_class(f"{MODULE}:RecordingFedIT")
    assert issubclass(found, FedIT) and found.__module__ == MODULE
    assert issubclass(defence_class(f"{MODULE}:KeepAll"), Defence)
    check_attack(f"{MODULE}:negate", {"scale": 2.0})  # its keyword-only parameters are its options


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "no_such_fedlora_module:Thing",
            "strategy.name: no module named 'no_such_fedlora_module' (from 'no_such_fedlora_module:Thing'); "
            "install its package or put its folder on PYTHONPATH",
        ),
        (f"{MODULE}:Missing", f"strategy.name: module '{MODULE}' has no 'Missing' (from '{MODULE}:Missing')"),
        (f"{MODULE}:NotAStrategy", f"strategy.name: '{MODULE}:NotAStrategy' is the class NotAStrategy, not a subclass of "),
        (f"{MODULE}:note", f"strategy.name: '{MODULE}:note' is a function, not a subclass of strategies.base.LoraStrategy"),
        ("my module:Thing", "strategy.name: 'my module:Thing' is not an import path; write package.module:Name"),
    ],
    ids=["missing module", "missing attribute", "not a subclass", "not a class", "not a path"],
)
def test_an_unusable_import_path_is_one_line_naming_the_key(outside: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        strategy_class(name)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_a_module_whose_own_import_fails_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_module(tmp_path, "broken_fedlora_plugin", "import no_such_dependency_of_the_plugin\n", monkeypatch)
    with pytest.raises(ConfigError) as refused:
        defence_class("broken_fedlora_plugin:Rule")
    assert str(refused.value) == (
        "strategy.robust: importing 'broken_fedlora_plugin' failed: ModuleNotFoundError: "
        "No module named 'no_such_dependency_of_the_plugin'"
    )


def test_a_defence_or_attack_of_the_wrong_kind_is_refused(outside: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"strategy.robust: .*:RecordingFedIT' is the class RecordingFedIT, not a subclass of strategies.robust.Defence",
    ):
        defence_class(f"{MODULE}:RecordingFedIT")
    with pytest.raises(ConfigError, match=r"attack.name: .*:NOT_A_FUNCTION' is a int, not a function"):
        tiny_config(f"attack.name='{MODULE}:NOT_A_FUNCTION'")
    with pytest.raises(ConfigError, match=r"attack.*takes no option eps \(allowed: scale\)"):
        tiny_config(f"attack.name='{MODULE}:negate'", "attack.options={eps = 1.0}")


def test_the_command_refuses_an_unknown_outside_strategy_in_one_line(tmp_path: Path) -> None:
    line = one_line_refusal(
        "simulate",
        str(ROOT / "simulations" / "quickstart.toml"),
        "--set",
        "strategy.name=no_such_fedlora_module:X",
        "--out",
        str(tmp_path / "run"),
    )
    assert "strategy.name: no module named 'no_such_fedlora_module'" in line
    assert not (tmp_path / "run").exists()


def test_an_unknown_plain_name_points_to_the_ways_of_adding_one() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown strategy 'fedmagic' \(known: fedit, .*package.module:Class.*docs/extending.md\)"
    ):
        strategy_class("fedmagic")


# --- registration by entry point ---


def test_an_installed_entry_point_is_found_by_its_name(outside: Path) -> None:
    info = outside / "outside_fedlora_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-fedlora-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[fedlora.strategies]\nrecording = {MODULE}:RecordingFedIT\nfedit = {MODULE}:RecordingFedIT\n\n"
        f"[fedlora.defences]\nkeep_all = {MODULE}:KeepAll\n\n[fedlora.attacks]\nnegate = {MODULE}:negate\n"
    )
    importlib.invalidate_caches()
    assert strategy_class("recording").__name__ == "RecordingFedIT"
    assert strategy_class("fedit") is FedIT  # a built-in name wins
    assert defence_class("keep_all").__name__ == "KeepAll"
    assert Adversary("negate", {}, num_clients=3, fraction=0.34, seed=0).attack.__name__ == "negate"


# --- the documented example ---


def test_the_documented_strategy_moves_half_way_to_the_average(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    docs = (ROOT / "docs" / "extending.md").read_text()
    example = re.search(r"```python\n(# my_strategies.py\n.*?)```", docs, re.S).group(1)
    write_module(tmp_path, "my_strategies", example, monkeypatch)
    try:
        damped = strategy_class("my_strategies:DampedFedIT")
        assert issubclass(damped, LoraStrategy)
        old = LoraState(factors={"layer": {"A": torch.zeros(2, 3), "B": torch.zeros(3, 2)}})
        updates = [LoraState(factors={"layer": {"A": torch.full((2, 3), v), "B": torch.full((3, 2), v)}}) for v in (2.0, 6.0)]
        new = damped.aggregate_factors(object.__new__(damped), old, updates, torch.tensor([0.5, 0.5]))
        assert torch.equal(new.factors["layer"]["A"], torch.full((2, 3), 2.0))  # half-way from 0 to the mean, 4
    finally:
        sys.modules.pop("my_strategies", None)


# --- the Python API ---


def test_import_fedlora_is_cheap() -> None:
    code = (
        "import sys, fedlora; print(sorted(m for m in ('torch', 'flwr', 'ray', 'pydantic', 'fedlora.api') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"
    assert callable(fedlora.simulate) and callable(fedlora.load_run)
    with pytest.raises(AttributeError, match="no attribute 'simulat'"):
        fedlora.simulat  # noqa: B018


def test_load_run_of_a_folder_that_holds_no_run_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not a run directory \(no config.json\); give a folder that fedlora simulate wrote"):
        fedlora.load_run(tmp_path)


def test_overrides_are_typed_and_checked_like_the_config() -> None:
    from fedlora.api import experiment_config

    config, path = experiment_config(TINY, {"federation.rounds": 4, "model.tiny.hidden_size": 16})
    assert (config.federation.rounds, config.model.tiny.hidden_size, path) == (4, 16, None)
    assert TINY["federation"]["rounds"] == 2  # the caller's dict is left as it was
    config, path = experiment_config(ROOT / "simulations" / "quickstart.toml", {"seed": 3})
    assert config.seed == 3 and path == ROOT / "simulations" / "quickstart.toml"
    with pytest.raises(ConfigError, match="federation.rounds: must be an integer, got '3'"):
        experiment_config(tiny_config(), {"federation.rounds": "3"})
    with pytest.raises(ConfigError, match="overrides: 'seed.x': seed is not a section"):
        experiment_config(TINY, {"seed.x": 1})


# --- through the simulation engine ---


@pytest.mark.e2e
@pytest.mark.usefixtures("own_ray")
def test_an_outside_strategy_defence_and_attack_run_through_the_simulation(outside: Path) -> None:
    # Its own Ray, started by this run while the module's folder is on sys.path: Ray gives its
    # workers the driver's sys.path, and the clients import the module to validate the config. A
    # shared Ray started earlier (by another module) would not have the folder.
    run = fedlora.simulate(
        TINY,
        outside / "run",
        overrides={
            "strategy.name": f"{MODULE}:RecordingFedIT",
            "strategy.robust": f"{MODULE}:KeepAll",
            "attack.name": f"{MODULE}:negate",
            "attack.fraction": 0.34,
            "attack.options": {"scale": 2.0},
        },
    )
    calls = (outside / "calls.txt").read_text().split()
    # Two rounds, each: the attack rewrites the malicious reply, the defence screens, the strategy aggregates.
    # Every call is the ServerApp's, in this process: the clients never run the module's code.
    assert calls[::2] == ["attack", "screen", "aggregate"] * 2 and set(calls[1::2]) == {str(os.getpid())}
    assert [record["round"] for record in run.history] == [0, 1, 2]
    assert run.history[1]["extra"]["malicious"] and run.history[1]["extra"]["flagged"] == []
    assert run.summary["strategy"] == f"{MODULE}:RecordingFedIT"
    assert run.final_accuracy == run.history[-1]["accuracy"] and run.run_dir == (outside / "run").resolve()
    again = fedlora.load_run(outside / "run")
    assert again.history == run.history and again.config.strategy.robust == f"{MODULE}:KeepAll"
    assert isinstance(again.adapter_model().get_base_model(), torch.nn.Module)
