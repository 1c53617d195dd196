"""RAVAN (Raje et al., NeurIPS 2025, arXiv 2506.05568): a sum of h LoRA heads s_i B_i H_i A_i, only H_i and s_i trained.

A layer adds s sum_i s_i B_i H_i A_i (s = alpha / r), with h heads of rank q = r / h: B_i
(d_out x q) and A_i (q x d_in) frozen, identical on every client; the cores H_i (q x q) and the
scalars s_i trained. Side by side the heads are one adapter of rank r with a block-diagonal core,
B blockdiag(s_1 H_1, ..., s_h H_h) A (B = [B_1 ... B_h], A = [A_1; ...; A_h]): h q^2 + h trained
values a layer where one r x r core (Fed-SB) trains r^2, and an update of rank up to r.

What the server averages. Averaging H_i and s_i separately is not exact (the mean of products is
not the product of means), so the server averages the products: H_i <- sum_k p_k s^k_i H^k_i, and
broadcasts s_i = 1; then sum_i B_i H_i A_i = sum_k p_k sum_i s^k_i B_i H^k_i A_i, the mean of the
clients' updates, exactly. Clients start every round from s_i = 1 and learn which heads to
amplify within the round. The paper's clients upload the products s_i H_i themselves; ours send
H_i and s_i as trained (h more values a layer) and the server forms the products. The server
folds the scalars in before any averaging, so a defence screens the raw (H_i, s_i) of each reply,
and its robust statistic is folded like one client's.

Initialization: B and A are seeded random orthonormal bases (strategies/fed_sb.py): all h q
directions of the heads mutually orthogonal, so that the heads span distinct subspaces and the
sum can reach rank r; H_i start at zero (the adapter starts as the base model) and s_i at 1. The
paper compares several initializations in an ablation that could not be read from the sources at
hand; this is the start used here, not necessarily the paper's default. Clients train every head
(the paper's head subsets for weaker clients are not offered).

DP: Opacus clips each example's gradient of all H_i and s_i (with the head's, when the head
trains) jointly to max_grad_norm and noises their sum; B_i and A_i are frozen, neither clipped
nor noised.
"""

from __future__ import annotations

import torch

from fedlora.config import ConfigError, StrategyConfig
from fedlora.lora import LoraState
from fedlora.lora_core import CORE, SCALES
from strategies.base import LoraStrategy
from strategies.fed_sb import average_cores, cored_initial_state


def ravan_aggregate(
    cores: list[torch.Tensor], scales: list[torch.Tensor], weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, s) to broadcast: H_i = sum_k p_k s^k_i H^k_i and s_i = 1, whose heads sum to the clients' mean update."""
    return average_cores(cores, weights, scales), torch.ones_like(scales[0])


# --- Flower strategy ---
class Ravan(LoraStrategy):
    """Clients train h heads' cores H_i and scalars s_i between frozen bases; the server averages the products s_i H_i."""

    name = "ravan"
    description = "RAVAN: h heads s_i B_i H_i A_i, bases frozen, clients train H_i and s_i; the server averages s_i H_i, exact"
    trains = CORE + SCALES
    trains_label = "H_i, s_i (RS)"

    def __init__(self, *args: object, heads: int = 2, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.heads = heads

    @classmethod
    def options(cls, config: StrategyConfig) -> dict[str, object]:
        """The number of heads."""
        return {"heads": config.ravan_heads}

    def initial_state(self, state: LoraState) -> LoraState:
        """Seeded orthonormal bases, zero cores, scalars at 1."""
        rank = next(iter(state.factors.values()))["A"].shape[0]
        if rank % self.heads:
            raise ConfigError(f"strategy.ravan_heads: {self.heads} heads do not divide the adapter's rank {rank}")
        return cored_initial_state(state, self.seed, self.heads, scaled=True)

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor) -> LoraState:
        """Bases stay; H_i <- sum_k p_k s^k_i H^k_i, s_i <- 1."""
        factors = {}
        for layer, parts in global_state.factors.items():
            core, scales = ravan_aggregate(
                [u.factors[layer][CORE] for u in updates], [u.factors[layer][SCALES] for u in updates], weights
            )
            factors[layer] = {**parts, CORE: core, SCALES: scales}
        return LoraState(factors=factors)
