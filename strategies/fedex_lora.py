"""FedEx-LoRA (Singhal et al., 2024): FedIT's averages plus the exact residual, folded into the frozen weights.

Averaging the factors (B̄ = sum p_k B_k, Ā = sum p_k A_k) misses the cross terms: the residual
dW - B̄ Ā with dW = sum_k p_k B_k A_k. The paper adds the residual, formed densely
(d_out x d_in), to every client's frozen base weights, so that base + B̄ Ā is exactly the
average of the clients' models. Here the residual never exists densely: it is the product of
a stack of the clients' differences (residual_stack), which fedsvd.low_rank re-factorizes,
together with the delta merged in earlier rounds, to its numerical rank (a round's residual
has at most (K - 1) r) as U V, which is what the downlink carries and what clients merge.

Extension beyond the paper (one rank for all): clients of different ranks. A rank-r client is
sent the first r components of the average, and the rest (the tail) is folded into its frozen
weights with the merged residual, so that its model is exactly the global one. Its update is
then its trained factors with the frozen tail appended: every client's effective adapter has
the largest rank, and the aggregation is exact again. (The math below also averages factors of
different ranks by zero padding: a zero column of B_k with a zero row of A_k changes nothing.)
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.lora import LoraState
from strategies.base import LoraStrategy
from strategies.flora import fold, merged_parts, merged_rank, stack
from strategies.gram_svd import work_dtype
from strategies.per_layer import map_layers


def pad_rank(b: Tensor, a: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """B (d_out x r) and A (r x d_in) padded with zero columns / rows to `rank` (the product is unchanged)."""
    extra = rank - b.shape[1]
    if extra < 0:
        raise ValueError(f"pad_rank: rank {b.shape[1]} is above the target {rank}")
    if extra == 0:
        return b, a
    return torch.nn.functional.pad(b, (0, extra)), torch.nn.functional.pad(a, (0, 0, 0, extra))


def residual_stack(
    bs: list[Tensor], as_: list[Tensor], weights: Tensor, scale: float = 1.0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(B̄, Ā, U, V): FedIT's averages at the largest client rank (smaller ones zero-padded), in
    float64, and the residual times `scale` as a stack in gram_svd.work_dtype,
    U V = scale (sum_k p_k B_k A_k - B̄ Ā).

    With the weights summing to 1, that residual is sum_{k<K} p_k (B_k - B_K)(A_k - Ā): U holds
    the B_k - B_K, V the scale p_k (A_k - Ā) (inner rank (K - 1) r). Differences, not the
    clients' factors themselves: when clients differ by e, the residual is ~e^2 of the factors'
    product, and a stack of the factors would leave it to cancellation (which the Gram
    re-factorization of float32 factors, ~1e-7 of ||U|| ||V||, could not resolve); identical
    clients give U = 0.
    """
    top = max(b.shape[1] for b in bs)
    padded = [pad_rank(b, a, top) for b, a in zip(bs, as_)]
    b_mean = _mean([b for b, _ in padded], weights)
    a_mean = _mean([a for _, a in padded], weights)
    dtype = work_dtype(*bs, *as_)
    if len(padded) == 1:  # one client: its product is the average's
        return b_mean, a_mean, b_mean[:, :0].to(dtype), a_mean[:0].to(dtype)
    b_last = padded[-1][0]
    u, v = stack([b - b_last for b, _ in padded[:-1]], [(a - a_mean).to(dtype) for _, a in padded[:-1]], weights[:-1] * scale)
    return b_mean, a_mean, u, v


def _mean(tensors: list[Tensor], weights: Tensor) -> Tensor:
    """sum_k w_k T_k accumulated in float64 (the residual's identity holds to its rounding)."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights.tolist()):
        total.add_(tensor, alpha=weight)
    return total


# --- Flower strategy ---
class FedExLoRA(LoraStrategy):
    """Clients train A and B from the averages on the merged base; the server folds the exact residual into it.

    The global state holds Ā, B̄ and the merged delta M (U, V: every round's residual so far, at
    its numerical rank), which clients fold into their frozen weights before training; it is
    counted in the downlink bytes. Products are aggregated in the global scaling's units.
    """

    name = "fedex_lora"
    description = "FedEx-LoRA: FedIT's averages plus the exact residual, in factored form, merged into the frozen weights"
    trains = "AB"
    mixed_ranks = True

    def client_state(self, client_id: int) -> LoraState | None:
        """A client below the global rank: the first r components, the tail folded into its merged delta."""
        gain = self.rank_gain(client_id)
        if gain == 1.0:
            return None
        rank, top_scaling = self.rank_of(client_id), self.scaling(self.global_rank())
        state = self.global_state.at_rank(rank, gain)
        for layer, parts in self.global_state.factors.items():
            tail = (parts["B"][:, rank:] * top_scaling, parts["A"][rank:])
            state.factors[layer] = merged_parts(
                state.factors[layer], fold(parts.get("U"), parts.get("V"), *tail), parts["A"].dtype
            )
        return state

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """B̄, Ā of the clients' effective adapters; M <- M + s (dW - B̄ Ā), exact."""
        top = self.global_rank()
        top_scaling = self.scaling(top)

        def merged(layer: str) -> dict[str, Tensor]:
            parts = global_state.factors[layer]
            bs, as_ = [], []
            for update in updates:
                b, a = self._effective_adapter(update.factors[layer], parts)
                bs.append(b)
                as_.append(a)
            # The residual's stack and the merged delta re-factorized together: one pass.
            b_mean, a_mean, u, v = residual_stack(bs, as_, weights, top_scaling)
            delta = fold(parts.get("U"), parts.get("V"), u, v)
            dtype = parts["A"].dtype
            return merged_parts({"A": a_mean.to(dtype), "B": b_mean.to(dtype)}, delta, dtype)

        factors = map_layers(merged, global_state.factors)
        self.last_round.extra["merged_rank_max"] = max(merged_rank(parts) for parts in factors.values())
        return LoraState(factors=factors)

    def _effective_adapter(self, trained: dict[str, Tensor], parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """A client's factors in the global scaling's units, then the frozen tail of a rank-r client."""
        b, a = trained["B"], trained["A"]
        rank = b.shape[1]
        if rank == self.global_rank():
            return b, a
        root = (self.scaling(rank) / self.scaling(self.global_rank())) ** 0.5
        return torch.cat([b * root, parts["B"][:, rank:]], dim=1), torch.cat([a * root, parts["A"][rank:]], dim=0)
