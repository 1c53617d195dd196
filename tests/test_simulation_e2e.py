"""End to end through Flower's real simulation engine (run_simulation, Ray backend), tiny model."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from fedlora import workspace
from fedlora.lora import LoraState
from fedlora.model import build_lora_model, load_exported_adapter
from fedlora.results import read_history, read_summary
from fedlora.simulation import simulate
from tests.conftest import tiny_config, without_timings

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("one_ray")]


@pytest.fixture(scope="module")
def fedit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("e2e") / "fedit"
    simulate(tiny_config(), run_dir)
    return run_dir


def test_a_federation_of_three_clients_runs_two_rounds_and_records_them(fedit_run: Path) -> None:
    history = read_history(fedit_run)
    assert [line["round"] for line in history] == [0, 1, 2]
    for line in history[1:]:
        assert len(line["clients"]) == 3 and not line["rejected"]
        assert line["bytes_up_factors"] > 0 and line["bytes_down"] > 0
        # The clients' own training time, a part of the round's wait for them (both wall clock).
        assert 0 < line["train_seconds"] and line["client_seconds"] > 0
    summary = read_summary(fedit_run)
    assert summary["status"] == "finished" and summary["rounds"] == 2
    assert json.loads((fedit_run / "config.json").read_text())["model"]["name"] == "tiny"


def test_the_global_adapter_changed_and_was_exported(fedit_run: Path) -> None:
    config = tiny_config()
    task = workspace.federated_task(config)
    initial = LoraState.from_model(build_lora_model(config.model, task.num_labels, config.seed))
    exported = load_exported_adapter(config.model, task.num_labels, config.seed, fedit_run / "adapter")
    final = LoraState.from_model(exported)
    assert set(final.factors) == set(initial.factors)
    changed = [not torch.equal(final.factors[layer]["B"], initial.factors[layer]["B"]) for layer in initial.factors]
    assert all(changed)


def test_peft_auto_class_alone_loads_the_run_adapter_with_the_final_logits(fedit_run: Path) -> None:
    from peft import AutoPeftModelForSequenceClassification

    from fedlora.model import evaluate

    config = tiny_config()
    task = workspace.federated_task(config)
    test = workspace.test_examples(config)
    with contextlib.chdir(fedit_run / "adapter"):  # peft reads the base reference, "./base", against the working directory
        auto = AutoPeftModelForSequenceClassification.from_pretrained(".").eval()
    final_model = load_exported_adapter(config.model, task.num_labels, config.seed, fedit_run / "adapter").eval()
    batch = test.batch(torch.arange(16))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch).logits, final_model(**batch).logits, rtol=0, atol=1e-6)
    assert auto.config.id2label == dict(enumerate(task.class_names))
    assert evaluate(auto, test)[0] == read_summary(fedit_run)["final_accuracy"]


def test_the_exported_adapter_gives_the_logits_of_the_final_model(fedit_run: Path) -> None:
    config = tiny_config()
    task = workspace.federated_task(config)
    test = workspace.test_examples(config)
    exported = load_exported_adapter(config.model, task.num_labels, config.seed, fedit_run / "adapter").eval()
    # The model at the end of the run: a fresh build with the final global state loaded.
    final_model = build_lora_model(config.model, task.num_labels, config.seed).eval()
    LoraState.from_model(exported).load_into(final_model)
    batch = test.batch(torch.arange(16))
    batch.pop("labels")
    with torch.no_grad():
        torch.testing.assert_close(exported(**batch).logits, final_model(**batch).logits, rtol=0, atol=1e-6)
    # ...and the recorded final accuracy is that model's accuracy.
    from fedlora.model import evaluate

    accuracy, _ = evaluate(exported, test)
    assert accuracy == pytest.approx(read_history(fedit_run)[-1]["accuracy"])


def test_same_config_and_seed_give_the_same_history(fedit_run: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    simulate(tiny_config(), again)
    assert without_timings(read_history(again)) == without_timings(read_history(fedit_run))
