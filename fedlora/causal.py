"""Causal language models with LoRA (model.task = "causal_lm"): build and score (exported by fedlora/export_causal.py).

Base models, chosen by `model.name`:
- "tiny-llama", "tiny-gpt2": small Llama- and GPT-2-architecture models built from `[model.tiny]`
  with random weights (seeded), for tests and the offline instruction task (no pretrained causal
  LM ships in a package of the registry). Their tokenizer (`tiny_tokenizer`) is word-level, built
  from the built-in task's vocabulary (`task_vocabulary`, about 500 words; any other word is
  [UNK]), lowercased, with [EOS] ending a sequence and DEFAULT_CHAT_TEMPLATE as chat template:
  a subword tokenizer's 30k-row output layer would make a CPU step ten times slower. Their
  input and output embeddings are separate (untied) and drawn with standard deviation
  TINY_LOGIT_SCALE / hidden_size: the output layer is frozen, and at transformers' 0.02 even a
  perfectly aligned hidden state gives logits too flat to predict any word with confidence (at
  this scale a hidden state aligned with a word's row gives it a logit of about
  TINY_LOGIT_SCALE). Tied, a random model would predict its input token with that confidence
  (held-out loss about 30 before training, against about 10 untied), and learn the task slower;
- anything else: a local folder or a hub id loaded with `AutoModelForCausalLM` (the hub needs
  the network), e.g. "meta-llama/Llama-3.2-1B-Instruct" or "Qwen/Qwen2.5-0.5B-Instruct".

Adapters: peft's causal-LM task type; target modules, unless `model.target_modules` names them,
from peft's own table of defaults by architecture (`default_target_modules`). GPT-2 keeps its
attention in one fused Conv1D (`c_attn`, weight stored d_in x d_out): peft's LoRA factors are
still A (r x d_in) and B (d_out x r) and the update is applied transposed (`fan_in_fan_out`),
so every strategy's math on B A holds unchanged (FedSVD's refactorization of the fused q/k/v
update included). Nothing but the LoRA factors is trained or sent: there is no head.

Scores on the held-out split (`evaluate_causal`): the token loss on the response tokens, its
perplexity exp(loss), and the exact match of greedy generations on the first
`data.exact_match_examples` examples: a generation matches when it ends with the end-of-sequence
token and its text (special tokens dropped, whitespace collapsed) equals the reference answer's.
A generation stays inside the model's positions (a long prompt loses tokens from its start,
`greedy_generations`); a `model.max_length` past them is refused before the run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

from fedlora.config import ConfigError, ModelConfig
from fedlora.data.instruct import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, CausalExamples
from fedlora.data.instruct_task import task_vocabulary
from fedlora.model import seeded

TINY_LLAMA = "tiny-llama"
TINY_GPT2 = "tiny-gpt2"
TINY_CAUSAL = (TINY_LLAMA, TINY_GPT2)
TINY_SPECIAL_TOKENS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "eos_token": "[EOS]"}
TINY_LOGIT_SCALE = 32.0  # see the module docstring
# Architectures whose linear layers are transformers' Conv1D (weight d_in x d_out).
CONV1D_ARCHITECTURES = ("gpt2",)


# --- tokenizers ---------------------------------------------------------------------------
def load_causal_tokenizer(config: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of the configured causal LM, with a padding token (its EOS where it has none)."""
    if config.name in TINY_CAUSAL:
        return tiny_tokenizer()
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.name)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.name: cannot load the tokenizer of {config.name!r}{_offline_hint()}: {_first_line(err)}"
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """The tiny causal models' word-level tokenizer over the built-in task's vocabulary (see the module docstring)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocabulary = {token: i for i, token in enumerate([*TINY_SPECIAL_TOKENS.values(), *task_vocabulary()])}
    words = Tokenizer(models.WordLevel(vocabulary, unk_token=TINY_SPECIAL_TOKENS["unk_token"]))
    words.normalizer = normalizers.Lowercase()
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, **TINY_SPECIAL_TOKENS)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


# --- models -------------------------------------------------------------------------------
def default_target_modules(model_type: str) -> list[str]:
    """peft's default LoRA target modules for an architecture (its `model_type`)."""
    modules = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not modules:
        raise ConfigError(
            f"model.target_modules: peft has no default for architecture {model_type!r}; name the modules to adapt, "
            "e.g. target_modules = ['q_proj', 'v_proj']"
        )
    return list(modules)


