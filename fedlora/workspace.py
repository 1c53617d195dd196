"""What is expensive to build, built once per process: data, tokenized splits, the LoRA model.

Ray keeps client actors alive across rounds; without these caches every round would reload the
base model and re-tokenize the corpus. Keys are the JSON of the config sections involved, so
two experiments in one process never share an entry by mistake.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO
from pathlib import Path

from flwr.common.logger import log
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.config import ExperimentConfig
from fedlora.data.builtin import TextExamples
from fedlora.data.encode import EncodedExamples, encode_examples
from fedlora.data.partition import partition_examples
from fedlora.data.sources import LabelledData, load_data, load_node_examples
from fedlora.lora import LoraState
from fedlora.model import build_lora_model, load_tokenizer
from fedlora.node import node_data_path, node_device, shared_experiment


@dataclass(frozen=True)
class FederatedTask:
    """The task's classes, every client's train share and the server's held-out split."""

    class_names: list[str]
    partitions: list[TextExamples]
    test: TextExamples

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def federated_task(config: ExperimentConfig) -> FederatedTask:
    """The configured data, split among `federation.num_clients` clients."""
    return _federated_task(config.data.model_dump_json(), config.federation.num_clients, config.seed)


@lru_cache(maxsize=4)
def _federated_task(data_json: str, num_clients: int, seed: int) -> FederatedTask:
    config = ExperimentConfig.model_validate({"data": _loads(data_json), "seed": seed})
    data: LabelledData = load_data(config.data, seed)
    parts = partition_examples(data.train, config.data, num_clients, seed)
    return FederatedTask(data.class_names, parts, data.test)


def tokenizer(config: ExperimentConfig) -> PreTrainedTokenizerBase:
    """The base model's tokenizer."""
    return _tokenizer(config.model.model_dump_json())


@lru_cache(maxsize=4)
def _tokenizer(model_json: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(ExperimentConfig.model_validate({"model": _loads(model_json)}).model)


def client_examples(config: ExperimentConfig, client_id: int) -> EncodedExamples:
    """One client's train share, tokenized; a deployed node with a data-path: all of its own data."""
    data_path = node_data_path(config)
    if data_path is not None:
        return _node_examples(shared_experiment(config).model_dump_json(), str(data_path))
    return _client_examples(shared_experiment(config).model_dump_json(), client_id)


@lru_cache(maxsize=256)
def _client_examples(config_json: str, client_id: int) -> EncodedExamples:
    config = ExperimentConfig.model_validate_json(config_json)
    task = federated_task(config)
    return encode_examples(tokenizer(config), task.partitions[client_id], config.model.max_length)


@lru_cache(maxsize=4)
def _node_examples(config_json: str, data_path: str) -> EncodedExamples:
    config = ExperimentConfig.model_validate_json(config_json)
    # Only labels given as names need the task's class list (which loads the experiment's data).
    examples = load_node_examples(Path(data_path), config.data, lambda: load_data(config.data, config.seed).class_names)
    log(INFO, "node data set %s: %d examples", data_path, len(examples.labels))
    return encode_examples(tokenizer(config), examples, config.model.max_length)


def test_examples(config: ExperimentConfig) -> EncodedExamples:
    """The server's held-out split, tokenized."""
    return _test_examples(shared_experiment(config).model_dump_json())


@lru_cache(maxsize=4)
def _test_examples(config_json: str) -> EncodedExamples:
    config = ExperimentConfig.model_validate_json(config_json)
    return encode_examples(tokenizer(config), federated_task(config).test, config.model.max_length)


def lora_model(config: ExperimentConfig, num_labels: int) -> PeftModel:
    """The LoRA model for this experiment (shared within a process; load a state before use),
    on the node's device when its node config names one."""
    return _lora_model(config.model.model_dump_json(), num_labels, config.seed, node_device(config))


@lru_cache(maxsize=2)
def _lora_model(model_json: str, num_labels: int, seed: int, device: str | None = None) -> PeftModel:
    config = ExperimentConfig.model_validate({"model": _loads(model_json)})
    model = build_lora_model(config.model, num_labels, seed)
    return model if device is None else model.to(device)


def initial_state(config: ExperimentConfig, num_labels: int) -> LoraState:
    """The adapter and head as freshly initialized from the seed (the cached model moves on)."""
    return _initial_state(config.model.model_dump_json(), num_labels, config.seed).clone()


@lru_cache(maxsize=2)
def _initial_state(model_json: str, num_labels: int, seed: int) -> LoraState:
    config = ExperimentConfig.model_validate({"model": _loads(model_json)})
    return LoraState.from_model(build_lora_model(config.model, num_labels, seed))


def _loads(text: str) -> dict:
    return json.loads(text)
