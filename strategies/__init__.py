"""Aggregation strategies, one module each, registered by name.

`STRATEGIES` maps a config's `strategy.name` to its class; `build_strategy` makes one from an
experiment config. To add a strategy: write a module with a `LoraStrategy` subclass and list it
below.
"""

from __future__ import annotations

from fedlora.config import ConfigError, ExperimentConfig
from strategies.base import LoraStrategy
from strategies.fedit import FedIT
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALoRA
from strategies.lora_fair import LoraFair

STRATEGIES: dict[str, type[LoraStrategy]] = {cls.name: cls for cls in (FedIT, FFALoRA, FedSVD, LoraFair)}


def strategy_class(name: str) -> type[LoraStrategy]:
    """The registered class for a name; a ConfigError listing the names otherwise."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"strategy.name: unknown strategy {name!r} (known: {', '.join(STRATEGIES)})") from None


def build_strategy(config: ExperimentConfig, clients: dict[int, int]) -> LoraStrategy:
    """The strategy an experiment config names, for the given connected clients."""
    cls = strategy_class(config.strategy.name)
    return cls.from_config(config, clients)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered strategy."""
    return [(name, cls.description) for name, cls in STRATEGIES.items()]
