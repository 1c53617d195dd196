"""The built-in instruction task: topic questions answered with the topic's name, generated from a seed.

Each example is Alpaca-style: an instruction asking for the topic of a short text (one of a few
wordings), the text as the input, and the topic's name (one word: "sports", "politics", ...) as
the output. A text names one or two words of its topic (the built-in corpus' train words of that
class, `fedlora.data.builtin.class_vocabulary("train")`) inside one of a few frames, sometimes
with a topic-free filler clause. The category of an example is its topic, so the dirichlet and
pathological partitions give clients different topics.

It is meant to be learnable by a tiny causal LM trained from random weights with LoRA alone, on
a CPU, in a few federated rounds: the held-out split uses the same words and frames, in
combinations the train split does not hold (no held-out prompt occurs in training). What it
measures is whether the federation learned to read the instruction and answer in one word and
stop; exact match of greedy generations starts near 0 for a random model.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from fedlora.data.builtin import CLASS_NAMES, class_vocabulary
from fedlora.data.instruct import ALPACA_PROMPT, InstructionExample, InstructionSet

INSTRUCTIONS = (
    "What is the topic of this text?",
    "Name the subject of the following text in one word.",
    "Which section of a newspaper would print this?",
    "Say in one word what this is about.",
    "Classify the text by its topic.",
)
FRAMES = (
    "a story about {m}",
    "the report covers {m}",
    "people keep talking about {m}",
    "today we discuss {m}",
    "a short note on {m}",
    "the column is mostly about {m}",
)
FILLERS = (
    "it came out this morning",
    "the editor liked it",
    "it was shared widely",
    "readers wrote back",
)
NUM_CLASSES = 8
# Words of each topic the texts draw from (the first ones of the corpus' train list): a tiny
# model from random weights must tell them apart by their random embeddings alone.
TERMS_PER_CLASS = 8
# Words of a chat beside the task's own: the roles, and a few for small conversations in tests.
CHAT_WORDS = "system user assistant hello hi thanks please yes no you are a helpful"
# How a word-level tokenizer splits text (tokenizers' Whitespace pre-tokenizer).
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")


@dataclass(frozen=True)
class InstructionTask:
    """The generated task: topic names (category i is CLASS_NAMES[i]), a train and a held-out split."""

    category_names: list[str]
    train: InstructionSet
    test: InstructionSet


def generate_instruction_task(
    seed: int, num_train: int, num_test: int, num_classes: int = NUM_CLASSES, terms_per_class: int = TERMS_PER_CLASS
) -> InstructionTask:
    """The task for `seed`: same seed and sizes, same examples; no held-out prompt occurs in training."""
    names = list(CLASS_NAMES[:num_classes])
    terms = {name: words[:terms_per_class] for name, words in class_vocabulary("train").items()}
    train = _split(random.Random(f"fedlora-instruct/{seed}/train"), names, terms, num_train, exclude=set())
    seen = {(e.instruction, e.input) for e in train.examples}
    test = _split(random.Random(f"fedlora-instruct/{seed}/test"), names, terms, num_test, exclude=seen)
    return InstructionTask(names, train, test)


def _split(
    rng: random.Random, names: list[str], terms: dict[str, tuple[str, ...]], count: int, exclude: set[tuple[str, str]]
) -> InstructionSet:
    categories = [i % len(names) for i in range(count)]  # balanced, in random order
    rng.shuffle(categories)
    examples = []
    for category in categories:
        while True:  # redraw a prompt the other split already holds
            example = _example(rng, names[category], terms[names[category]])
            if (example.instruction, example.input) not in exclude:
                break
        examples.append(example)
    return InstructionSet(examples, categories)


def _example(rng: random.Random, name: str, words: tuple[str, ...]) -> InstructionExample:
    mention = " and ".join(rng.sample(words, rng.choice((1, 2))))
    text = rng.choice(FRAMES).format(m=mention)
    if rng.random() < 0.5:
        filler = rng.choice(FILLERS)
        text = f"{filler}: {text}" if rng.random() < 0.5 else f"{text}; {filler}"
    return InstructionExample(response=name, instruction=rng.choice(INSTRUCTIONS), input=text + ".")


def task_vocabulary() -> list[str]:
    """Every word and punctuation mark the task's prompts and answers can hold, lowercased and sorted.

    The tiny causal models' word-level tokenizer is built from it (fedlora/causal.py): with a few
    hundred tokens instead of a subword tokenizer's tens of thousands, a model trained from
    random weights learns the task on a CPU in minutes.
    """
    words = [*CLASS_NAMES, *INSTRUCTIONS, *FRAMES, *FILLERS, ALPACA_PROMPT, CHAT_WORDS, "and . : ; ,"]
    for split in ("train", "test"):
        words += [term for terms in class_vocabulary(split).values() for term in terms]
    tokens = {token.lower() for text in words for token in WORD_PATTERN.findall(re.sub(r"\{\w*\}", "", text))}
    return sorted(tokens)
