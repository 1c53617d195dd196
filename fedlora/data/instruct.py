"""Instruction examples for causal LMs: how a prompt is rendered, and tokens with response-only labels.

Two kinds of example, as instruction-tuning data sets hold them:
- Alpaca-style: an instruction, an optional input, and the output. The prompt is rendered with
  `ALPACA_PROMPT` (or `ALPACA_PROMPT_NO_INPUT`) whatever the tokenizer, as Alpaca-format data
  is usually trained;
- chat: a list of (role, content) messages; the last one is the assistant's answer and the
  turns before it are the prompt, rendered with the tokenizer's chat template when it has one
  (`DEFAULT_CHAT_TEMPLATE` otherwise). Earlier assistant turns are context, not trained on.

Encoding (`encode_instructions`) tokenizes the prompt and the response separately, so that the
boundary between them is exact, and puts IGNORE_INDEX on every prompt and padding position of
the labels: the loss is on the response tokens (and the end-of-sequence token after them) only.
Hugging Face's causal LMs shift the labels by one inside their forward pass, so `labels[t]` is
the token predicted from the positions up to t - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # cross-entropy's ignore_index: positions that carry no loss
ASSISTANT = "assistant"
ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_PROMPT_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
# For tokenizers without a chat template (and the tiny test models' tokenizer): one line per
# turn, "<role>: <content>", and "assistant:" to prompt the answer; the answer ends with EOS.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


@dataclass(frozen=True)
class InstructionExample:
    """One example: an Alpaca-style instruction (and input), or the chat turns before the answer; and the answer."""

    response: str
    instruction: str = ""
    input: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content) of the turns before the answer

    @property
    def is_chat(self) -> bool:
        """Whether the prompt is a conversation (rendered with a chat template)."""
        return bool(self.messages)


@dataclass(frozen=True)
class InstructionSet:
    """Instruction examples and each one's category (what non-IID partitions split by; 0 without one)."""

    examples: list[InstructionExample]
    categories: list[int]

    def __len__(self) -> int:
        return len(self.examples)

    def subset(self, indices: list[int]) -> InstructionSet:
        """The examples at `indices`, in that order."""
        return InstructionSet([self.examples[i] for i in indices], [self.categories[i] for i in indices])

    @property
    def labels(self) -> list[int]:
        """The categories, under the name classification data uses (partition checks read it)."""
        return self.categories


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's own chat template, or DEFAULT_CHAT_TEMPLATE where it has none."""
    template = getattr(tokenizer, "chat_template", None)
    return template if isinstance(template, str) and template else DEFAULT_CHAT_TEMPLATE


def _turns(messages: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in messages]


def render(tokenizer: PreTrainedTokenizerBase, example: InstructionExample) -> tuple[str, str]:
    """(prompt, response) as text: what the model reads, and what it must write after it.

    A chat answer is the text the template adds for the assistant's turn (its end-of-turn
    marker included), when the template renders the prompt as a prefix of the whole
    conversation; otherwise the answer's content alone.
    """
    if not example.is_chat:
        template = ALPACA_PROMPT if example.input.strip() else ALPACA_PROMPT_NO_INPUT
        return template.format(instruction=example.instruction, input=example.input), example.response
    template = chat_template(tokenizer)
    turns = _turns(example.messages)
    prompt = tokenizer.apply_chat_template(turns, chat_template=template, tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template(
        [*turns, {"role": ASSISTANT, "content": example.response}], chat_template=template, tokenize=False
    )
    return prompt, (whole[len(prompt) :] if whole.startswith(prompt) else example.response)


@dataclass(frozen=True)
class CausalExamples:
    """Prompt + response token ids, right-padded; labels IGNORE_INDEX except on the response tokens."""

    input_ids: torch.Tensor  # [N, T]
    attention_mask: torch.Tensor  # [N, T]
    labels: torch.Tensor  # [N, T]
    prompt_lengths: torch.Tensor  # [N]: tokens of each example's prompt

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at `index`, trimmed to the longest of them, labels included."""
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max().item()) if len(index) else 1
        return {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[index, :width],
        }

    def prompts(self, index: torch.Tensor, pad_token_id: int) -> dict[str, torch.Tensor]:
        """The prompts alone of the examples at `index`, left-padded (as generation wants them)."""
        lengths = self.prompt_lengths[index]
        width = int(lengths.max().item())
        ids = torch.full((len(index), width), pad_token_id, dtype=self.input_ids.dtype)
        mask = torch.zeros((len(index), width), dtype=self.attention_mask.dtype)
        for row, (example, length) in enumerate(zip(index.tolist(), lengths.tolist())):
            ids[row, width - length :] = self.input_ids[example, :length]
            mask[row, width - length :] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def responses(self, index: torch.Tensor) -> list[list[int]]:
        """The reference response token ids (end-of-sequence included) of the examples at `index`."""
        return [[int(t) for t in self.labels[i][self.labels[i] != IGNORE_INDEX]] for i in index.tolist()]


def encode_instructions(
    tokenizer: PreTrainedTokenizerBase, examples: list[InstructionExample], max_length: int
) -> CausalExamples:
    """Tokenize every example once: prompt, response and EOS, at most `max_length` tokens.

    A long example keeps its response: the prompt loses tokens from its start first (down to
    half of max_length), then the response from its end.
    """
    rows = [_example_ids(tokenizer, example, max_length) for example in examples]
    width = max((len(prompt) + len(response) for prompt, response in rows), default=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (prompt, response) in enumerate(rows):
        total = len(prompt) + len(response)
        input_ids[row, :total] = torch.tensor(prompt + response)
        attention_mask[row, :total] = 1
        labels[row, len(prompt) : total] = torch.tensor(response)
    lengths = torch.tensor([len(prompt) for prompt, _ in rows], dtype=torch.long)
    return CausalExamples(input_ids, attention_mask, labels, lengths)


def _example_ids(tokenizer: PreTrainedTokenizerBase, example: InstructionExample, max_length: int) -> tuple[list[int], list[int]]:
    prompt_text, response_text = render(tokenizer, example)
    prompt = _bos(tokenizer, prompt_text) + tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not response or response[-1] != eos):
        response = response + [eos]  # the model must learn to stop
    overflow = len(prompt) + len(response) - max_length
    if overflow > 0:
        keep = max(len(prompt) - overflow, min(len(prompt), max_length // 2), 1)
        prompt = prompt[len(prompt) - keep :]
        response = response[: max_length - len(prompt)]
    return prompt, response


def _bos(tokenizer: PreTrainedTokenizerBase, prompt_text: str) -> list[int]:
    """The beginning-of-sequence token to put first, where the tokenizer has one and the
    rendered prompt (a chat template may write it) does not start with it already."""
    bos = tokenizer.bos_token_id
    if bos is None or (tokenizer.bos_token and prompt_text.startswith(tokenizer.bos_token)):
        return []
    return [bos]
