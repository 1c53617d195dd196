"""The final adapter as Hugging Face and peft users expect to find it, loadable wherever the folder is copied.

    adapter/adapter_config.json        peft's config: task type, rank, targets, the head as modules_to_save;
                                       base_model_name_or_path: "./base" (the folder beside it), or a causal LM's
                                       hub id (or the user's own local folder) where the base is that model unchanged
    adapter/adapter_model.safetensors  the LoRA factors and the classification head
    adapter/tokenizer*.json            the tokenizer (a causal LM's with the chat template training used)
    adapter/README.md                  the model card: the run's training summary, labels, prompt, how to load it
    adapter/config.json                the base model's config with the run's labels (num_labels, id2label, label2id)
    adapter/model.safetensors.index.json  the base's weights, as files under base/ (nothing copied)
    adapter/base/                      the base model, whole: its config, tokenizer and weights with the head, so
                                       that transformers reports no weight as newly initialized. The weights are a
                                       hard link to the packaged or cached pretrained file where one exists (no
                                       disk), plus a small shard with the head; else written from the seed;
                                       FLoRA's and FedEx-LoRA's: written with the run's merged delta W0 + U V

Loading, from wherever the folder is (transformers loads a folder holding both a model and an
adapter as the model with the adapter on it, and its tokenizer):

    AutoModelForSequenceClassification.from_pretrained("adapter")   # or AutoModelForCausalLM
    pipeline("text-classification", model="adapter")

and with peft: `PeftModel.from_pretrained(AutoModelFor...from_pretrained("adapter/base"), "adapter")`.
peft's Auto classes build the base with `from_pretrained(base_model_name_or_path)` verbatim
(peft 0.21 auto.py), which resolves a local path against the working directory, not the adapter
folder: no value both follows a copied folder and never reads another folder's base. "./base"
is relative, so `AutoPeftModelForSequenceClassification.from_pretrained(".")` works from inside
the folder, and from anywhere else it fails loudly instead of silently reading the base of the
run the folder was copied from (an absolute path did). A causal LM on an unchanged hub model
names its hub id there (peft's convention), and the Auto class loads it from anywhere.
Why the base is carried at all: the hub's all-MiniLM-L6-v2 says 2 labels, a run with 8 classes
would not load onto it; the tiny models and bases holding a merged delta are on no hub.

`fedlora export RUN_DIR --to DIR` (fedlora/export_run.py) writes the same folder elsewhere, the
base's files linked or copied in, or with `--merged` a plain transformers model.

Training keeps its own adapter config (`fedlora.model.lora_config`: no task type, the head in
modules_to_save only when it trains); only the saved files declare the task.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from fedlora.config import ExperimentConfig, ModelConfig
from fedlora.export_card import MINILM_HUB_ID, RunFigures, hub_id, model_card
from fedlora.lora import has_merged_delta
from fedlora.model import (
    TINY_MODEL,
    TaskKind,
    base_model_config,
    build_base_model,
    load_tokenizer,
    model_source,
    quiet_transformers,
    task_kind,
)

__all__ = ["MINILM_HUB_ID", "RunFigures", "hub_id", "model_card"]  # the card's names, imported from here too

BASE_DIR = "base"
BASE_REFERENCE = f"./{BASE_DIR}"  # base_model_name_or_path of a carried base (see the module docstring)
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODEL_CONFIG = "config.json"
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
CARD = "README.md"
_PEFT_PREFIX = "base_model.model."


def write_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Write `folder` whole or not at all: `fill` writes a partial folder beside it, which then takes the final name."""
    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with quiet_transformers():
            fill(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # The old folder is set aside, and deleted only once the new one has its name.
    old = folder.with_name(folder.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(partial, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def write_adapter(model: PeftModel, folder: Path, extras: Callable[[Path], None] | None = None) -> Path:
    """Save a peft adapter into `folder` whole or not at all; `extras` add the task's own files (tokenizer, base, card)."""

    def fill(partial: Path) -> None:
        model.save_pretrained(str(partial))
        if extras is not None:
            extras(partial)

    return write_folder(folder, fill)


def export_adapter(
    model: PeftModel, folder: Path, config: ExperimentConfig, class_names: Sequence[str], figures: RunFigures
) -> Path:
    """Write the classification adapter folder described in the module docstring."""
    tokenizer = load_tokenizer(config.model)

    def extras(partial: Path) -> None:
        declare_task(partial, task_kind(config.model), BASE_REFERENCE, _frozen_head(model, config.model))
        _save_base(config, class_names, model, partial / BASE_DIR, adapter_head(partial))
        carry_base(partial, tokenizer)
        (partial / CARD).write_text(model_card(config, class_names, figures))

    return write_adapter(model, folder, extras)


def declare_task(folder: Path, kind: TaskKind, reference: str, extra_weights: dict[str, torch.Tensor] | None = None) -> None:
    """Give the saved adapter its task type, its head as modules_to_save (`extra_weights`: a head peft did not save)
    and the base it goes on."""
    if extra_weights:
        weights = load_file(folder / ADAPTER_WEIGHTS)
        weights.update(extra_weights)
        save_file(weights, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapter_config = json.loads((folder / ADAPTER_CONFIG).read_text())
    adapter_config.update(
        task_type=kind.peft_task_type,
        modules_to_save=list(kind.head_modules) or None,
        base_model_name_or_path=reference,
        inference_mode=True,
    )
    (folder / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")


def _frozen_head(model: PeftModel, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A head that did not train is not in peft's save: its weights as the seed initialized them, under peft's names."""
    if config.train_head:
        return {}
    base = model.get_base_model()
    return {
        f"{_PEFT_PREFIX}{name}.{param_name}": tensor.detach().cpu().contiguous()
        for name in task_kind(config).head_modules
        for param_name, tensor in getattr(base, name).state_dict().items()
    }


def adapter_head(folder: Path) -> dict[str, torch.Tensor]:
    """The head the saved adapter restores (its modules_to_save), under the base model's names."""
    weights = load_file(folder / ADAPTER_WEIGHTS)
    return {key[len(_PEFT_PREFIX) :]: tensor for key, tensor in weights.items() if "lora_" not in key}


def labelled(base_config: PretrainedConfig, class_names: Sequence[str], architecture: str) -> PretrainedConfig:
    """The base's config naming the run's labels and the class the run built."""
    base_config = copy.deepcopy(base_config)
    base_config.id2label = dict(enumerate(class_names))
    base_config.label2id = {name: index for index, name in enumerate(class_names)}
    base_config.architectures = [architecture]
    return base_config


def _save_base(
    config: ExperimentConfig, class_names: Sequence[str], model: PeftModel, folder: Path, head: dict[str, torch.Tensor]
) -> None:
    """The base model with the run's labels: its weights linked where a pretrained file exists (plus the head, which
    the file lacks), else written: as the seed built them, or holding the run's merged delta (FLoRA, FedEx-LoRA)."""
    merged = copy.deepcopy(model).unload() if has_merged_delta(model) else None
    linked = _pretrained_weights(config.model) if merged is None else None
    # The base the run started from: the seed rebuilds it bit for bit (its weights are frozen).
    base = merged
    if base is None and linked is None:
        base = build_base_model(config.model, len(class_names), config.seed)
    architecture = type(model.get_base_model()).__name__
    base_config = base.config if base is not None else base_model_config(config.model, len(class_names))
    base_config = labelled(base_config, class_names, architecture)
    if base is not None:
        base.config = base_config
        base.save_pretrained(str(folder))
        return
    base_config.save_pretrained(str(folder))
    link_weights(folder, [linked], head)


def _pretrained_weights(config: ModelConfig) -> Path | None:
    """The single safetensors file a pretrained base was loaded from, if there is one."""
    if not config.pretrained or config.name == TINY_MODEL:
        return None
    source = Path(model_source(config))
    if source.is_dir():
        candidate = source / WEIGHTS
        return candidate.resolve() if candidate.is_file() else None
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(config.name, WEIGHTS)
    return Path(cached).resolve() if isinstance(cached, str) else None


def link_weights(folder: Path, files: Sequence[Path], extra: dict[str, torch.Tensor] | None = None, copy: bool = False) -> None:
    """The weights of `files` (hard links, copies across file systems; `copy`: always copies) and `extra` (a small
    file of its own), as one checkpoint in `folder`: a single file, or shards and their index where there are several."""
    count = len(files) + (1 if extra else 0)
    names = [WEIGHTS] if count == 1 else [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for source, name in zip(files, names, strict=False):
        (shutil.copyfile if copy else _link)(source, folder / name)
    if extra:
        save_file({k: v.contiguous() for k, v in extra.items()}, folder / names[-1], metadata={"format": "pt"})
    if count > 1:
        _write_index(folder / WEIGHTS_INDEX, {name: folder / name for name in names})


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a model folder's checkpoint (its shards, or its single file)."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return [folder / WEIGHTS]


def carry_base(folder: Path, tokenizer: PreTrainedTokenizerBase) -> None:
    """Make the adapter folder a model folder too: the tokenizer (in it and in base/, where a loader of either looks),
    and the base's config and an index of its weights under base/, so that transformers loads the base from the
    folder itself, wherever it is, and the adapter onto it."""
    base = folder / BASE_DIR
    tokenizer.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(base))
    shutil.copyfile(base / MODEL_CONFIG, folder / MODEL_CONFIG)
    _write_index(folder / WEIGHTS_INDEX, {f"{BASE_DIR}/{path.name}": path for path in weight_files(base)})


def _write_index(path: Path, files: dict[str, Path]) -> None:
    """transformers' index of a sharded checkpoint: which file (a path relative to the index) holds each tensor."""
    weight_map = {}
    for name, file in files.items():
        weight_map.update(dict.fromkeys(tensor_names(file), name))
    total = sum(file.stat().st_size for file in files.values())
    path.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")


def tensor_names(file: Path) -> list[str]:
    """The names of the tensors in a safetensors file (read from its header)."""
    with safe_open(str(file), framework="pt") as weights:
        return list(weights.keys())


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not allowed: a copy
        shutil.copyfile(source, target)
