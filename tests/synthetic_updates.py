"""Controlled synthetic rounds for the defences' detection tests: honest updates around a common mean, some attacked.

Honest updates are mu + spread * N(0, 1) around a common mu ~ N(0, 1) (`honest_updates`); with
`groups` > 0 they are non-IID-like: each client's centre is one of `groups` group means, each
mu + N(0, 1), so the honest spread has clusters of its own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedlora.attacks import apply_model_attack, choose_malicious

HONEST_SPREAD = 0.5


def honest_updates(n: int, dim: int, seed: int, spread: float = HONEST_SPREAD, groups: int = 0) -> torch.Tensor:
    """n x dim honest updates (float32), IID around one mean or, with groups, around group means."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(dim, generator=g)
    if groups:
        centres = mu + torch.randn(groups, dim, generator=g)
        return centres[torch.arange(n) % groups] + spread * torch.randn(n, dim, generator=g)
    return mu + spread * torch.randn(n, dim, generator=g)


def attacked_round(
    n: int, dim: int, fraction: float, attack: str, options: Mapping[str, Any], seed: int, groups: int = 0
) -> tuple[torch.Tensor, list[int], list[int]]:
    """n updates of which floor(fraction * n) are attacked: (updates, malicious, honest)."""
    updates = honest_updates(n, dim, seed, groups=groups)
    malicious = choose_malicious(n, fraction, seed)
    honest = [i for i in range(n) if i not in set(malicious)]
    if malicious:
        updates[malicious] = apply_model_attack(attack, updates[honest], updates[malicious], seed, options)
    return updates, malicious, honest
