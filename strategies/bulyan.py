"""Bulyan (El Mhamdi, Guerraoui and Rouault, ICML 2018): Krum chooses a set, a trimmed mean around its median aggregates it.

With n updates and f attackers assumed (n >= 4 f + 3):
1. selection: Krum runs theta = n - 2 f times, each time on the updates not yet chosen, and its
   choice joins the selection set. Krum's score here is the sum of squared distances to the
   max(1, n' - f - 2) nearest other updates among the n' remaining ones;
2. aggregation: per coordinate, the beta = theta - 2 f values of the selection set closest to
   the coordinate-wise median of the set are averaged (unweighted).

The recursion and the max(1, ...) neighbour count follow Flower's
`flwr.server.strategy.aggregate.aggregate_bulyan` (with `aggregate_krum` as its rule), which the
tests check this against on the same inputs. A tensor version rather than Flower's function:
Flower's returns only the aggregate, not which clients it selected (we record whom Bulyan
dropped), recomputes the distance matrix with a Python double loop at each of the theta
selections, and finds each chosen update again by comparing it with every remaining one. Here
the squared distances are computed once, in float64 (one `torch.cdist`), and each selection
looks them up; score ties go to the lower client index, as numpy's argmin in Flower's Krum.

`weights` is accepted for a uniform signature, checked, and not used: the statistic counts
clients, as Flower's does (example counts are self-reported).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from strategies.robust import Defence, Screening, check_updates


def bulyan_selection(updates: Tensor, num_malicious: int) -> list[int]:
    """The theta = n - 2 f clients recursive Krum selects, in the order it selects them."""
    n, f = updates.shape[0], num_malicious
    if f < 0 or n < 4 * f + 3:
        raise ValueError(f"bulyan: needs n >= 4 f + 3 clients, got n = {n} with f = {f}; lower f or sample more clients")
    work = updates.detach().to(torch.float64)
    squared = torch.cdist(work, work, compute_mode="donot_use_mm_for_euclid_dist") ** 2
    squared.fill_diagonal_(float("inf"))  # a client is not its own neighbour
    remaining, selected = list(range(n)), []
    for _ in range(n - 2 * f):
        among = squared[remaining][:, remaining]
        neighbours = max(1, len(remaining) - f - 2)
        scores = among.sort(dim=1).values[:, :neighbours].sum(dim=1)
        best = remaining[int(torch.argsort(scores, stable=True)[0])]
        selected.append(best)
        remaining.remove(best)
    return selected


def closest_to_median_mean(selection: Tensor, beta: int) -> Tensor:
    """Per coordinate, the mean of the beta values closest to the coordinate-wise median (numpy's median)."""
    work = selection.to(torch.float64)
    ordered = work.sort(dim=0).values
    count = work.shape[0]
    median = 0.5 * (ordered[(count - 1) // 2] + ordered[count // 2])
    nearest = (work - median).abs().argsort(dim=0, stable=True)[:beta]
    return work.gather(0, nearest).mean(dim=0)


def bulyan(
    updates: Tensor, weights: Tensor | Sequence[float] | None = None, *, num_malicious: int
) -> tuple[Tensor, list[int], list[int]]:
    """Bulyan over n x dim updates: (aggregate in the input's dtype, sorted selected clients, the others)."""
    check_updates("bulyan", updates, weights)
    n, f = updates.shape[0], num_malicious
    selected = bulyan_selection(updates, f)
    aggregate = closest_to_median_mean(updates[selected], beta=n - 4 * f)
    kept = set(selected)
    return aggregate.to(updates.dtype), sorted(kept), [i for i in range(n) if i not in kept]


# --- Defence ---
class BulyanDefence(Defence):
    """Bulyan with f = floor(phi_max n), capped so that n >= 4 f + 3 (the cap is recorded)."""

    name = "bulyan"
    description = "Bulyan: recursive Krum picks n - 2f updates, then a mean of the n - 4f closest to their median"
    min_clients = 7  # the smallest round where Bulyan can assume one attacker (4 f + 3 with f = 1)

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """The selected clients kept; the trimmed mean around their median is the round's update."""
        n = updates.shape[0]
        wanted = math.floor(self.phi_max * n)
        f = min(wanted, (n - 3) // 4)
        aggregate, selected, _ = bulyan(updates, weights, num_malicious=f)
        return Screening(kept=selected, aggregate=aggregate, stats={"assumed_malicious": f, "phi_max_malicious": wanted})
