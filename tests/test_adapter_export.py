"""The exported adapter loads the way peft and Hugging Face users load adapters, with nothing else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from peft import AutoPeftModelForSequenceClassification, PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from fedlora.config import ExperimentConfig
from fedlora.export import MINILM_HUB_ID, RunFigures, export_adapter, hub_id, model_card
from fedlora.lora import LoraState
from fedlora.model import HEAD_MODULE, build_lora_model, load_tokenizer, minilm_path
from tests.conftest import tiny_config

CLASSES = ["sports", "science", "business"]
FIGURES = RunFigures(run_name="fedit-test", rounds=2, clients=3, final_accuracy=0.6125, test_examples=60, epsilon=None)
TEXTS = ["the match ended in a draw", "a new telescope looked at the galaxy", "shares fell"]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every load here must work without the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def trained_model(config: ExperimentConfig, seed: int = 3):
    """The config's LoRA model with factors (and head, where it trains) moved away from their initial values."""
    model = build_lora_model(config.model, len(CLASSES), config.seed).eval()
    state = LoraState.from_model(model)
    generator = torch.Generator().manual_seed(seed)
    for parts in state.factors.values():
        parts["B"] = torch.randn(parts["B"].shape, generator=generator)
    for name in state.head:
        state.head[name] = torch.randn(state.head[name].shape, generator=generator)
    state.load_into(model)
    return model


def logits(model: torch.nn.Module, folder: Path | str) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("train_head", [True, False])
def test_the_auto_class_alone_loads_the_adapter_and_gives_its_logits(
    tmp_path: Path, train_head: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config(f"model.train_head={str(train_head).lower()}")
    model = trained_model(config)
    folder = export_adapter(model, tmp_path / "run" / "adapter", config, CLASSES, FIGURES)
    monkeypatch.chdir(folder)  # peft reads the relative base reference, "./base", against the working directory
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(".").eval()
    torch.testing.assert_close(logits(loaded, folder), logits(model, folder), rtol=0, atol=1e-6)
    assert loaded.config.id2label == dict(enumerate(CLASSES))
    assert loaded.config.label2id == {name: index for index, name in enumerate(CLASSES)}
    saved = json.loads((folder / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == [HEAD_MODULE]
    assert not (tmp_path / "run" / "adapter.partial").exists()


def test_a_frozen_head_stays_frozen_in_training_and_is_exported_as_initialized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config("model.train_head=false")
    model = trained_model(config)
    head = [(name, param) for name, param in model.named_parameters() if HEAD_MODULE in name]
    assert head and not any(param.requires_grad for _, param in head)
    assert not any("modules_to_save" in name for name, _ in head)  # training's adapter config has no task type
    fresh = build_lora_model(config.model, len(CLASSES), config.seed)
    folder = export_adapter(model, tmp_path / "adapter", config, CLASSES, FIGURES)
    monkeypatch.chdir(folder)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(".")
    exported_head = {k: v for k, v in loaded.state_dict().items() if f"{HEAD_MODULE}.modules_to_save.default." in k}
    initial_head = {
        k.rsplit(".", 1)[-1]: v for k, v in fresh.state_dict().items() if k.startswith(f"base_model.model.{HEAD_MODULE}.")
    }
    assert exported_head and all(torch.equal(t, initial_head[k.rsplit(".", 1)[-1]]) for k, t in exported_head.items())


def test_the_tokenizer_reloads_from_the_adapter_folder(tmp_path: Path) -> None:
    config = tiny_config()
    folder = export_adapter(trained_model(config), tmp_path / "adapter", config, CLASSES, FIGURES)
    reloaded = AutoTokenizer.from_pretrained(str(folder))
    original = load_tokenizer(config.model)
    assert reloaded(TEXTS)["input_ids"] == original(TEXTS)["input_ids"]


def test_a_copied_folder_loads_base_first_then_adapter(tmp_path: Path) -> None:
    config = tiny_config()
    model = trained_model(config)
    export_adapter(model, tmp_path / "written" / "adapter", config, CLASSES, FIGURES)
    moved = shutil.copytree(tmp_path / "written" / "adapter", tmp_path / "elsewhere" / "adapter")
    shutil.rmtree(tmp_path / "written")
    base = AutoModelForSequenceClassification.from_pretrained(str(moved / "base"))
    loaded = PeftModel.from_pretrained(base, str(moved)).eval()
    torch.testing.assert_close(logits(loaded, moved), logits(model, moved), rtol=0, atol=1e-6)


def test_the_packaged_minilm_is_linked_not_copied_and_named_by_its_hub_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tiny_config("model.name='minilm'")
    model = trained_model(config)
    folder = export_adapter(model, tmp_path / "adapter", config, CLASSES, FIGURES)
    packaged = minilm_path() / "model.safetensors"
    linked = folder / "base" / "model-00001-of-00002.safetensors"  # the head is the second shard
    if packaged.stat().st_dev == tmp_path.stat().st_dev:  # a hard link needs one file system
        assert linked.stat().st_ino == packaged.resolve().stat().st_ino
    monkeypatch.chdir(folder)
    loaded = AutoPeftModelForSequenceClassification.from_pretrained(".").eval()
    torch.testing.assert_close(logits(loaded, folder), logits(model, folder), rtol=0, atol=1e-5)
    card = (folder / "README.md").read_text()
    assert f"base_model: {MINILM_HUB_ID}" in card and "library_name: peft" in card


def test_the_model_card_summarizes_the_run() -> None:
    config = tiny_config("privacy.enabled=true", "privacy.epsilon=3.0", "strategy.name='ffa_lora'", "strategy.robust='krum'")
    figures = RunFigures(run_name="dp-run", rounds=2, clients=3, final_accuracy=0.4375, test_examples=60, epsilon=2.71)
    card = model_card(config, CLASSES, figures)
    for expected in [
        "# dp-run",
        "| strategy | ffa_lora behind krum |",
        "| rounds | 2 of 2 |",
        "| clients | 3, 3 a round, 3 local steps each |",
        "| data | builtin, iid partition |",
        "epsilon 2.71 spent (target 3, delta 1e-05)",
        "| final accuracy | 0.4375 on 60 held-out examples |",
        "0: sports, 1: science, 2: business",
        "AutoPeftModelForSequenceClassification.from_pretrained",
        "- differential-privacy",
        "pipeline_tag: text-classification",
    ]:
        assert expected in card, expected
    assert "base_model:" not in card  # the tiny model has random weights: no hub model to name


def test_hub_ids_of_the_bases() -> None:
    assert hub_id(tiny_config("model.name='minilm'").model) == MINILM_HUB_ID
    assert hub_id(tiny_config("model.name='minilm'", "model.pretrained=false").model) is None
    assert hub_id(tiny_config("model.name='prajjwal1/bert-tiny'").model) == "prajjwal1/bert-tiny"
    assert hub_id(tiny_config().model) is None
