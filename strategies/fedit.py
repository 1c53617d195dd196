"""FedIT: the baseline. Average A and B separately, weighted by examples.

Inexact by construction: sum_k p_k B_k A_k != (sum_k p_k B_k)(sum_k p_k A_k) once clients
disagree, which is what FFA-LoRA, FedSVD and LoRA-FAIR each repair in their own way.
"""

from __future__ import annotations

import torch

from fedlora.lora import LoraState
from strategies.base import LoraStrategy, weighted_sum


def average_factors(updates: list[LoraState], weights: torch.Tensor, parts: str = "AB") -> LoraState:
    """Per layer, the example-weighted mean of each factor part the updates carry."""
    layers = updates[0].factors
    return LoraState(
        factors={
            layer: {part: weighted_sum([u.factors[layer][part] for u in updates], weights) for part in parts} for layer in layers
        }
    )


# --- Flower strategy ---
class FedIT(LoraStrategy):
    """Clients train A and B; the server averages each factor separately.

    Under user-level DP (fedlora/user_privacy.py) each client's changes of A and B (and of the
    head, when trained) are clipped together, as one vector, and the noise covers both factors;
    the noised mean change of A and of B is the new A and B.
    """

    name = "fedit"
    description = "baseline: clients train A and B, the server averages each separately"
    trains = "AB"
    user_level_dp = "the changes of A and B (and the head), clipped together as one vector; both noised"

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor) -> LoraState:
        """A <- sum p_k A_k, B <- sum p_k B_k."""
        return average_factors(updates, weights)
