"""A causal LM's adapter as `AutoPeftModelForCausalLM` and transformers load it: base, tokenizer, prompt, card.

The base: an unchanged hub model is named by its hub id (peft's convention: the Auto class loads
it from anywhere), the user's own local folder by its absolute path; the tiny models' random
bases and a base holding a merged delta (FLoRA, FedEx-LoRA) are on no hub and are carried in
`base/`, as a classification adapter carries its base (fedlora/export.py).

The prompt: the tokenizer is saved with the chat template that renders exactly what training
read. Alpaca-style data (the built-in task's) was rendered with ALPACA_PROMPT whatever the
tokenizer (fedlora/data/instruct.py), so the adapter ships ALPACA_CHAT_TEMPLATE: a "user" turn is
the instruction, an optional "input" turn the input, and the generation prompt is "### Response:".
Chat data was rendered with the tokenizer's own template (DEFAULT_CHAT_TEMPLATE where it had
none), which is saved with it. The card says which, with the prompt written out.
"""

from __future__ import annotations

import copy
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from fedlora.causal import TINY_CAUSAL, build_causal_base
from fedlora.config import ExperimentConfig, ModelConfig
from fedlora.data.instruct import ALPACA_PROMPT, chat_template
from fedlora.export import BASE_DIR, BASE_REFERENCE, CARD, carry_base, declare_task, write_adapter
from fedlora.export_card import RunFigures, model_card
from fedlora.lora import has_merged_delta
from fedlora.model import CAUSAL_LANGUAGE_MODEL

# ALPACA_PROMPT as a chat template; any role but these is refused rather than dropped unseen.
ALPACA_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'input' %}{{ '### Input:\\n' + message['content'] + '\\n\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('this adapter was trained on Alpaca prompts: roles user, input, assistant') }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)
ALPACA_PROMPT_SECTION = "\n".join(
    [
        "## Prompt",
        "",
        "Training read every example as this prompt (the loss on the answer, which ends with the end-of-sequence token),",
        "without the Input block where an example has none:",
        "",
        "```",
        ALPACA_PROMPT.rstrip("\n"),
        "```",
        "",
        "The tokenizer's chat template writes exactly this prompt from",
        '`[{"role": "user", "content": instruction}, {"role": "input", "content": input}]` (the input turn optional):',
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.",
        "",
    ]
)
CHAT_PROMPT_SECTION = "\n".join(
    [
        "## Prompt",
        "",
        "Training read each conversation as the tokenizer's chat template renders it (saved with the tokenizer):",
        "`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`.",
        "",
    ]
)


def export_causal_adapter(
    model: PeftModel, folder: Path, config: ExperimentConfig, tokenizer: PreTrainedTokenizerBase, figures: RunFigures
) -> Path:
    """Write the adapter folder described in the module docstring."""
    alpaca = trained_on_alpaca(config)
    tokenizer = with_chat_template(tokenizer, ALPACA_CHAT_TEMPLATE if alpaca else chat_template(tokenizer))
    prompt = ALPACA_PROMPT_SECTION if alpaca else CHAT_PROMPT_SECTION

    def extras(partial: Path) -> None:
        carried = _carried_base(model, config.model, config.seed)
        if carried is None:
            declare_task(partial, CAUSAL_LANGUAGE_MODEL, base_reference(config.model))
            tokenizer.save_pretrained(str(partial))
        else:
            declare_task(partial, CAUSAL_LANGUAGE_MODEL, BASE_REFERENCE)
            carried.save_pretrained(str(partial / BASE_DIR))
            carry_base(partial, tokenizer)
        (partial / CARD).write_text(model_card(config, [], figures, prompt, carries_base=carried is not None))

    return write_adapter(model, folder, extras)


def trained_on_alpaca(config: ExperimentConfig) -> bool:
    """Whether the run's examples were Alpaca-style (else chat): its held-out examples, as the server loaded them."""
    from fedlora import workspace  # it imports the task modules, which import this one

    examples = workspace.federated_task(config).test.examples
    return not examples[0].is_chat


def with_chat_template(tokenizer: PreTrainedTokenizerBase, template: str) -> PreTrainedTokenizerBase:
    """A copy of the tokenizer with `template` (the run's tokenizer is shared, and renders the chat data as it was)."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = template
    return tokenizer


def base_reference(config: ModelConfig) -> str:
    """An uncarried base by name: the user's local folder by absolute path, else the hub id."""
    local = Path(config.name).expanduser()
    return str(local.resolve()) if local.exists() else config.name


def _carried_base(model: PeftModel, config: ModelConfig, seed: int) -> PreTrainedModel | None:
    """The base the adapter carries: as merged (FLoRA's, FedEx-LoRA's W0 + U V), or a tiny model's from the seed."""
    if has_merged_delta(model):
        return copy.deepcopy(model).unload()
    if config.name in TINY_CAUSAL:
        return build_causal_base(config, seed)
    return None
