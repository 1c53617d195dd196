"""Krum and Multi-Krum (Blanchard et al., NeurIPS 2017): keep the updates closest to their neighbours.

Math only (the Flower wiring lives elsewhere). Each client's score is the sum of squared
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

from collections.abc import Sequence

import torch
from torch import Tensor


def _check_updates(name: str, updates: Tensor, weights: Tensor | Sequence[float] | None) -> Tensor:
    """Validated float64 weights (ones when None) for an n x dim float tensor of updates."""
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


def krum_scores(updates: Tensor, num_malicious: int) -> Tensor:
    """Each client's Krum score (float64): the sum of squared distances to its n - f - 2 nearest other updates."""
    n = updates.shape[0]
    if num_malicious < 0 or n < 2 * num_malicious + 3:
        raise ValueError(f"krum: needs n >= 2 f + 3 clients, got n = {n} with f = {num_malicious}; lower f or sample more clients")
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
    w = _check_updates("krum", updates, weights)
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
