"""FFA-LoRA: freeze A, federate B only.

A is drawn once from the run's seed, identical on every client, and never trained nor sent
back; B starts at zero and is the only trained factor. Since every client multiplies by the
same A, averaging B is exact: (sum_k p_k B_k) A = sum_k p_k (B_k A). The uplink carries B only,
half of FedIT's for square layers. Clients report a digest of the A they trained with, and a
reply whose digest differs from the broadcast A is refused (it was trained on another model).
"""

from __future__ import annotations

import math

import torch

from fedlora.lora import LoraState
from fedlora.seeds import derive_seed
from strategies.base import ClientUpdate, LoraStrategy, weighted_sum


def shared_a(seed: int, layer: str, rank: int, d_in: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The frozen A of one layer: uniform(+-1/sqrt(d_in)) as peft draws it, seeded per layer."""
    generator = torch.Generator().manual_seed(derive_seed(seed, "ffa-lora", layer))
    bound = 1.0 / math.sqrt(d_in)
    return (torch.rand(rank, d_in, generator=generator, dtype=torch.float64) * 2 - 1).mul_(bound).to(dtype)


def aggregate_b(bs: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """B <- sum_k p_k B_k (exact for the product, since A is shared)."""
    return weighted_sum(bs, weights)


# --- Flower strategy ---
class FFALoRA(LoraStrategy):
    """Clients train B only against a seeded, frozen A; the server averages B.

    Under user-level DP (fedlora/user_privacy.py) only B's change (and the head's, when trained)
    is clipped and noised: A never leaves the seed, so it needs no noise.
    """

    name = "ffa_lora"
    description = "FFA-LoRA: A frozen from the seed, clients train and send B only; exact averaging"
    trains = "B"
    user_level_dp = "the change of B (and the head); A is fixed by the seed and never noised"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self._digest, self._digest_of = "", None  # the broadcast A's digest, and the state it is of

    def initial_state(self, state: LoraState) -> LoraState:
        """Replace A by the seeded shared A and start B at zero."""
        factors = {}
        for layer, parts in state.factors.items():
            rank, d_in = parts["A"].shape
            factors[layer] = {
                "A": shared_a(self.seed, layer, rank, d_in, parts["A"].dtype),
                "B": torch.zeros_like(parts["B"]),
            }
        return LoraState(factors=factors, head=dict(state.head))

    def check_update(self, update: ClientUpdate) -> str | None:
        """Refuse a reply trained against another A."""
        expected = self._broadcast_digest()
        if update.info.get("a-digest") != expected:
            return f"a-digest mismatch: trained with A {update.info.get('a-digest', 'missing')[:12]}, broadcast {expected[:12]}"
        return None

    def _broadcast_digest(self) -> str:
        """The digest of the broadcast A, hashed once a round rather than once a reply."""
        if self._digest_of is not self.global_state:
            self._digest, self._digest_of = self.global_state.digest("A"), self.global_state
        return self._digest

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor) -> LoraState:
        """A stays; B <- sum p_k B_k."""
        return LoraState(
            factors={
                layer: {"A": parts["A"], "B": aggregate_b([u.factors[layer]["B"] for u in updates], weights)}
                for layer, parts in global_state.factors.items()
            }
        )