def build_causal_base(config: ModelConfig, seed: int) -> PreTrainedModel:
    """The causal LM without adapters (random weights from the seed where not pretrained)."""
    check_causal_resources(config)
    with seeded(seed):
        if config.name in TINY_CAUSAL:
            model = _tiny_model(config)
        elif not config.pretrained:
            model = AutoModelForCausalLM.from_config(_hub_config(config.name), dtype=_dtype(config))
        else:
            model = _from_pretrained(config)
    if config.name in TINY_CAUSAL and config.dtype != "float32":
        model = model.to(_dtype(config))
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing needs no gradient on the (frozen) embeddings' output.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def causal_lora_config(config: ModelConfig, model_type: str) -> LoraConfig:
    """peft's causal-LM adapter config: rank, alpha, dropout, target modules (peft's default for the architecture if unset)."""
    return LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.target_modules or default_target_modules(model_type)),
        task_type=TaskType.CAUSAL_LM,
        # Conv1D stores its weight transposed: peft must apply B A transposed (it would warn and set it).
        fan_in_fan_out=model_type in CONV1D_ARCHITECTURES,
    )


def build_causal_lora_model(config: ModelConfig, seed: int) -> PeftModel:
    """Causal LM plus LoRA adapters, initialized from the seed."""
    base = build_causal_base(config, seed)
    if config.load_in_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=config.gradient_checkpointing)
    with seeded(seed + 1):
        try:
            return get_peft_model(base, causal_lora_config(config, base.config.model_type))
        except ValueError as err:
            raise ConfigError(f"model.target_modules: {_first_line(err)}") from None


def check_causal_resources(config: ModelConfig) -> None:
    """Refuse, before a run starts, what this model cannot run: examples longer than its positions
    (`model.max_length`), 4-bit base weights without a CUDA device or bitsandbytes."""
    if config.causal:
        _check_positions(config)
    if not config.load_in_4bit:
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"model.load_in_4bit: 4-bit base weights (bitsandbytes) need a CUDA device and torch {torch.__version__} sees none "
            "here; set model.load_in_4bit = false"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("model.load_in_4bit: needs the bitsandbytes package (pip install bitsandbytes)") from None


def _check_positions(config: ModelConfig) -> None:
    """Refuse a max_length the model has no positions for: training and generation would index past them.

    The tiny models are built with max(128, max_length) positions: they always fit.
    """
    if config.name in TINY_CAUSAL:
        return
    positions = max_positions(_hub_config(config.name))
    if positions is not None and config.max_length > positions:
        raise ConfigError(
            f"model.max_length: {config.max_length} tokens per example, but {config.name!r} has {positions} positions; "
            f"set model.max_length to at most {positions}"
        )


def max_positions(model_config: PretrainedConfig) -> int | None:
    """How many tokens (prompt and generation together) the model can place, or None where its
    config names no limit (GPT-2's n_positions answers to this name too)."""
    positions = getattr(model_config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) else None


def _tiny_model(config: ModelConfig) -> PreTrainedModel:
    tokenizer = tiny_tokenizer()
    tiny, positions = config.tiny, max(128, config.max_length)
    special = {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None}
    if config.name == TINY_LLAMA:
        llama = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny.hidden_size,
            intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers,
            num_attention_heads=tiny.num_heads,
            num_key_value_heads=tiny.num_heads,
            max_position_embeddings=positions,
            tie_word_embeddings=False,
            **special,
        )
        return _scaled_embeddings(LlamaForCausalLM(llama))
    gpt2 = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=tiny.hidden_size,
        n_layer=tiny.num_layers,
        n_head=tiny.num_heads,
        n_inner=tiny.intermediate_size,
        n_positions=positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        **special,
    )
    return _scaled_embeddings(GPT2LMHeadModel(gpt2))


def _scaled_embeddings(model: PreTrainedModel) -> PreTrainedModel:
    """Redraw the input and output embeddings at TINY_LOGIT_SCALE / hidden_size (under the caller's seed)."""
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings.normal_(0.0, TINY_LOGIT_SCALE / embeddings.shape[1])
        model.get_output_embeddings().weight.normal_(0.0, TINY_LOGIT_SCALE / embeddings.shape[1])
    return model


def _dtype(config: ModelConfig) -> torch.dtype:
    return torch.bfloat16 if config.dtype == "bfloat16" else torch.float32


def _hub_config(name: str) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name: cannot load the config of {name!r}{_offline_hint()}: {_first_line(err)}") from None


