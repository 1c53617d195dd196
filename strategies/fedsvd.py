"""FedSVD: clients train B only; the server re-factorizes the averaged update by its SVD.

Every client trains B against the broadcast A, so averaging B is exact: sum p_k B_k A = B A.
Every `svd_period` rounds the server rewrites M = B A as B' A' with A' holding the top-r right
singular vectors of M (orthonormal rows) and B' = U_r S_r, so B' A' = B A and the next round's
A is adapted to what the federation learned. M is never formed: two thin QRs and the SVD of an
r x r core cost O((d_out + d_in) r^2) instead of O(d_out d_in r). Refactorization is
post-processing of the already-aggregated (and, under DP, already-noised) B: it costs no privacy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.config import StrategyConfig
from fedlora.lora import LoraState
from strategies.base import LoraStrategy, weighted_sum
from strategies.gram_svd import gram_low_rank, gram_product_svd
from strategies.per_layer import map_layers

# The factors are thin (d x r), so float64 costs little and keeps B'A' = BA to ~1e-15 relative
# even when B and A are badly conditioned; results go back in the caller's dtype.
_WORK_DTYPE = torch.float64


def refactorize(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """One layer's factors (B: d_out x r, A: r x d_in) rewritten as the SVD of B A, M never formed.

    Returns (B', A') with B' A' = B A, B' = U S (columns orthogonal, norms = singular values in
    descending order) and A' = V^T (orthonormal rows), same shapes, dtype and device as the input.

    If r > min(d_out, d_in), B A has at most m = min(d_out, d_in) nonzero singular values:
    - while r <= d_in, A' still has r orthonormal rows (the core's SVD completes V to a basis of
      the span of A^T's QR factor), and the columns of B' beyond m are zero;
    - if r > d_in, only d_in rows of R^{d_in} can be orthonormal: A' has d_in orthonormal rows
      followed by r - d_in zero rows, paired with zero columns of B'.
    An all-zero B (e.g. before the first round) is returned unchanged, with A.
    """
    _check_factors(B, A)
    if not torch.any(B):
        return B, A
    q_b, core, q_a = _qr_core(B, A)
    # full_matrices=True so that V is a complete basis of the core's column space (ka rows of
    # A'), even when the core has fewer than ka nonzero singular values.
    u, s, vh = torch.linalg.svd(core, full_matrices=True)  # kb x kb, m, ka x ka
    m = s.shape[0]
    b_new = torch.zeros(B.shape, dtype=_WORK_DTYPE, device=B.device)
    b_new[:, :m] = (q_b @ u[:, :m]) * s
    a_new = torch.zeros(A.shape, dtype=_WORK_DTYPE, device=A.device)
    a_new[: vh.shape[0]] = vh @ q_a.T
    return b_new.to(B.dtype), a_new.to(A.dtype)


def product_svd(B: Tensor, A: Tensor, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD (U, S, V^T) of B A, B A never formed; any inner rank, even above d_out or d_in.

    U is d_out x m, S has m values in descending order, V^T is m x d_in, m = min(d_out, d_in, r);
    with `top`, U and V^T hold only the first min(m, top) components. The strategies that
    aggregate products of several clients (FlexLoRA, FedEx-LoRA) call it on their stacked
    factors, whose inner rank is the sum of the clients' ranks. Float64 factors: Householder
    QRs, exact to ~1e-15, all in float64. Narrower factors (float32, what clients send): from
    float64 Gram matrices (strategies/gram_svd.py), ~1e-7, U and V^T in the factors' dtype,
    only the components the Grams resolve in S (m may be smaller).
    """
    _check_factors(B, A)
    if B.dtype != _WORK_DTYPE or A.dtype != _WORK_DTYPE:
        return gram_product_svd(B, A, top)
    q_b, core, q_a = _qr_core(B, A)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # kb x m, m, m x ka
    return q_b @ u[:, :top], s, vh[:top] @ q_a.T


def numerical_rank(s: Tensor, scale: float, size: int) -> int:
    """How many singular values stand above rounding error (eps * size * scale, scale the product's bound)."""
    tolerance = torch.finfo(s.dtype).eps * size * scale
    return int((s > tolerance).sum())


