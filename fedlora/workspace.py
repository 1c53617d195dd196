"""What is expensive to build, built once per process: data, tokenized splits, the LoRA model.

Ray keeps client actors alive across rounds; without these caches every round would reload the
base model and re-tokenize the corpus. Keys are the JSON of the config sections involved, so
two experiments in one process never share an entry by mistake.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from functools import lru_cache
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.config import ExperimentConfig, ModelConfig
from fedlora.lora import LoraState
from fedlora.node import client_device, node_data_path, server_device, shared_experiment
from fedlora.task import Encoded, Examples, build_lora_model, encode, load_node_data, load_task_data, load_tokenizer, partition


@dataclass(frozen=True)
class FederatedTask:
    """The task's classes (a causal LM's: categories), every client's train share and the server's held-out split."""

    class_names: list[str]
    partitions: list[Examples]
    test: Examples

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.class_names)


def federated_task(config: ExperimentConfig) -> FederatedTask:
    """The configured data, split among `federation.num_clients` clients."""
    return _federated_task(config.data.model_dump_json(), config.model.causal, config.federation.num_clients, config.seed)


@lru_cache(maxsize=4)
def _federated_task(data_json: str, causal_lm: bool, num_clients: int, seed: int) -> FederatedTask:
    config = ExperimentConfig.model_validate({"data": _loads(data_json), "seed": seed})
    data = load_task_data(config.data, causal_lm, seed)
    parts = partition(data.train, config.data, num_clients, seed)
    return FederatedTask(data.class_names, parts, data.test)


def tokenizer(config: ExperimentConfig) -> PreTrainedTokenizerBase:
    """The base model's tokenizer."""
    return _tokenizer(_model_json(config))


@lru_cache(maxsize=4)
def _tokenizer(model_json: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(_model_config(model_json))


def client_examples(config: ExperimentConfig, client_id: int) -> Encoded:
    """One client's train share, tokenized; a deployed node with a data-path: all of its own data."""
    data_path = node_data_path(config)
    if data_path is not None:
        return _node_examples(shared_experiment(config).model_dump_json(), str(data_path))
    return _client_examples(*_data_key(config), client_id)


def _data_key(config: ExperimentConfig) -> tuple[str, str, int, int]:
    """What decides the tokenized splits: the data, the model section (its tokenizer and
    max_length among the rest), the number of clients and the seed; not the federation's training
    settings or the strategy, so the runs of a sweep over those share one tokenization per process."""
    return config.data.model_dump_json(), _model_json(config), config.federation.num_clients, config.seed


@lru_cache(maxsize=256)
def _client_examples(data_json: str, model_json: str, num_clients: int, seed: int, client_id: int) -> Encoded:
    model = _model_config(model_json)
    task = _federated_task(data_json, model.causal, num_clients, seed)
    return encode(model, _tokenizer(model_json), task.partitions[client_id])


@lru_cache(maxsize=4)
def _node_examples(config_json: str, data_path: str) -> Encoded:
    config = ExperimentConfig.model_validate_json(config_json)
    # Only labels given as names need the task's class list (which loads the experiment's data).
    examples = load_node_data(Path(data_path), config, lambda: load_task_data(config.data, False, config.seed).class_names)
    log(INFO, "node data set %s: %d examples", data_path, len(examples.labels))
    return encode(config.model, tokenizer(config), examples)


def test_examples(config: ExperimentConfig) -> Encoded:
    """The server's held-out split, tokenized."""
    return _test_examples(*_data_key(config))


@lru_cache(maxsize=4)
def _test_examples(data_json: str, model_json: str, num_clients: int, seed: int) -> Encoded:
    model = _model_config(model_json)
    return encode(model, _tokenizer(model_json), _federated_task(data_json, model.causal, num_clients, seed).test)


def lora_model(config: ExperimentConfig, num_labels: int, rank: int | None = None) -> PeftModel:
    """A client's LoRA model for this experiment (shared within a process; load a state before
    use), on the client's device (fedlora.node.client_device); its adapter at `rank` (a client's
    own, model.client_ranks) or model.lora_rank. Clients of one rank share a model, whoever they are."""
    return _lora_model(_model_json(config, rank), num_labels, config.seed, client_device(config))


def server_model(config: ExperimentConfig, num_labels: int) -> PeftModel:
    """The server's LoRA model for evaluation (at model.lora_rank), on federation.server_device."""
    return _lora_model(_model_json(config, None), num_labels, config.seed, server_device(config))


def release_device_memory(model: PeftModel) -> None:
    """After a client's round on a GPU: hand the memory it cached (activations, optimizer state,
    Opacus's copy and per-sample gradients) back to the device, so that the other actors sharing
    the GPU can use it; the model itself stays, cached for this actor's next client."""
    if next(model.parameters()).device.type != "cuda":
        return
    gc.collect()  # the round's DP wrapper and optimizer may sit in reference cycles
    torch.cuda.empty_cache()


@lru_cache(maxsize=2)
def _lora_model(model_json: str, num_labels: int, seed: int, device: str | None = None) -> PeftModel:
    config = ExperimentConfig.model_validate({"model": _loads(model_json)})
    model = build_lora_model(config.model, num_labels, seed)
    return model if device is None else model.to(device)


def initial_state(config: ExperimentConfig, num_labels: int) -> LoraState:
    """The adapter and head as freshly initialized from the seed (the cached model moves on)."""
    return _initial_state(_model_json(config), num_labels, config.seed).clone()


@lru_cache(maxsize=2)
def _initial_state(model_json: str, num_labels: int, seed: int) -> LoraState:
    config = ExperimentConfig.model_validate({"model": _loads(model_json)})
    return LoraState.from_model(build_lora_model(config.model, num_labels, seed))


def _model_json(config: ExperimentConfig, rank: int | None = None) -> str:
    """The model section as a cache key, for one adapter rank (default lora_rank, the server's):
    without the per-client ranks, which only say who trains which rank."""
    return config.model.model_copy(update={"lora_rank": rank or config.model.lora_rank, "client_ranks": None}).model_dump_json()


def _model_config(model_json: str) -> ModelConfig:
    return ExperimentConfig.model_validate({"model": _loads(model_json)}).model


def _loads(text: str) -> dict:
    return json.loads(text)
