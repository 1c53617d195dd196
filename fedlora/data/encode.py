"""Tokenized examples as tensors, and the batches training and evaluation draw from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from fedlora.data.builtin import TextExamples


@dataclass(frozen=True)
class EncodedExamples:
    """Token ids, attention masks and labels, padded to the longest example of the set."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The examples at `index`, trimmed to the longest of them (less padding, less compute)."""
        mask = self.attention_mask[index]
        width = int(mask.sum(dim=1).max().item()) if len(index) else 1
        return {
            "input_ids": self.input_ids[index, :width],
            "attention_mask": mask[:, :width],
            "labels": self.labels[index],
        }


def encode_examples(tokenizer: PreTrainedTokenizerBase, examples: TextExamples, max_length: int) -> EncodedExamples:
    """Tokenize every text once (truncated to max_length)."""
    encoded = tokenizer(list(examples.texts), truncation=True, max_length=max_length, padding="longest", return_tensors="pt")
    return EncodedExamples(
        input_ids=encoded["input_ids"],
        attention_mask=encoded["attention_mask"],
        labels=torch.tensor(examples.labels, dtype=torch.long),
    )
