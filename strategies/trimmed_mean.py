"""Coordinate-wise trimmed mean (Yin et al., ICML 2018): per coordinate, drop the extremes, average the rest.

Math only (the Flower wiring lives elsewhere). With n clients and fraction beta, each
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


def trimmed_mean(
    updates: Tensor, weights: Tensor | Sequence[float] | None = None, *, beta: float
) -> tuple[Tensor, list[int], list[int]]:
    """(per-coordinate beta-trimmed mean of the n x dim updates, all indices kept, none dropped)."""
    _check_updates("trimmed_mean", updates, weights)
    if not (math.isfinite(beta) and 0.0 <= beta < 0.5):
        raise ValueError(f"trimmed_mean: beta must be in [0, 0.5), got {beta}")
    arrays = updates.detach().to(torch.float64).cpu().numpy()
    (mean,) = aggregate_trimmed_avg([([row], 1) for row in arrays], proportiontocut=beta)
    aggregate = torch.from_numpy(mean).to(dtype=updates.dtype, device=updates.device)
    return aggregate, list(range(updates.shape[0])), []
