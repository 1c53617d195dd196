"""Coordinate-wise median (Yin et al., ICML 2018): each coordinate of the aggregate is the median of the clients'.

Calls Flower's own
`flwr.server.strategy.aggregate.aggregate_median` (numpy.median per coordinate: the mean of the
two middle values for an even count), which fits as is: the update goes in as a one-layer
parameter list, in float64 so that any torch dtype converts to numpy; the result comes back in
the input's dtype and device.

The statistic counts clients, not examples: `weights` is accepted so that every robust rule
has the same signature, and checked, but not used (example counts are self-reported, and
weighting by them would let one attacker claiming many examples move the median).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flwr.server.strategy.aggregate import aggregate_median
from torch import Tensor

from strategies.robust import Defence, Screening, check_updates


def coordinate_median(updates: Tensor, weights: Tensor | Sequence[float] | None = None) -> tuple[Tensor, list[int], list[int]]:
    """(per-coordinate median of the n x dim updates, all indices kept, none dropped)."""
    check_updates("median", updates, weights)
    arrays = updates.detach().to(torch.float64).cpu().numpy()
    (median,) = aggregate_median([([row], 1) for row in arrays])
    aggregate = torch.from_numpy(median).to(dtype=updates.dtype, device=updates.device)
    return aggregate, list(range(updates.shape[0])), []


# --- Defence ---
class MedianDefence(Defence):
    """The coordinate-wise median of all updates replaces their average."""

    name = "median"
    description = "coordinate-wise median of the updates"
    drops_clients = False

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """Every client kept; the median is the round's update."""
        aggregate, kept, _ = coordinate_median(updates, weights)
        return Screening(kept=kept, aggregate=aggregate)
