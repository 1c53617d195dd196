"""Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the extremes, average the rest.

With n clients and fraction beta, each
coordinate drops its floor(beta * n) smallest and floor(beta * n) largest values and averages
the others; beta must lie in [0, 0.5). This is exactly Flower's
`flwr.server.strategy.aggregate.aggregate_trimmed_avg` (scipy's trim_mean rule), which is
called here: the update goes in as a one-layer parameter list, in float64 so that any torch
dtype converts to numpy, and the result comes back in the input's dtype and device.

Which values are trimmed differs per coordinate, so no client as a whole is dropped: the
dropped list is empty. `weights` is accepted for a uniform signature, checked, and not used
(robust statistics count clients; example counts are self-reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from flwr.server.strategy.aggregate import aggregate_trimmed_avg
from torch import Tensor

from strategies.robust import Defence, Screening, check_updates


def trimmed_mean(
    updates: Tensor, weights: Tensor | Sequence[float] | None = None, *, beta: float
) -> tuple[Tensor, list[int], list[int]]:
    """(per-coordinate beta-trimmed mean of the n x dim updates, all indices kept, none dropped)."""
    check_updates("trimmed_mean", updates, weights)
    if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    arrays = updates.detach().to(torch.float64).cpu().numpy()
    (mean,) = aggregate_trimmed_avg([([row], 1) for row in arrays], proportiontocut=beta)
    aggregate = torch.from_numpy(mean).to(dtype=updates.dtype, device=updates.device)
    return aggregate, list(range(updates.shape[0])), []


# --- Defence ---
class TrimmedMeanDefence(Defence):
    """The coordinate-wise mean without the phi_max fraction of extremes at each end."""

    name = "trimmed_mean"
    description = "coordinate-wise mean after cutting a phi_max fraction at each end"
    drops_clients = False

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """Every client kept; the trimmed mean is the round's update."""
        aggregate, kept, _ = trimmed_mean(updates, weights, beta=self.phi_max)
        return Screening(kept=kept, aggregate=aggregate, stats={"trimmed_each_end": math.floor(self.phi_max * updates.shape[0])})
