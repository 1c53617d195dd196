"""RoLoRA (Chen et al., 2025): alternate rounds train and average B only, then A only.

When every client trains one factor against the other, broadcast and frozen, the average of
the trained factor is the exact average of the products: sum p_k B_k A = (sum p_k B_k) A, and
sum p_k B A_k = B (sum p_k A_k). Odd rounds train B (peft starts B at zero, where A's gradient
B^T dL/dW vanishes, so B must go first), even rounds A; which one travels in the train config.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from torch import Tensor

from fedlora.lora import LoraState
from strategies.base import LoraStrategy, weighted_sum


def factor_of_round(server_round: int) -> str:
    """The factor clients train in a round: "B" in odd rounds (the first), "A" in even ones."""
    return "B" if server_round % 2 == 1 else "A"


def rolora_aggregate(shared: Tensor, trained: list[Tensor], weights: Tensor, part: str) -> tuple[Tensor, Tensor]:
    """(B, A) after a round that trained `part` against the broadcast other factor `shared`."""
    mean = weighted_sum(trained, weights)
    return (mean, shared) if part == "B" else (shared, mean)


# --- Flower strategy ---
class RoLoRA(LoraStrategy):
    """Odd rounds clients train B against the broadcast A, even rounds A against B; the server averages the one trained.

    Under user-level DP (fedlora/user_privacy.py) the round's factor's change (and the head's,
    when trained) is clipped and noised; the other factor is the broadcast one, unchanged.
    """

    name = "rolora"
    description = "RoLoRA: rounds alternate training and averaging B only, then A only; each round's average is exact"
    trains = "B"  # in odd rounds; configure_train sets the round's factor
    trains_label = "B, A alternately"
    user_level_dp = "the change of the round's factor (and the head); the other factor is the broadcast one"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The train message names the round's factor (the reply is checked against it)."""
        self.trains = factor_of_round(server_round)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """The trained factor averaged, the other as broadcast."""
        part = self.trains
        other = "A" if part == "B" else "B"
        factors = {}
        for layer, parts in global_state.factors.items():
            b, a = rolora_aggregate(parts[other], [u.factors[layer][part] for u in updates], weights, part)
            factors[layer] = {"A": a, "B": b}
        return LoraState(factors=factors)