def low_rank(b: Tensor, a: Tensor) -> tuple[Tensor, Tensor]:
    """B A re-factorized to its numerical rank q as balanced factors (d_out x q, q x d_in).

    Float64 factors: U sqrt(S), sqrt(S) V^T in float64. Narrower ones (float32): the same in
    their dtype, from float64 Grams (strategies/gram_svd.py), except that factors of full rank
    R come back as they are (the product then has rank R: nothing to shed).
    """
    size = max(b.shape[0], a.shape[1], b.shape[1])
    scale = float(torch.linalg.matrix_norm(b) * torch.linalg.matrix_norm(a))
    if scale == 0:  # a zero product, or an empty stack (inner rank 0)
        return b[:, :0], a[:0]
    if b.dtype != _WORK_DTYPE or a.dtype != _WORK_DTYPE:
        return gram_low_rank(b, a, torch.finfo(_WORK_DTYPE).eps * size * scale)
    u, s, vh = product_svd(b, a)
    q = numerical_rank(s, scale, size)
    root = s[:q].sqrt()
    return u[:, :q] * root, root[:, None] * vh[:q]


def _qr_core(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(q_b, core, q_a) in float64 with B A = q_b core q_a^T, q_b and q_a orthonormal columns.

    Reduced QR of the tall-thin sides only (never a Cholesky of the Gram matrix, which may be
    singular): q_b is d_out x kb, q_a is d_in x ka, the core kb x ka with kb = min(d_out, r),
    ka = min(d_in, r), so the SVD of the small core gives the SVD of B A.
    """
    q_b, r_b = torch.linalg.qr(B.to(_WORK_DTYPE))  # d_out x kb, kb x r
    q_a, r_a = torch.linalg.qr(A.to(_WORK_DTYPE).T)  # d_in x ka, ka x r
    return q_b, r_b @ r_a.T, q_a


def _check_factors(B: Tensor, A: Tensor) -> None:
    """Raise ValueError unless B (d_out x r) and A (r x d_in) are a LoRA factor pair."""
    if B.ndim != 2 or A.ndim != 2:
        raise ValueError(f"factors: B and A must be 2-D, got shapes {tuple(B.shape)} and {tuple(A.shape)}")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"factors: B is {tuple(B.shape)} and A is {tuple(A.shape)}; B must be d_out x r and A r x d_in")
    if B.shape[1] == 0:
        raise ValueError("factors: rank r must be at least 1")


# --- Flower strategy ---
class FedSVD(LoraStrategy):
    """Clients train B against the broadcast A; the server averages B and re-factorizes B A.

    Under user-level DP (fedlora/user_privacy.py) only B's change (and the head's, when trained)
    is clipped and noised; the refactorization then runs on the noised B with the broadcast A,
    post-processing at no privacy cost (the new A derives from the released B and A only).

    Parameters (beside LoraStrategy's)
    ----------------------------------
    svd_period : int
        Re-factorize every this many rounds (1: every round).
    """

    name = "fedsvd"
    description = "FedSVD: clients train B only; the server averages B and re-factorizes BA by SVD"
    trains = "B"
    user_level_dp = "the change of B (and the head); the refactorization runs on the noised B, at no privacy cost"

    def __init__(self, *args: object, svd_period: int = 1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        if svd_period < 1:
            raise ValueError(f"svd_period must be at least 1, got {svd_period}")
        self.svd_period = svd_period

    @classmethod
    def options(cls, config: StrategyConfig) -> dict[str, object]:
        """svd_period from [strategy]."""
        return {"svd_period": config.svd_period}

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """B <- sum p_k B_k (exact: A is shared), then B A -> U S, V^T every svd_period rounds."""
        refactor = self.server_round % self.svd_period == 0

        def aggregated(layer: str) -> dict[str, Tensor]:
            b = weighted_sum([u.factors[layer]["B"] for u in updates], weights)
            a = global_state.factors[layer]["A"]
            if refactor and torch.any(b):  # an all-zero B has nothing to re-factorize
                b, a = refactorize(b, a)
            return {"A": a, "B": b}

        return LoraState(factors=map_layers(aggregated, global_state.factors))
