"""The adaptive attack against zprobe on synthetic rounds: how far 12 of 50 coordinated attackers go, and whether they pass.

Not a timing: a measurement strategies/zprobe.py's docstring quotes (its "Limits"). For each seed,
the adversary searches the largest displacement gamma along p = -mean that zprobe accepts when it
simulates the round with its own seed (fedlora.attacks.adaptive, defence_accepts); the server then
screens the attacked round with its own seed. Printed per seed: the displacement
||vector - mean|| / ||mean||, how many attackers and honest clients the server kept.

    python -m tests.benchmarks.adaptive_zprobe [--seeds 10] [--dim 2000]
"""

from __future__ import annotations

import argparse

import torch

from fedlora.attacks import adaptive, choose_malicious, defence_accepts
from strategies.zprobe import ZProbeDefence
from tests.synthetic_updates import honest_updates

CLIENTS = 50
FRACTION = 0.25
ADVERSARY_SEED = 1000  # the adversary cannot know the server's seed: it simulates with its own


def one_round(seed: int, dim: int, groups: int) -> tuple[float, int, int]:
    """(displacement / ||honest mean||, attackers kept, honest kept) of one attacked round."""
    updates = honest_updates(CLIENTS, dim, seed, groups=groups)
    malicious = choose_malicious(CLIENTS, FRACTION, seed)
    honest = [i for i in range(CLIENTS) if i not in set(malicious)]
    defence = ZProbeDefence(FRACTION)
    weights = torch.full((CLIENTS,), 1.0 / CLIENTS)
    accepts = defence_accepts(defence, updates, malicious, weights, seed=ADVERSARY_SEED + seed)
    vector = adaptive(updates[honest], updates[malicious], accepts=accepts)[0]
    mean = updates[honest].mean(dim=0)
    updates[malicious] = vector
    kept = set(defence.screen(updates, weights, seed=seed).kept)
    return float((vector - mean).norm() / mean.norm()), len(kept & set(malicious)), len(kept & set(honest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--dim", type=int, default=2000)
    args = parser.parse_args()
    for groups, label in ((0, "IID"), (4, "four non-IID groups")):
        rounds = [one_round(seed, args.dim, groups) for seed in range(args.seeds)]
        through = sum(1 for _, attackers, _ in rounds if attackers)
        displacements = [d for d, _, _ in rounds]
        print(
            f"{label}: displacement {min(displacements):.1f}-{max(displacements):.1f} x the honest mean; "
            f"the whole group kept in {through} of {len(rounds)} rounds"
        )
        for seed, (displacement, attackers, kept) in enumerate(rounds):
            print(f"  seed {seed}: displacement {displacement:8.2f}, attackers kept {attackers:2d}, honest kept {kept:2d}")


if __name__ == "__main__":
    main()
