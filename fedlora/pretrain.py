"""A tiny base that has learned something: the from-scratch tier's pretraining (`model.tiny.pretrain_steps`).

LoRA adapts what a base model already knows. A tiny BERT from random weights knows nothing, and
LoRA on it does not learn at all (measured: train loss stays at ln 8 on the built-in corpus with
LoRA on every linear layer; masked-language pretraining on the corpus' texts did not help either,
because it never trains the [CLS] state the classifier reads). So the tiny base is pretrained the
way real bases are, on data outside the federation: the whole model is trained, centrally, on a
public labelled split of the built-in corpus (`fedlora.data.builtin.public_split`: its own random
stream, the train topic words and frames, no negations or side remarks, clean labels). Its head is
then dropped and the federation starts from a fresh one, as it does on MiniLM.

The weights are a function of the tiny architecture, max_length, the public split (its texts and
labels are hashed into the key), the tokenizer's vocabulary, the step count and the seed, so
each is trained once and cached on disk (FEDLORA_CACHE, default ~/.cache/fedlora); a file lock
makes the server and the client processes of one run wait for the first of them instead of each
training its own copy. (Machines of a deployment each train their own: the same on machines
whose CPUs compute alike; copy the cache folder to be sure.)
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from logging import INFO
from pathlib import Path

import torch
from flwr.common.logger import log
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerBase

from fedlora.data.builtin import TextExamples, public_split

LEARNING_RATE = 1e-3  # Adam: measured to train the tiny base to about 0.97 in 100-150 steps
BATCH_SIZE = 64
# Bump when the pretraining recipe changes, so that old cached weights are never reused.
RECIPE_VERSION = 1
CACHE_VARIABLE = "FEDLORA_CACHE"


@dataclass(frozen=True)
class PretrainPlan:
    """How long, on how much public data and on how many of its topics (`[model.tiny]`)."""

    steps: int
    examples: int
    topics: int


def pretrained_encoder(
    architecture: BertConfig, tokenizer: PreTrainedTokenizerBase, plan: PretrainPlan, max_length: int, seed: int
) -> dict[str, torch.Tensor]:
    """The encoder weights (`bert.*`, no head) of the tiny base pretrained as `plan` says."""
    public = public_split(seed, plan.examples, plan.topics)
    recipe = {
        "architecture": {k: v for k, v in architecture.to_dict().items() if k not in ("num_labels", "id2label", "label2id")},
        "steps": plan.steps,
        "topics": plan.topics,
        "max_length": max_length,
        "seed": seed,
        "version": RECIPE_VERSION,
        # What the weights also depend on, so that a change of the corpus generator or the
        # tokenizer is a new entry rather than a stale one.
        "public": hashlib.sha256(json.dumps([public.texts, public.labels]).encode()).hexdigest(),
        "vocabulary": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
    }
    key = hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_dir() / f"tiny-base-{key}.pt"
    cached = _read(path)  # without the lock: a filled cache may be read-only
    if cached is not None:
        return cached
    with _locked(path.with_suffix(".lock")):
        cached = _read(path)  # another process may have trained it while this one waited
        if cached is None:
            _write(path, _pretrain(architecture, tokenizer, plan, public, max_length, seed))
    return torch.load(path, weights_only=True)


def _read(path: Path) -> dict[str, torch.Tensor] | None:
    """The cached weights, or None if there are none; a damaged file is removed (and so retrained)."""
    if not path.exists():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # truncated or damaged in any way: train again
        log(INFO, "the cached tiny base %s is damaged: training it again", path)
        path.unlink(missing_ok=True)
        return None


def _write(path: Path, encoder: dict[str, torch.Tensor]) -> None:
    """Written beside its name, flushed to disk, then renamed: a reader never sees half a file."""
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        with partial.open("wb") as handle:
            torch.save(encoder, handle)
            handle.flush()
            os.fsync(handle.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def cache_dir() -> Path:
    """Where pretrained tiny bases are kept (created on first use)."""
    folder = Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "fedlora")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _pretrain(
    architecture: BertConfig,
    tokenizer: PreTrainedTokenizerBase,
    plan: PretrainPlan,
    public: TextExamples,
    max_length: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    steps, examples = plan.steps, plan.examples
    encoded = tokenizer(public.texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    labels = torch.tensor(public.labels)
    started = time.monotonic()
    log(
        INFO,
        "pretraining the tiny base (seed %d): %d steps on %d public examples of %d topics, cached for later runs",
        seed,
        steps,
        examples,
        plan.topics,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        public_architecture = copy.deepcopy(architecture)
        public_architecture.num_labels = plan.topics
        model = BertForSequenceClassification(public_architecture)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        for step in range(1, steps + 1):
            batch = torch.randint(0, examples, (BATCH_SIZE,))
            loss = model(
                input_ids=encoded["input_ids"][batch], attention_mask=encoded["attention_mask"][batch], labels=labels[batch]
            ).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % 50 == 0 or step == steps:
                log(INFO, "pretraining step %d/%d: loss %.3f (%.0f s)", step, steps, loss.item(), time.monotonic() - started)
    return {name: tensor.detach().clone() for name, tensor in model.bert.state_dict().items()}