def _from_pretrained(config: ModelConfig) -> PreTrainedModel:
    options: dict[str, object] = {"dtype": _dtype(config)}
    if config.load_in_4bit:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        options["device_map"] = {"": torch.cuda.current_device()}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        return AutoModelForCausalLM.from_pretrained(config.name, **options)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model.name: cannot load {config.name!r}{_offline_hint()}: {_first_line(err)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()


def _offline_hint() -> str:
    return " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# --- losses and scores --------------------------------------------------------------------
def shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at positions 0..T-2 and the tokens they predict (labels at 1..T-1)."""
    return logits[:, :-1], labels[:, 1:]


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per sequence: the mean cross-entropy over its response tokens ([B]); 0 for a sequence without any.

    One sequence is one example (DP's unit of privacy): its loss depends on its own tokens only.
    """
    predicted, targets = shifted(logits, labels)
    batch, steps, vocab = predicted.shape
    token = nn.functional.cross_entropy(
        predicted.reshape(-1, vocab).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(batch, steps)
    counts = (targets != IGNORE_INDEX).sum(dim=1).clamp(min=1)
    return token.sum(dim=1) / counts


@dataclass(frozen=True)
class CausalScores:
    """Held-out figures of a causal LM: exact match, token loss on the responses, perplexity."""

    exact_match: float
    loss: float
    perplexity: float


@torch.no_grad()
def evaluate_causal(
    model: nn.Module,
    data: CausalExamples,
    tokenizer: PreTrainedTokenizerBase,
    exact_match_examples: int,
    max_new_tokens: int,
    batch_size: int = 16,
) -> CausalScores:
    """Token loss and perplexity on every example; exact match of greedy generations on the first ones."""
    was_training = model.training
    model.eval()
    try:
        loss = response_token_loss(model, data, batch_size)
        matched = exact_matches(model, data, tokenizer, min(exact_match_examples, len(data)), max_new_tokens)
    finally:
        model.train(was_training)
    return CausalScores(matched, loss, math.exp(min(loss, 700.0)))


def response_token_loss(model: nn.Module, data: CausalExamples, batch_size: int = 16) -> float:
    """Mean cross-entropy over every response token of the examples (the held-out loss)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(torch.arange(start, min(start + batch_size, len(data)))).items()}
        labels = batch.pop("labels")
        predicted, targets = shifted(model(**batch).logits, labels)
        total += nn.functional.cross_entropy(
            predicted.reshape(-1, predicted.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
        ).item()
        count += int((targets != IGNORE_INDEX).sum().item())
    return total / max(count, 1)


def greedy_generations(
    model: nn.Module, data: CausalExamples, index: torch.Tensor, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> list[list[int]]:
    """The greedy continuation of each prompt at `index`, cut after its first end-of-sequence token.

    Prompt and continuation stay inside the model's positions (`max_positions`; past them GPT-2
    indexes out of its position table): the new tokens are capped at positions - 1, then the
    prompts, left-padded to the longest of the batch, lose tokens from their start (as
    encode_instructions cuts a long prompt) so that the answer keeps its whole budget.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = {k: v.to(device) for k, v in data.prompts(index, pad).items()}
    positions = max_positions(model.config)
    if positions is not None:
        max_new_tokens = min(max_new_tokens, positions - 1)
        prompts = {k: v[:, -(positions - max_new_tokens) :] for k, v in prompts.items()}
    output = model.generate(
        **prompts,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    generations = []
    for row in output[:, prompts["input_ids"].shape[1] :].tolist():
        end = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        generations.append(row[:end])
    return generations


def exact_matches(
    model: nn.Module,
    data: CausalExamples,
    tokenizer: PreTrainedTokenizerBase,
    count: int,
    max_new_tokens: int,
    batch_size: int = 32,
) -> float:
    """Share of the first `count` examples whose greedy generation is their reference answer (see module docstring)."""
    matched = 0
    for start in range(0, count, batch_size):
        index = torch.arange(start, min(start + batch_size, count))
        references = data.responses(index)
        # No answer is longer than the longest reference: generating further cannot match.
        budget = min(max_new_tokens, max(len(r) for r in references))
        for generated, reference in zip(greedy_generations(model, data, index, tokenizer, budget), references):
            matched += is_exact_match(generated, reference, tokenizer)
    return matched / max(count, 1)


def is_exact_match(generated: list[int], reference: list[int], tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether a generation stopped (EOS) and reads as the reference: special tokens dropped, whitespace collapsed."""
    if tokenizer.eos_token_id is not None and (not generated or generated[-1] != tokenizer.eos_token_id):
        return False
    return _normalized(tokenizer.decode(generated, skip_special_tokens=True)) == _normalized(
        tokenizer.decode(reference, skip_special_tokens=True)
    )


def _normalized(text: str) -> str:
    return " ".join(text.split())
