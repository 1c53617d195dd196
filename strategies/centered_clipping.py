"""Centered clipping (Karimireddy, He and Jaggi, ICML 2021): clip every update around a centre, iterate.

Starting from a centre v (the last round's aggregate), each iteration moves v by the mean of
the updates' differences from v, each difference clipped to norm tau:

    v <- v + (1/n) sum_i clip(u_i - v, tau),    clip(x, tau) = x * min(1, tau / ||x||)

An attacker far from v moves it by at most tau / n an iteration, however large its update. The
mean counts clients, not examples (as the median does: example counts are self-reported).
One iteration by default, as in the authors' reference code (epfml's `Clipping(tau, n_iter=1)`);
tau has no default there: ours is 10, in the units of the flattened update, so set it for the
task (the honest updates' norms).

The centre carries over between rounds (the paper's "learning from history"), one centre per
kind of update (RoLoRA's A rounds and B rounds each keep their own), and only from rounds whose
state was installed (`settle`). It restarts at zero for an update of another length and when a
run resumes from a checkpoint (the centre is not checkpointed).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fedlora.config import StrategyConfig
from strategies.robust import Defence, Screening, check_updates

DEFAULT_TAU = 10.0
DEFAULT_ITERATIONS = 1


def clip_to_norm(rows: Tensor, tau: float) -> Tensor:
    """Each row scaled down to norm tau where longer (float64 in, float64 out)."""
    norms = rows.norm(dim=1, keepdim=True)
    return rows * torch.clamp(tau / norms.clamp_min(torch.finfo(rows.dtype).tiny), max=1.0)


def centered_clipping(
    updates: Tensor,
    weights: Tensor | Sequence[float] | None = None,
    *,
    center: Tensor | None = None,
    tau: float = DEFAULT_TAU,
    iterations: int = DEFAULT_ITERATIONS,
) -> Tensor:
    """The centred-clipping aggregate of the n x dim updates, from `center` (zeros when None).

    `weights` is checked, not used (see the module docstring). The result has the input's dtype.
    """
    check_updates("centered_clipping", updates, weights)
    if not tau > 0 or iterations < 1:
        raise ValueError(f"centered_clipping: tau must be > 0 and iterations >= 1, got tau={tau}, iterations={iterations}")
    work = updates.detach().to(torch.float64)
    v = torch.zeros(work.shape[1], dtype=torch.float64) if center is None else center.detach().to(torch.float64).cpu()
    if v.shape != (work.shape[1],):
        raise ValueError(f"centered_clipping: the centre has shape {tuple(v.shape)}, the updates {work.shape[1]} coordinates")
    v = v.to(work.device)
    for _ in range(iterations):
        v = v + clip_to_norm(work - v, tau).mean(dim=0)
    return v.to(updates.dtype)


# --- Defence ---
class CenteredClippingDefence(Defence):
    """Centered clipping from the last round's aggregate; every client kept, the clipped centre aggregated."""

    name = "centered_clipping"
    description = "centered clipping (Karimireddy et al. 2021): iterated clipping of the updates around the last aggregate"
    drops_clients = False

    def __init__(self, phi_max: float = 0.25, tau: float = DEFAULT_TAU, iterations: int = DEFAULT_ITERATIONS) -> None:
        super().__init__(phi_max)
        self.tau = tau
        self.iterations = iterations
        self.centers: dict[str, Tensor] = {}  # the last installed aggregate, by the factors trained
        self.trained = ""
        self.pending: Tensor | None = None  # this round's aggregate, until the round is settled

    @classmethod
    def from_config(cls, config: StrategyConfig) -> CenteredClippingDefence:
        """The defence with `[strategy]`'s options for it."""
        return cls(config.phi_max, tau=config.cc_tau, iterations=config.cc_iterations)

    @property
    def center(self) -> Tensor | None:
        """The centre the next round of the current kind starts from (None: zeros)."""
        return self.centers.get(self.trained)

    def begin_round(self, trained: str) -> None:
        """Screen this round from the centre of its kind of update."""
        self.trained = trained
        self.pending = None

    def settle(self, installed: bool) -> None:
        """The round's aggregate becomes its kind's centre only if the round's state was installed."""
        if installed and self.pending is not None:
            self.centers[self.trained] = self.pending
        self.pending = None

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """All clients kept; the centre after the iterations is the round's update."""
        center = self.center if self.center is not None and self.center.shape == updates.shape[1:] else None
        aggregate = centered_clipping(updates, weights, center=center, tau=self.tau, iterations=self.iterations)
        self.pending = aggregate.detach().to(torch.float64).cpu()
        clipped = int(((updates.to(torch.float64) - aggregate.to(torch.float64)).norm(dim=1) > self.tau).sum())
        return Screening(
            kept=list(range(updates.shape[0])),
            aggregate=aggregate,
            stats={"tau": self.tau, "clipped_at_end": clipped, "restarted": int(center is None)},
        )
