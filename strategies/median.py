"""Coordinate-wise median (Yin et al., ICML 2018): each coordinate of the aggregate is the median of the clients'.

Math only (the Flower wiring lives elsewhere). Calls Flower's own
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


def _check_updates(name: str, updates: Tensor, weights: Tensor | Sequence[float] | None) -> None:
    """Raise ValueError unless updates is a finite n x dim float tensor and weights (if any) n non-negative numbers."""
    if updates.ndim != 2 or updates.shape[0] == 0 or not updates.is_floating_point():
        raise ValueError(
            f"{name}: updates must be a non-empty 2-D float tensor (clients x dim), got {updates.dtype} {tuple(updates.shape)}"
        )
    if not torch.isfinite(updates).all():
        raise ValueError(f"{name}: updates hold NaN or Inf; validate replies before aggregating")
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64).cpu()
        if w.shape != (updates.shape[0],) or not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError(f"{name}: weights must be {updates.shape[0]} finite non-negative numbers, got {weights!r}")


def coordinate_median(updates: Tensor, weights: Tensor | Sequence[float] | None = None) -> tuple[Tensor, list[int], list[int]]:
    """(per-coordinate median of the n x dim updates, all indices kept, none dropped)."""
    _check_updates("median", updates, weights)
    arrays = updates.detach().to(torch.float64).cpu().numpy()
    (median,) = aggregate_median([([row], 1) for row in arrays])
    aggregate = torch.from_numpy(median).to(dtype=updates.dtype, device=updates.device)
    return aggregate, list(range(updates.shape[0])), []
