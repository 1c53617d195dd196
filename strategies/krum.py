"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017): keep the updates closest to their neighbours.

Each client's score is the sum of squared
Euclidean distances to its n - f - 2 nearest other updates, f being the number of attackers
assumed; Krum returns the update with the lowest score, Multi-Krum the weighted average of the
`keep` lowest. The guarantee needs n >= 2 f + 3.

A tensor version rather than Flower's `flwr.server.strategy.aggregate.aggregate_krum`: that one
returns only the aggregated parameters, not which clients it kept (we must record flagged
clients), fills the distance matrix with a Python double loop over numpy copies, and breaks
score ties by numpy's unstable argsort. Here ties go to the lower client index, distances are
computed in float64 in one `torch.cdist` call, and the result has the input's dtype and device.
On the same inputs (without ties) it returns what Flower's function returns; the tests check it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from strategies.robust import Defence, Screening, check_updates

if TYPE_CHECKING:
    from fedlora.config import StrategyConfig


def krum_scores(updates: Tensor, num_malicious: int) -> Tensor:
    """Each client's Krum score (float64): the sum of squared distances to its n - f - 2 nearest other updates."""
    n = updates.shape[0]
    if num_malicious < 0 or n < 2 * num_malicious + 3:
        raise ValueError(
            f"krum: needs n >= 2 f + 3 clients, got n = {n} with f = {num_malicious}; lower f or sample more clients"
        )
    work = updates.detach().to(torch.float64)
    # The mm-based formula loses digits when updates are close together; the direct one does not.
    squared = torch.cdist(work, work, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    squared.fill_diagonal_(float("inf"))  # a client is not its own neighbour
    nearest = squared.sort(dim=1).values[:, : n - num_malicious - 2]
    return nearest.sum(dim=1)


def krum(
    updates: Tensor, weights: Tensor | Sequence[float] | None = None, *, num_malicious: int, keep: int = 1
) -> tuple[Tensor, list[int], list[int]]:
    """Krum (keep = 1) or Multi-Krum (keep > 1) over n x dim updates.

    Returns (aggregate, selected, dropped): the selected update (Krum) or the average of the
    `keep` selected ones weighted by `weights` (Multi-Krum; uniform when None), and the sorted
    indices of the selected and of the other clients. num_malicious is f, the attackers assumed.
    """
    w = check_updates("krum", updates, weights)
    n = updates.shape[0]
    if not 1 <= keep <= n:
        raise ValueError(f"krum: keep must be in [1, {n}], got {keep}")
    scores = krum_scores(updates, num_malicious)
    order = torch.argsort(scores, stable=True)  # ties: lower client index first
    selected = sorted(order[:keep].tolist())
    chosen = w[selected]
    if keep == 1:
        aggregate = updates[selected[0]].clone()
    else:
        if chosen.sum() <= 0:
            raise ValueError("krum: the selected clients' weights sum to zero")
        p = (chosen / chosen.sum()).to(updates.device)
        aggregate = (p[:, None] * updates[selected].to(torch.float64)).sum(dim=0).to(updates.dtype)
    dropped = [i for i in range(n) if i not in set(selected)]
    return aggregate, selected, dropped


# --- Defence ---
class KrumDefence(Defence):
    """Krum: keep the one update with the lowest score (f = floor(phi_max n), capped so n >= 2 f + 3)."""

    name = "krum"
    description = "Krum: keep the single update closest to its n - f - 2 nearest neighbours"
    min_clients = 3  # a score needs n - f - 2 >= 1 neighbours

    def keep(self, n: int, f: int) -> int:
        """How many updates survive: one for Krum."""
        return 1

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """The selected clients; the strategy averages them (one client: its update as is)."""
        n = updates.shape[0]
        f = min(math.floor(self.phi_max * n), (n - 3) // 2)
        _, selected, _ = krum(updates, weights, num_malicious=f, keep=self.keep(n, f))
        return Screening(kept=selected, stats={"assumed_malicious": f})


class MultiKrumDefence(KrumDefence):
    """Multi-Krum: keep the n - f updates with the lowest Krum scores; the strategy averages them
    plainly, as Blanchard et al. define it (`strategy.multikrum_mean = "plain"`), or by the clients'
    example weights ("examples")."""

    name = "multikrum"
    description = "Multi-Krum: keep the n - f updates with the lowest Krum scores, average them (plain mean)"

    def __init__(self, phi_max: float = 0.25, plain_mean: bool = True) -> None:
        super().__init__(phi_max)
        self.plain_mean = plain_mean

    @classmethod
    def from_config(cls, config: StrategyConfig) -> MultiKrumDefence:
        """The defence with `[strategy]`'s choice of mean."""
        return cls(config.phi_max, plain_mean=config.multikrum_mean == "plain")

    def keep(self, n: int, f: int) -> int:
        """n - f updates survive."""
        return n - f

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """Krum's selection, the kept updates to be weighed equally unless example weights are asked for."""
        screening = super().screen(updates, weights, seed)
        screening.equal_weights = self.plain_mean
        return screening
