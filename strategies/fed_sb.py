"""Fed-SB (Singhal et al., 2025, arXiv 2502.15436): clients train only an r x r matrix R between frozen B and A.

Built on LoRA-SB: a layer adds s B R A (s = alpha / r), with B (d_out x r) and A (r x d_in) fixed
once by the server and identical on every client, and R trained. Averaging R is exact, since
B and A are shared: B (sum_k p_k R_k) A = sum_k p_k B R_k A. The uplink is R alone, r^2 values a
layer whatever the number of clients; the downlink is the whole state (B, A and R, as FFA-LoRA's
broadcasts its frozen A): clients keep nothing between rounds here.

Initialization, and how it departs from the paper. LoRA-SB sets B and A from the truncated SVD
U_r S_r V_r^T of the first full-weight update, -lr sign(G) with G the gradient summed over about
170 examples: B = U_r, A = V_r^T and R = S_r, so that the first step of full fine-tuning is
pre-applied and R trains in the subspaces that step found. That needs the gradient of every full
weight on training data, which the server does not hold (and under DP would spend privacy). Here
B and A are seeded random orthonormal bases, drawn from (run seed, layer): B's columns and A's
rows orthonormal, so that R -> B R A preserves norms; and R starts at zero, so that the adapter
starts as the base model. Random subspaces catch less of the gradient than the paper's, so expect
slower progress than the paper reports at the same rank. One rank for every client (the paper's
heterogeneous-rank variant is not offered).

DP: Opacus clips each example's gradient of R (with the head's, when the head trains) jointly to
max_grad_norm and adds Gaussian noise to their sum; B and A are frozen, so neither clipped nor
noised. With r^2 trained values a layer instead of r (d_in + d_out), the same noise multiplier
puts noise on fewer coordinates: the noise's norm in the update is smaller. Defences screen the
flattened R of the replies (and the head), like any other trained factor.
"""

from __future__ import annotations

import torch

from fedlora.config import ConfigError
from fedlora.lora import LoraState
from fedlora.lora_core import CORE, SCALES
from fedlora.seeds import derive_seed
from strategies.base import LoraStrategy, weighted_sum


def orthonormal_rows(seed: int, purpose: str, layer: str, rows: int, cols: int) -> torch.Tensor:
    """A rows x cols float64 matrix with orthonormal rows (rows <= cols), seeded from (seed, purpose, layer)."""
    generator = torch.Generator().manual_seed(derive_seed(seed, purpose, layer))
    gaussian = torch.randn(cols, rows, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).T  # signs fixed: the draw, not the QR routine, decides


def frozen_bases(
    seed: int, layer: str, d_out: int, d_in: int, rank: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) of one layer: B's columns and A's rows orthonormal, seeded per layer; raises ValueError
    where the rank exceeds a side of the layer (no such basis exists)."""
    if rank > min(d_out, d_in):
        raise ValueError(f"layer {layer} is {d_out} x {d_in}: no {rank} orthonormal directions on both sides")
    b = orthonormal_rows(seed, "core-b", layer, rank, d_out).T
    a = orthonormal_rows(seed, "core-a", layer, rank, d_in)
    return b.to(dtype), a.to(dtype)


def average_cores(cores: list[torch.Tensor], weights: torch.Tensor, scales: list[torch.Tensor] | None = None) -> torch.Tensor:
    """sum_k p_k s^k_i H^k_i per head i (s = 1 without scales): the core whose product with the
    shared B and A is the weighted mean of the clients' products, exactly."""
    if scales is not None:
        cores = [core * s.to(core.dtype)[:, None, None] for core, s in zip(cores, scales)]
    return weighted_sum(cores, weights)


def cored_initial_state(state: LoraState, seed: int, heads: int, scaled: bool) -> LoraState:
    """Round 0 of a core strategy: seeded orthonormal B and A at the state's rank, a zero core of
    `heads` heads (and scalars at 1 when `scaled`); raises ConfigError where the rank does not fit."""
    factors = {}
    for layer, parts in state.factors.items():
        rank, d_in = parts["A"].shape
        d_out = parts["B"].shape[0]
        try:
            b, a = frozen_bases(seed, layer, d_out, d_in, rank, parts["A"].dtype)
        except ValueError as err:
            raise ConfigError(f"model.lora_rank: {err}; lower the rank") from None
        factors[layer] = {"A": a, "B": b, CORE: torch.zeros(heads, rank // heads, rank // heads, dtype=parts["A"].dtype)}
        if scaled:
            factors[layer][SCALES] = torch.ones(heads, dtype=parts["A"].dtype)
    return LoraState(factors=factors, head=dict(state.head))


# --- Flower strategy ---
class FedSB(LoraStrategy):
    """Clients train the r x r core R between the server's frozen B and A; the server averages R."""

    name = "fed_sb"
    description = "Fed-SB: B and A frozen by the server, clients train and send an r x r core R; exact averaging"
    trains = CORE
    trains_label = "R (r x r core)"

    def initial_state(self, state: LoraState) -> LoraState:
        """Seeded orthonormal B and A, and R = 0 (see the module docstring for the paper's LoRA-SB start)."""
        return cored_initial_state(state, self.seed, heads=1, scaled=False)

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor) -> LoraState:
        """B and A stay; R <- sum_k p_k R_k."""
        return LoraState(
            factors={
                layer: {**parts, CORE: average_cores([u.factors[layer][CORE] for u in updates], weights)}
                for layer, parts in global_state.factors.items()
            }
        )
