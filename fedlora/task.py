"""The task kind (`model.task`) in one place: the model builder, data, encoding, scores and export it takes.

Everything else (LoraState and its codec, the strategies, the defences, DP planning and the
trust boundary) is the same for both kinds:
- "classification": an encoder and a head (fedlora/model.py), labelled texts (fedlora/data/sources.py),
  accuracy and cross-entropy;
- "causal_lm": a causal LM (fedlora/causal.py), instruction examples (fedlora/data/instruct*.py),
  loss on the response tokens; `accuracy` is the exact match of greedy generations on the
  held-out split, `loss` the held-out token loss, and `perplexity` exp(loss).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from fedlora import causal, model
from fedlora.config import DataConfig, ExperimentConfig, ModelConfig
from fedlora.data.builtin import TextExamples
from fedlora.data.encode import EncodedExamples, encode_examples
from fedlora.data.instruct import CausalExamples, InstructionSet, encode_instructions
from fedlora.data.instruct_sources import (
    check_partition_categories,
    load_instruction_data,
    load_node_instructions,
    partition_instructions,
)
from fedlora.data.partition import partition_examples
from fedlora.data.sources import load_data, load_node_examples
from fedlora.export import RunFigures, export_adapter
from fedlora.export_causal import export_causal_adapter

Examples = TextExamples | InstructionSet
Encoded = EncodedExamples | CausalExamples


@dataclass(frozen=True)
class Scores:
    """A model's held-out figures: accuracy (exact match for causal LMs), loss, perplexity (causal LMs)
    and the confusion matrix (classifiers: confusion[true][predicted])."""

    accuracy: float
    loss: float
    perplexity: float | None = None
    confusion: list[list[int]] | None = None


@dataclass(frozen=True)
class TaskData:
    """Class (or category) names, train examples and held-out examples of either kind."""

    class_names: list[str]
    train: Examples
    test: Examples


def load_task_data(config: DataConfig, causal_lm: bool, seed: int) -> TaskData:
    """The configured source, read and checked, as the task kind wants it."""
    if causal_lm:
        check_partition_categories(config)
        data = load_instruction_data(config, seed)
        return TaskData(data.category_names, data.train, data.test)
    labelled = load_data(config, seed)
    return TaskData(labelled.class_names, labelled.train, labelled.test)


def partition(examples: Examples, config: DataConfig, num_clients: int, seed: int) -> list[Examples]:
    """Every client's share of the train examples."""
    if isinstance(examples, InstructionSet):
        return list(partition_instructions(examples, config, num_clients, seed))
    return list(partition_examples(examples, config, num_clients, seed))


def load_node_data(path: Path, config: ExperimentConfig, class_names) -> Examples:
    """A deployed node's own data set (node config `data-path`), of the experiment's kind."""
    if config.model.causal:
        return load_node_instructions(path, config.data)
    return load_node_examples(path, config.data, class_names)


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with the configured base model."""
    return causal.load_causal_tokenizer(config) if config.causal else model.load_tokenizer(config)


def encode(config: ModelConfig, tokenizer: PreTrainedTokenizerBase, examples: Examples) -> Encoded:
    """Tokenize examples once, as training and evaluation of the task kind read them."""
    if isinstance(examples, InstructionSet):
        return encode_instructions(tokenizer, examples.examples, config.max_length)
    return encode_examples(tokenizer, examples, config.max_length)


def build_lora_model(config: ModelConfig, num_labels: int, seed: int) -> PeftModel:
    """The base model of the task kind plus LoRA adapters, initialized from the seed."""
    return causal.build_causal_lora_model(config, seed) if config.causal else model.build_lora_model(config, num_labels, seed)


def evaluate(config: ExperimentConfig, lora_model: nn.Module, data: Encoded, tokenizer: PreTrainedTokenizerBase) -> Scores:
    """The held-out figures of a model on encoded examples."""
    if isinstance(data, CausalExamples):
        scores = causal.evaluate_causal(
            lora_model, data, tokenizer, config.data.exact_match_examples, config.model.max_new_tokens
        )
        return Scores(scores.exact_match, scores.loss, scores.perplexity)
    scores = model.classify(lora_model, data)
    return Scores(scores.accuracy, scores.loss, confusion=scores.confusion)


def export(
    config: ExperimentConfig,
    lora_model: PeftModel,
    folder: Path,
    tokenizer: PreTrainedTokenizerBase,
    class_names: list[str],
    figures: RunFigures,
) -> Path:
    """Write the final adapter as peft's Auto class of the task loads it (fedlora/export.py, fedlora/export_causal.py)."""
    if config.model.causal:
        return export_causal_adapter(lora_model, folder, config, tokenizer, figures)
    return export_adapter(lora_model, folder, config, class_names, figures)
