"""RFA (Pillutla, Kakade and Harchaoui, IEEE TSP 2022): the geometric median of the updates.

The aggregate is the weighted geometric median argmin_v sum_i alpha_i ||v - u_i||, computed as
the paper does by the smoothed Weiszfeld algorithm: from the weighted mean, repeat

    beta_i = alpha_i / max(nu, ||v - u_i||),    v <- sum_i beta_i u_i / sum_i beta_i

The smoothing nu keeps a step finite when v lands on an update. alpha_i are the server's
weights of the clients (declared example shares, capped: `fedlora.roster`), as the paper weighs
by the clients' data sizes. The paper finds a few iterations enough (its default budget is 3):
`strategy.rfa_iterations` sets it; nu is fixed at 1e-6 in runs (an argument of the functions). The objective never increases from one iteration to the
next (Weiszfeld's majorize-minimize step), which the tests check.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.config import StrategyConfig
from strategies.robust import Defence, Screening, check_updates

DEFAULT_ITERATIONS = 3
DEFAULT_NU = 1e-6


def weiszfeld_objective(updates: Tensor, weights: Tensor, point: Tensor) -> float:
    """sum_i alpha_i ||point - u_i|| in float64: what the geometric median minimizes."""
    return float((weights.to(torch.float64) * (updates.to(torch.float64) - point.to(torch.float64)).norm(dim=1)).sum())


def geometric_median(
    updates: Tensor,
    weights: Tensor | Sequence[float] | None = None,
    *,
    iterations: int = DEFAULT_ITERATIONS,
    nu: float = DEFAULT_NU,
) -> Tensor:
    """The smoothed-Weiszfeld geometric median of the n x dim updates (weights: uniform when None)."""
    w = check_updates("rfa", updates, weights)
    if iterations < 1 or not nu > 0:
        raise ValueError(f"rfa: iterations must be >= 1 and nu > 0, got iterations={iterations}, nu={nu}")
    if w.sum() <= 0:
        raise ValueError("rfa: the weights sum to zero")
    work = updates.detach().to(torch.float64)
    alpha = (w / w.sum()).to(work.device)
    v = alpha @ work
    for _ in range(iterations):
        beta = alpha / (work - v).norm(dim=1).clamp_min(nu)
        v = beta @ work / beta.sum()
    return v.to(updates.dtype)


# --- Defence ---
class RFADefence(Defence):
    """The geometric median of all updates replaces their average."""

    name = "rfa"
    description = "RFA (Pillutla et al. 2022): the geometric median of the updates, by smoothed Weiszfeld"
    drops_clients = False

    def __init__(self, phi_max: float = 0.25, iterations: int = DEFAULT_ITERATIONS, nu: float = DEFAULT_NU) -> None:
        super().__init__(phi_max)
        self.iterations = iterations
        self.nu = nu

    @classmethod
    def from_config(cls, config: StrategyConfig) -> RFADefence:
        """The defence with `[strategy]`'s options for it."""
        return cls(config.phi_max, iterations=config.rfa_iterations)

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """Every client kept; the geometric median is the round's update."""
        aggregate = geometric_median(updates, weights, iterations=self.iterations, nu=self.nu)
        return Screening(
            kept=list(range(updates.shape[0])),
            aggregate=aggregate,
            stats={"objective": weiszfeld_objective(updates, weights, aggregate)},
        )
