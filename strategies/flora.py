"""FLoRA (Wang et al., 2024): aggregation by stacking, exact for any mix of client ranks.

Client k's update is the product B_k A_k (d_out x r_k times r_k x d_in). Stacking the factors
side by side, B = [B_1, ..., B_K] (d_out x R) and A = [p_1 A_1; ...; p_K A_K] (R x d_in) with
R = sum_k r_k, gives B A = sum_k p_k B_k A_k exactly: no cross terms, whatever the ranks. As in
the paper, the stack is merged into every client's frozen base weights and each round starts
a fresh LoRA; what the downlink carries grows with the stack (R (d_out + d_in) values a layer).
FlexLoRA and FedEx-LoRA start from this same stack and re-factorize it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.lora import LoraState
from fedlora.seeds import derive_seed
from strategies.base import LoraStrategy
from strategies.fedsvd import low_rank
from strategies.ffa_lora import shared_a
from strategies.gram_svd import work_dtype
from strategies.per_layer import map_layers


def stack(bs: list[Tensor], as_: list[Tensor], weights: Tensor) -> tuple[Tensor, Tensor]:
    """([B_k] side by side, [p_k A_k] on top of each other): their product is sum_k p_k B_k A_k.

    In float64 when the factors are (then every re-factorization of the stack is exact to
    ~1e-15), else in float32: clients' float32 factors are re-factorized from float64 Grams to
    ~1e-7, their own precision (fedsvd.product_svd). Ranks may differ between clients; raises
    ValueError when a client's B and A do not pair or the layers' shapes differ.
    """
    if not bs or len(bs) != len(as_) or len(bs) != len(weights):
        raise ValueError(f"stack: {len(bs)} B factors, {len(as_)} A factors and {len(weights)} weights")
    for b, a in zip(bs, as_):
        if (
            b.ndim != 2
            or a.ndim != 2
            or b.shape[1] != a.shape[0]
            or b.shape[0] != bs[0].shape[0]
            or a.shape[1] != as_[0].shape[1]
        ):
            raise ValueError(f"stack: B {tuple(b.shape)} and A {tuple(a.shape)} are not a factor pair of the layer")
    dtype = work_dtype(*bs, *as_)
    b_stack = torch.cat([b.to(dtype) for b in bs], dim=1)
    a_stack = torch.cat([a.to(dtype) for a in as_], dim=0)
    # The weights on A's rows, each client's a contiguous block (on B's columns, a strided
    # pass over the whole stack, it takes several times as long).
    for rows, weight in zip(a_stack.split([b.shape[1] for b in bs]), weights.tolist()):
        rows.mul_(weight)
    return b_stack, a_stack


def stack_bytes(bs: list[Tensor], as_: list[Tensor]) -> int:
    """Bytes of the stacked adapter in the clients' dtype (what one client downloads per layer)."""
    return sum(t.numel() * t.element_size() for t in (*bs, *as_))


def fold(merged_u: Tensor | None, merged_v: Tensor | None, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor] | None:
    """The base-weight delta M + u v (M = merged_u merged_v, or none yet) as factors of its
    numerical rank (fedsvd.low_rank), in gram_svd.work_dtype; None when that delta is zero. Stateless
    clients get the whole delta every round, so it is kept as small as it exactly is (at most
    min(d_out, d_in) ranks)."""
    if merged_u is not None:
        dtype = work_dtype(merged_u, merged_v, u, v)
        u = torch.cat([merged_u.to(dtype), u.to(dtype)], dim=1)
        v = torch.cat([merged_v.to(dtype), v.to(dtype)])
    if u.shape[1] == 0:
        return None
    u, v = low_rank(u, v)
    return (u, v) if u.shape[1] else None


def merged_rank(parts: dict[str, Tensor]) -> int:
    """The rank of a layer's merged delta (0 when there is none)."""
    return parts["U"].shape[1] if "U" in parts else 0


def merged_parts(parts: dict[str, Tensor], delta: tuple[Tensor, Tensor] | None, dtype: torch.dtype) -> dict[str, Tensor]:
    """A layer's factors A, B with the delta's U, V (none when it is zero), in `dtype`."""
    out = {"A": parts["A"], "B": parts["B"]}
    if delta is not None:
        out["U"], out["V"] = delta[0].to(dtype), delta[1].to(dtype)
    return out


# --- Flower strategy ---
class FLoRA(LoraStrategy):
    """Clients train a fresh LoRA at their own ranks on the merged base; the server stacks and merges.

    Where the paper's clients keep their merged weights and download each round's stack, these
    clients are stateless (a simulation reuses one model for many clients): the server keeps the
    whole merged delta, re-factorized exactly to its numerical rank, and sends it every round.
    The history records both: bytes_down what was sent, `stack_bytes` the paper's downlink.
    """

    name = "flora"
    description = "FLoRA: clients train a fresh LoRA at their own ranks; the stacked sum of products merged into the base"
    trains = "AB"
    mixed_ranks = True

    def client_state(self, client_id: int) -> LoraState | None:
        """A client below the global rank gets the fresh adapter at its rank (B = 0: the gain is moot)."""
        rank = self.rank_of(client_id)
        return None if self.rank_gain(client_id) == 1.0 else self.global_state.at_rank(rank)

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """M <- M + sum_k p_k s_k B_k A_k (exact); next round: a fresh seeded A, B = 0."""

        def merged(layer: str) -> dict[str, Tensor]:
            parts = global_state.factors[layer]
            bs = [u.factors[layer]["B"] for u in updates]
            as_ = [u.factors[layer]["A"] for u in updates]
            scalings = torch.tensor([self.scaling(b.shape[1]) for b in bs], dtype=weights.dtype)
            delta = fold(parts.get("U"), parts.get("V"), *stack(bs, as_, weights * scalings))
            rank, d_in = parts["A"].shape
            fresh = {"A": shared_a(derive_seed(self.seed, "flora", self.server_round), layer, rank, d_in, parts["A"].dtype)}
            fresh["B"] = torch.zeros_like(parts["B"])
            return merged_parts(fresh, delta, parts["A"].dtype)

        factors = map_layers(merged, global_state.factors)
        stacked = sum(
            stack_bytes([u.factors[layer]["B"] for u in updates], [u.factors[layer]["A"] for u in updates]) for layer in factors
        )
        self.last_round.extra["stack_bytes"] = stacked * len(updates)  # every client downloads the whole stack
        self.last_round.extra["merged_rank_max"] = max(merged_rank(parts) for parts in factors.values())
        return LoraState(factors=factors)
