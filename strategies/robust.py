"""Robust aggregation: a defence screens the round's updates before the strategy aggregates them.

Any LoRA strategy can run behind a defence (`strategy.robust` in the config). A defence sees each
valid reply as an *update*: the client's change of the factors it trained (and of the head),
flattened into one vector, in the same order for every client. It answers with a `Screening`:

- `kept`: the clients whose updates the strategy may use (filters such as zPROBE and Krum drop
  the others, and the round records whom);
- `aggregate`: for rules that compute a robust statistic rather than choose clients
  (coordinate-wise median, trimmed mean), the update they produce. The strategy then
  aggregates that one update as if a single client had sent it, so that e.g. FedSVD still
  re-factorizes and FFA-LoRA still keeps A fixed.

Each rule's math lives in its own module (zprobe.py, krum.py, median.py, trimmed_mean.py,
centered_clipping.py, rfa.py; bucketing.py wraps any of them), its
`Defence` class below the math; `strategies.DEFENCES` registers them by name. A round with
fewer valid replies than a defence needs (`min_clients`) fails closed: nothing is kept and the
round is skipped, since unscreened updates are what a defence exists to stop.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fedlora.config import StrategyConfig


@dataclass
class Screening:
    """A defence's verdict on one round: indices into the round's updates, and its statistics."""

    kept: list[int]
    aggregate: Tensor | None = None
    stats: dict[str, float | int] = field(default_factory=dict)
    equal_weights: bool = False  # the strategy weighs the kept updates equally (Multi-Krum's plain mean)


class Defence(ABC):
    """A robust rule over the n x dim matrix of a round's updates.

    Parameters
    ----------
    phi_max : float
        The defence's upper bound on the fraction of attackers among a round's replies.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    min_clients: ClassVar[int] = 1  # fewer updates than this cannot be screened
    drops_clients: ClassVar[bool] = True  # False for rules that compute a statistic instead (no detection to score)

    def __init__(self, phi_max: float = 0.25) -> None:
        if not 0.0 <= phi_max < 0.5:
            raise ValueError(f"phi_max must be in [0, 0.5), got {phi_max}")
        self.phi_max = phi_max

    @classmethod
    def from_config(cls, config: StrategyConfig) -> Defence:
        """The defence with the options `[strategy]` sets (phi_max; a rule's own keys where it has some)."""
        return cls(config.phi_max)

    def begin_round(self, trained: str) -> None:
        """Told before `screen` which factors the round's updates are of ("AB", "A", "B"): a rule with
        memory across rounds keeps it per kind of update (RoLoRA alternates A and B rounds)."""
        return  # no memory by default

    def settle(self, installed: bool) -> None:
        """Told after `screen` whether the round's new state was installed: a rule with memory
        commits what it learnt from a round only if the round counted."""
        return  # no memory by default

    @abstractmethod
    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """Screen the n x dim `updates` (weights: the clients' example shares; seed: this round's)."""


def check_updates(name: str, updates: Tensor, weights: Tensor | Sequence[float] | None) -> Tensor:
    """Validated float64 weights (ones when None) for an n x dim float tensor of finite updates."""
    if updates.ndim != 2 or updates.shape[0] == 0 or not updates.is_floating_point():
        raise ValueError(
            f"{name}: updates must be a non-empty 2-D float tensor (clients x dim), got {updates.dtype} {tuple(updates.shape)}"
        )
    if not torch.isfinite(updates).all():
        raise ValueError(f"{name}: updates hold NaN or Inf; validate replies before aggregating")
    n = updates.shape[0]
    w = torch.ones(n, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).cpu()
    if w.shape != (n,) or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(f"{name}: weights must be {n} finite non-negative numbers, got {weights!r}")
    return w
