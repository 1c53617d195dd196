"""Bucketing (Karimireddy, He and Jaggi, ICLR 2022): average random buckets of s updates, then a robust rule.

Each round the updates are shuffled (seeded by the round), cut into ceil(n / s) buckets of s
consecutive updates (the last may be smaller), and each bucket is replaced by its plain mean.
Any robust rule then screens the bucket means. Averaging first shrinks the honest updates'
spread (non-IID data) by about sqrt(s), so rules built for IID updates work again; with
at most a fraction phi of attackers, at most a fraction s * phi of buckets hold one.

A bucket mixes clients, so the rule's verdict is on buckets, not clients: the round's update is
the rule's statistic (median, RFA, ...) or the plain mean of the bucket means it keeps (Krum,
zPROBE, ...), and no client is marked dropped. The inner rule's own bound on attackers
becomes min(s * phi_max, just under 1/2) of the buckets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from strategies.robust import Defence, Screening, check_updates

MAX_FRACTION = 0.49  # a robust rule's phi_max must stay below 1/2


def bucket_phi(phi_max: float, bucket_size: int) -> float:
    """The bound on the fraction of bucket means an attacker touches: s * phi_max, kept below 1/2."""
    return min(bucket_size * phi_max, MAX_FRACTION)


def bucket_assignment(n: int, bucket_size: int, seed: int) -> list[list[int]]:
    """The seeded random partition of range(n) into buckets of bucket_size (the last may be smaller)."""
    if n < 1 or bucket_size < 1:
        raise ValueError(f"bucketing: needs n >= 1 and bucket_size >= 1, got n={n}, bucket_size={bucket_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[start : start + bucket_size] for start in range(0, n, bucket_size)]


def bucket_means(updates: Tensor, buckets: Sequence[Sequence[int]]) -> Tensor:
    """The plain (unweighted) mean of each bucket's updates, one row a bucket, in float64."""
    work = updates.detach().to(torch.float64)
    return torch.stack([work[list(bucket)].mean(dim=0) for bucket in buckets])


# --- Defence ---
class BucketingDefence(Defence):
    """Bucketing in front of another defence (`strategy.bucket_size` > 1 with any `strategy.robust`)."""

    name = "bucketing"
    description = "bucketing (Karimireddy et al. 2022): random buckets of s updates averaged, then the robust rule"
    drops_clients = False

    def __init__(self, inner: Defence, bucket_size: int, phi_max: float) -> None:
        """`inner` screens the bucket means, so it must be built for a bound of `bucket_phi(phi_max, s)`."""
        if bucket_size < 2:
            raise ValueError(f"bucketing: bucket_size must be at least 2, got {bucket_size}")
        if inner.phi_max != bucket_phi(phi_max, bucket_size):
            raise ValueError(f"bucketing: the inner rule must assume phi_max = {bucket_phi(phi_max, bucket_size)}")
        super().__init__(phi_max)
        self.inner = inner
        self.name = f"bucketing+{inner.name}"  # what the history records: the wrapper and its rule
        self.bucket_size = bucket_size
        self.min_clients = (inner.min_clients - 1) * bucket_size + 1  # enough updates for the inner rule's buckets

    def begin_round(self, trained: str) -> None:
        """Passed on to the inner rule."""
        self.inner.begin_round(trained)

    def settle(self, installed: bool) -> None:
        """Passed on to the inner rule."""
        self.inner.settle(installed)

    def screen(self, updates: Tensor, weights: Tensor, seed: int) -> Screening:
        """Every client kept; the inner rule's result over the bucket means is the round's update."""
        check_updates("bucketing", updates, weights)
        buckets = bucket_assignment(updates.shape[0], self.bucket_size, seed)
        means = bucket_means(updates, buckets)
        inner = self.inner.screen(means, torch.full((len(buckets),), 1 / len(buckets), dtype=torch.float64), seed)
        stats = {"buckets": len(buckets), "buckets_kept": len(inner.kept), **{f"inner_{k}": v for k, v in inner.stats.items()}}
        if inner.aggregate is None and not inner.kept:  # the inner rule kept no bucket: no update this round
            return Screening(kept=[], stats=stats)
        aggregate = inner.aggregate if inner.aggregate is not None else means[inner.kept].mean(dim=0)
        return Screening(kept=list(range(updates.shape[0])), aggregate=aggregate.to(updates.dtype), stats=stats)
