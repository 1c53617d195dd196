"""Aggregation strategies, one module each, registered by name.

`STRATEGIES` maps a config's `strategy.name` to its class, `DEFENCES` its `strategy.robust` to
a robust rule; `build_strategy` makes the strategy, with its defence, from an experiment config.
To add a strategy: write a module with a `LoraStrategy` subclass and list it below (a defence:
a `Defence` subclass). Without changing the package: name an outside class by import path
("package.module:Class") or as an entry point of an installed package (fedlora/plugins.py,
docs/extending.md); built-in names win.
"""

from __future__ import annotations

from fedlora.config import ConfigError, ExperimentConfig, StrategyConfig
from fedlora.plugins import PluginError, plugin_class
from fedlora.roster import Roster
from strategies.base import LoraStrategy
from strategies.bucketing import BucketingDefence, bucket_phi
from strategies.bulyan import BulyanDefence
from strategies.centered_clipping import CenteredClippingDefence
from strategies.fed_sb import FedSB
from strategies.fedex_lora import FedExLoRA
from strategies.fedit import FedIT
from strategies.fedsa_lora import FedSALoRA
from strategies.fedsvd import FedSVD
from strategies.ffa_lora import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.krum import KrumDefence, MultiKrumDefence
from strategies.lora_a2 import LoraA2
from strategies.lora_fair import LoraFair
from strategies.median import MedianDefence
from strategies.ravan import Ravan
from strategies.rfa import RFADefence
from strategies.robust import Defence
from strategies.rolora import RoLoRA
from strategies.trimmed_mean import TrimmedMeanDefence
from strategies.zprobe import ZProbeDefence
from strategies.zprobe_refined import ZProbeRefinedDefence

STRATEGIES: dict[str, type[LoraStrategy]] = {
    cls.name: cls
    for cls in (FedIT, FFALoRA, FedSVD, LoraFair, FLoRA, FlexLoRA, FedExLoRA, FedSALoRA, RoLoRA, LoraA2, FedSB, Ravan)
}
NO_DEFENCE = "none"
DEFENCES: dict[str, type[Defence]] = {
    cls.name: cls
    for cls in (
        ZProbeDefence,
        ZProbeRefinedDefence,
        KrumDefence,
        MultiKrumDefence,
        BulyanDefence,
        MedianDefence,
        TrimmedMeanDefence,
        CenteredClippingDefence,
        RFADefence,
    )
}


def strategy_class(name: str) -> type[LoraStrategy]:
    """The registered class for a name; a ConfigError listing the names otherwise."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    found = outside_class("strategy.name", name, LoraStrategy)
    if found is None:
        raise ConfigError(f"strategy.name: unknown strategy {name!r} (known: {', '.join(STRATEGIES)}; {OUTSIDE})")
    return found


def defence_class(name: str) -> type[Defence] | None:
    """The registered defence for a name (None for "none"); a ConfigError listing the names otherwise."""
    if name == NO_DEFENCE:
        return None
    if name in DEFENCES:
        return DEFENCES[name]
    found = outside_class("strategy.robust", name, Defence)
    if found is None:
        known = ", ".join([NO_DEFENCE, *DEFENCES])
        raise ConfigError(f"strategy.robust: unknown defence {name!r} (known: {known}; {OUTSIDE})")
    return found


# What an unknown name's message says besides the built-in names.
OUTSIDE = "or an outside class as package.module:Class, or an installed entry point: docs/extending.md"


def outside_class(key: str, name: str, base: type) -> type | None:
    """A strategy or defence from outside the package (fedlora/plugins.py); None for an unknown name."""
    try:
        return plugin_class(key, name, base)
    except PluginError as err:
        raise ConfigError(str(err)) from None


def build_strategy(config: ExperimentConfig, roster: Roster) -> LoraStrategy:
    """The strategy an experiment config names, behind its defence, for the handshake's roster."""
    strategy = strategy_class(config.strategy.name).from_config(config, roster)
    strategy.defence = build_defence(config.strategy)
    return strategy


def build_defence(config: StrategyConfig) -> Defence | None:
    """The defence `strategy.robust` names, with its options, behind bucketing when `bucket_size` > 1."""
    defence_type = defence_class(config.robust)
    if defence_type is None:
        return None
    if config.bucket_size == 1:
        return defence_type.from_config(config)
    # The rule screens bucket means, of which a larger share may hold an attacker.
    inner_config = config.model_copy(update={"phi_max": bucket_phi(config.phi_max, config.bucket_size)})
    return BucketingDefence(defence_type.from_config(inner_config), config.bucket_size, config.phi_max)


def describe() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered strategy."""
    return [(name, cls.description) for name, cls in STRATEGIES.items()]


def describe_defences() -> list[tuple[str, str]]:
    """(name, one-line description) of every registered defence."""
    return [(name, cls.description) for name, cls in DEFENCES.items()]
