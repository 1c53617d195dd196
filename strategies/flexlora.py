"""FlexLoRA (Bai et al., 2024): the weighted sum of the clients' products, truncated by SVD per client rank.

Clients may train different ranks r_k. The server wants the best rank-r_k approximation of
dW = sum_k p_k B_k A_k for each client (Eckart-Young: its top-r_k singular triplets). The paper
(and HetLoRA-style peers) form dW densely (d_out x d_in) and take its SVD. Here dW is never
formed: FLoRA's stack (strategies/flora.py) has inner rank R = sum_k r_k, and fedsvd.product_svd
gives dW's SVD from it in O((d_out + d_in) R^2): exact to ~1e-15 for float64 factors, to ~1e-7
(from float64 Gram matrices) for the float32 factors clients send. Each client gets U_r sqrt(S_r) and sqrt(S_r) V_r^T
(the balanced split, so neither factor dwarfs the other), and the Frobenius norm of what the
truncation dropped is recorded.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from fedlora.lora import LoraState
from strategies.base import LoraStrategy
from strategies.fedsvd import numerical_rank, product_svd
from strategies.flora import stack
from strategies.per_layer import map_layers


@dataclass(frozen=True)
class Truncated:
    """dW's top-r factors (B: d_out x r, A: r x d_in) and what truncating to r dropped."""

    B: Tensor
    A: Tensor
    error: float  # ||dW - B A||_F: the norm of the dropped singular values
    relative_error: float  # error / ||dW||_F (0 when dW is 0)


def top_factors(u: Tensor, s: Tensor, vh: Tensor, r: int, kept: int) -> tuple[Tensor, Tensor]:
    """The balanced rank-r factors of U S V^T: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, in U's and V^T's dtype.

    Components beyond `kept` (the numerical rank) come back as LoRA's own initialization: a zero
    column of B with a unit row of A, which adds nothing to the product yet keeps both trainable
    (a zero row of A would leave it dead). When r exceeds the m = len(s) components of the SVD
    (fewer stacked ranks than r, e.g. a round whose clients all have smaller ranks), the extra
    rows of A complete V^T's rows to an orthonormal set; only rows beyond d_in stay zero.
    """
    m = min(r, s.shape[0])
    root = torch.where(torch.arange(m) < kept, s[:m].sqrt(), torch.zeros_like(s[:m]))
    b = torch.zeros(u.shape[0], r, dtype=u.dtype)
    a = torch.zeros(r, vh.shape[1], dtype=vh.dtype)
    b[:, :m] = u[:, :m] * root
    a[:m] = vh[:m] * torch.where(root > 0, root, torch.ones_like(root))[:, None]
    extra = min(r, vh.shape[1]) - m
    if extra > 0:
        a[m : m + extra] = orthonormal_complement(vh[:m], extra)
    return b, a


def orthonormal_complement(rows: Tensor, count: int) -> Tensor:
    """`count` unit rows orthogonal to each other and to the orthonormal `rows` (count + len(rows) <= width).

    A fixed-seed Gaussian block projected off the rows' span and orthonormalized by QR: the same
    completion every round, and well conditioned (a random block is almost surely independent).
    """
    generator = torch.Generator().manual_seed(0)
    block = torch.randn(rows.shape[1], count, generator=generator, dtype=rows.dtype)
    block -= rows.T @ (rows @ block)
    block -= rows.T @ (rows @ block)  # twice is enough (Kahan): rounding leaves no component in the span
    return torch.linalg.qr(block)[0].T


def flexlora_aggregate(bs: list[Tensor], as_: list[Tensor], weights: Tensor, ranks: Iterable[int]) -> dict[int, Truncated]:
    """For each rank r asked for, dW = sum_k p_k B_k A_k's best rank-r factors, in the clients' dtype.

    Client ranks may differ (bs[k] is d_out x r_k); the ranks asked for need not be theirs.
    """
    ranks = sorted(set(ranks))
    b_stack, a_stack = stack(bs, as_, weights)
    u, s, vh = product_svd(b_stack, a_stack, top=ranks[-1])  # every singular value, the vectors asked for
    total = float(s.square().sum().sqrt())
    scale = float(torch.linalg.matrix_norm(b_stack) * torch.linalg.matrix_norm(a_stack))
    kept = numerical_rank(s, scale, max(b_stack.shape[0], a_stack.shape[1], b_stack.shape[1]))
    dtype = bs[0].dtype
    out = {}
    for r in ranks:
        b, a = top_factors(u, s, vh, r, kept)
        error = float(s[r:].square().sum().sqrt())
        out[r] = Truncated(b.to(dtype), a.to(dtype), error, error / total if total > 0 else 0.0)
    return out


# --- Flower strategy ---
class FlexLoRA(LoraStrategy):
    """Clients train A and B at their own ranks; the server re-factorizes the sum of their products.

    Products are aggregated as the layers apply them, (alpha / r_k) B_k A_k, so that clients of
    different ranks add up in the same units. The global state holds the top r_max components
    (r_max: the largest client rank); a rank-r client is sent its top r, rescaled to its own
    alpha / r (`rank_gain`). Each round records the truncation error at every client rank.
    """

    name = "flexlora"
    description = "FlexLoRA: clients train A, B at their own ranks; the sum of products re-factorized, top-r_k per client"
    trains = "AB"
    mixed_ranks = True

    def client_state(self, client_id: int) -> LoraState | None:
        """A client below the global rank gets the top components at its rank."""
        gain = self.rank_gain(client_id)
        return None if gain == 1.0 else self.global_state.at_rank(self.rank_of(client_id), gain)

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """Per layer, sum_k p_k s_k B_k A_k's top r_max factors at the global scaling; truncation errors recorded."""
        top = self.global_rank()
        ranks = sorted(set(self.client_ranks.values()) if self.client_ranks else {top})

        def layer_result(layer: str) -> dict[int, Truncated]:
            bs = [u.factors[layer]["B"] for u in updates]
            as_ = [u.factors[layer]["A"] for u in updates]
            # Products in units of the global scaling: a rank-r_k client's weight times s_k / s_top.
            gains = torch.tensor([self.scaling(b.shape[1]) / self.scaling(top) for b in bs], dtype=weights.dtype)
            return flexlora_aggregate(bs, as_, weights * gains, ranks)

        results = map_layers(layer_result, global_state.factors)
        factors = {layer: {"A": result[top].A, "B": result[top].B} for layer, result in results.items()}
        errors = {r: [result[r].relative_error for result in results.values()] for r in ranks}
        self.last_round.extra["truncation"] = {
            str(r): {"relative_mean": sum(e) / len(e), "relative_max": max(e)} for r, e in errors.items()
        }
        return LoraState(factors=factors)
