"""LoRA-FAIR: average A and B, then correct B so that B' Ā points where the ideal update does.

Clients train A and B. FedIT's product (sum p_k B_k)(sum p_k A_k) is not the ideal update
dW = sum p_k B_k A_k. LoRA-FAIR keeps Ā = sum p_k A_k and looks for a residual dB on
B̄ = sum p_k B_k minimizing

    D(dW, (B̄ + dB) Ā) + lam ||dB||_F,    D = 1 - cosine similarity of the flattened matrices,

then broadcasts (B̄ + dB, Ā). No d_out x d_in matrix is ever formed: with B_cat = [B_1, ..., B_K]
(d_out x Kr), A_cat = [A_1; ...; A_K] (Kr x d_in) and W = diag(p_1 I_r, ..., p_K I_r), dW =
B_cat W A_cat, so <dW, B' Ā> = <B', G> with G = B_cat (W A_cat Ā^T), ||B' Ā||^2 = <B' H, B'>
with H = Ā Ā^T, and ||dW||^2 = <W B_cat^T B_cat W, A_cat A_cat^T>. Setup costs O((d_out + d_in) (K r)^2); the solve then needs one r x r
eigendecomposition, O(d_out r^2) work and a 1-D search at O(r) per point (_cosine_solution).
`method="lstsq"` instead solves min ||dW - B' Ā||_F^2 + lam ||B' - B̄||_F^2 in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedlora.config import StrategyConfig
from fedlora.lora import LoraState
from strategies.base import LoraStrategy
from strategies.gram_svd import gram, work_dtype
from strategies.lora_fair_path import RidgePath, search_path
from strategies.per_layer import map_layers

# Factors are thin (d x r) and the cores r x r or Kr x Kr: float64 is cheap here and keeps the
# Gram-form identities accurate when the cosine is close to 1.
_WORK_DTYPE = torch.float64
WEIGHT_SUM_TOLERANCE = 1e-6
METHODS = ("cosine", "lstsq")


def lora_fair_correction(
    Bs: list[Tensor],
    As: list[Tensor],
    weights: Tensor | Sequence[float],
    lam: float = 0.01,
    *,
    method: str = "cosine",
    refinements: int = 12,
) -> tuple[Tensor, Tensor]:
    """One layer's LoRA-FAIR aggregate (B̄ + dB, Ā) from the clients' factors and weights p_k.

    method="cosine" (default): dB minimizes (1 - cos(dW, (B̄ + dB) Ā)) + lam ||dB||_F, by an
    exact search along the ridge path (see _cosine_solution); `refinements` caps its precision
    (each narrows the bracket 16-fold; 12 reach the limit of float64; the search stops sooner
    where the objective is flat to rounding over the bracket). The result is never
    worse than dB = 0 and is the global minimum whenever cos(dW, B̄ Ā) > 0, except that a
    minimum approached only by shrinking B' Ā to zero is never returned (it would erase the
    update). lam = 0 leaves the scale of B' free: we return the lam -> 0+ limit, the positive
    multiple of the least-squares B_ls closest to B̄ (B_ls itself if none is: <B_ls, B̄> <= 0).
    If dW = 0, or dW is orthogonal to every B' Ā, B̄ is returned.

    method="lstsq": the ridge solution B' = (G + lam B̄)(Ā Ā^T + lam I)^{-1} of
    min ||dW - B' Ā||_F^2 + lam ||B' - B̄||_F^2 (lam penalizes the *squared* norm here;
    lam = 0 gives the least-squares B' closest to B̄).

    Returned tensors have the dtype and device of the inputs.
    """
    p = _check_inputs(Bs, As, weights)
    _check_options(lam, method, refinements)
    clients = _ClientFactors.stack(Bs, As, p)
    a_bar = clients.a_bar()
    target = _FactoredTarget.build(clients)
    with np.errstate(all="ignore"):  # the path's extremes overflow and divide 0 by 0, as expected
        if method == "lstsq":
            path = target.path()
            b_new = path.form(path.ridge(lam))
        else:
            b_new = _cosine_solution(target, lam, refinements)
    return b_new.to(Bs[0].dtype), a_bar.to(As[0].dtype)


def fair_objective(
    Bs: list[Tensor],
    As: list[Tensor],
    weights: Tensor | Sequence[float],
    B_new: Tensor,
    A_bar: Tensor,
    lam: float,
) -> Tensor:
    """(1 - cos(dW, B_new A_bar)) + lam ||B_new - B̄||_F in factored form, as a float64 scalar.

    The cosine of a zero matrix is taken as 0. Differentiable in B_new (autograd).
    """
    p = _check_inputs(Bs, As, weights)
    if B_new.shape != Bs[0].shape or A_bar.shape != As[0].shape:
        raise ValueError(
            f"fair_objective: B_new {tuple(B_new.shape)} and A_bar {tuple(A_bar.shape)} must have the "
            f"clients' shapes {tuple(Bs[0].shape)} and {tuple(As[0].shape)}"
        )
    target = _FactoredTarget.build(_ClientFactors.stack(Bs, As, p), A_bar.to(_WORK_DTYPE))
    return target.objective(B_new.to(_WORK_DTYPE), lam)


@dataclass(frozen=True)
class _ClientFactors:
    """Every client's factors of one layer, side by side, copied once into gram_svd.work_dtype.

    b_cat (d_out x Kr) holds [B_1, ..., B_K] and a_cat (Kr x d_in) holds [A_1; ...; A_K],
    unweighted: the weights p_k are applied to the small products instead, so each large
    factor is read a few times and copied once, which is what a round of a 7B-sized adapter
    spends its time on. Float32 factors stay float32 (a float64 copy would double the bytes
    read); their Grams are float64 all the same (gram_svd.gram).
    """

    b_cat: Tensor
    a_cat: Tensor
    p: Tensor  # (K,) float64
    rank: int

    @classmethod
    def stack(cls, Bs: list[Tensor], As: list[Tensor], p: Tensor) -> _ClientFactors:
        """Copy the (validated) factors into one buffer per kind, in gram_svd.work_dtype."""
        (d_out, r), d_in, k = Bs[0].shape, As[0].shape[1], len(Bs)
        dtype = work_dtype(*Bs, *As)
        b_cat = torch.empty(d_out, k, r, dtype=dtype, device=Bs[0].device)
        a_cat = torch.empty(k, r, d_in, dtype=dtype, device=As[0].device)
        for i, (b, a) in enumerate(zip(Bs, As)):
            b_cat[:, i].copy_(b)
            a_cat[i].copy_(a)
        return cls(b_cat=b_cat.view(d_out, k * r), a_cat=a_cat.view(k * r, d_in), p=p.to(b_cat.device), rank=r)

    def column_weights(self) -> Tensor:
        """(Kr,): p_k repeated over client k's r columns of b_cat (rows of a_cat)."""
        return self.p.repeat_interleave(self.rank)

    def averaging(self) -> Tensor:
        """Kr x r, [p_1 I; ...; p_K I]: b_cat @ it = sum p_k B_k, its transpose @ a_cat = sum p_k A_k."""
        return torch.kron(self.p[:, None], torch.eye(self.rank, dtype=_WORK_DTYPE, device=self.p.device))

    def a_bar(self) -> Tensor:
        """sum p_k A_k, float64."""
        return (self.averaging().T.to(self.a_cat.dtype) @ self.a_cat).to(_WORK_DTYPE)


@dataclass(frozen=True)
class _FactoredTarget:
    """The ideal update dW as seen by candidates B' A_ref with A_ref fixed, all in factored form."""

    b_bar: Tensor  # d_out x r: sum p_k B_k
    g: Tensor  # d_out x r: dW A_ref^T, so that <dW, B' A_ref> = <B', g>
    h: Tensor  # r x r: A_ref A_ref^T, so that ||B' A_ref||^2 = <B' h, B'>
    dw_norm: Tensor  # ||dW||_F

    @classmethod
    def build(cls, clients: _ClientFactors, a_ref: Tensor | None = None) -> _FactoredTarget:
        """Precompute g, h and ||dW|| from the clients' factors (the identities in the module
        docstring, W = diag(w)); a_ref (float64) defaults to Ā, whose products with A_cat come
        from A_cat's Gram matrix. Each large factor is read once for its Gram (gram_svd.gram,
        BLAS syrk) and b_cat once more, for B̄ and g together."""
        b_cat, a_cat, w = clients.b_cat, clients.a_cat, clients.column_weights()
        gram_a, averaging = gram(a_cat), clients.averaging()
        if a_ref is None:
            cross = gram_a @ averaging  # A_cat Ā^T
            h = averaging.T @ cross
        else:
            a_ref = a_ref.to(b_cat.device)
            cross, h = (a_cat @ a_ref.to(a_cat.dtype).T).to(_WORK_DTYPE), a_ref @ a_ref.T
        dw_sq = torch.sum(gram(b_cat.T) * gram_a * torch.outer(w, w))
        # In the factors' dtype: float32 factors give B̄ and g to their own precision.
        means_and_g = (b_cat @ torch.cat([averaging, w[:, None] * cross], dim=1).to(b_cat.dtype)).to(_WORK_DTYPE)
        return cls(
            b_bar=means_and_g[:, : clients.rank],
            g=means_and_g[:, clients.rank :],
            h=h,
            dw_norm=dw_sq.clamp(min=0).sqrt(),  # rounding can push a zero norm slightly negative
        )

    def path(self) -> RidgePath:
        """The ridge path of candidates B' A_ref (strategies/lora_fair_path.py)."""
        return RidgePath.build(self.g, self.b_bar, self.h, float(self.dw_norm))

    def cosine(self, b: Tensor) -> Tensor:
        """cos(dW, b A_ref), 0 if either matrix is zero."""
        q = torch.sum((b @ self.h) * b)  # ||b A_ref||^2
        if self.dw_norm <= 0 or q <= 0:
            return torch.zeros((), dtype=_WORK_DTYPE, device=b.device)
        return torch.sum(b * self.g) / (self.dw_norm * q.sqrt())

    def objective(self, b: Tensor, lam: float) -> Tensor:
        """(1 - cos(dW, b A_ref)) + lam ||b - B̄||_F."""
        return 1 - self.cosine(b) + lam * torch.linalg.matrix_norm(b - self.b_bar)


def _cosine_solution(target: _FactoredTarget, lam: float, refinements: int) -> Tensor:
    """The best attained minimizer of (1 - cos(dW, B' Ā)) + lam ||B' - B̄||_F over B'.

    The objective is smooth except at dB = 0 (the norm's kink) and where B' Ā = 0 (the cosine's
    pole), so a minimizer is dB = 0 or a stationary point, and every stationary point with a
    positive cosine lies on the one-parameter ridge path (lora_fair_path.RidgePath). We search that path (a
    grid over log rho, refined around its best point) and return the best of: B̄, the path's
    best point, and the least-squares B' (B' Ā = dW projected on Ā's row space). Exact and
    global whenever cos(dW, B̄ Ā) > 0, whatever the conditioning of Ā Ā^T; no gradient steps,
    no step sizes, deterministic.

    One trap: the cosine ignores the scale of B'. When the least-squares direction points away
    from B̄ (<B_ls, B̄> <= 0) the path's low-rho end is B' Ā -> 0, and the objective's infimum
    can be approached only by shrinking the update to nothing (1 - cos stays minimal while the
    penalty tends to lam ||B̄||). That infimum is not attained and would erase the update: we
    consider only the path's interior local minima then.
    """
    path = target.path()
    if target.dw_norm <= 0 or not path.reaches_anything():
        return target.b_bar  # nothing of dW is reachable through Ā: no direction to correct in
    least_squares = path.ridge(0.0)
    if lam == 0:
        # The cosine alone leaves the scale free: take the lam -> 0+ limit, the path's end.
        return path.form(path.low_rho_end() if path.least_squares_scale() > 0 else least_squares)
    candidates = [least_squares]
    rho = search_path(path, lam, refinements)
    if rho is not None:
        candidates.append(path.point(rho))
    # Compared in H's eigenbasis (one d_out x r pass each); only the winner is formed.
    best, best_value = None, path.candidate_value(path.b_bar(), lam)
    for candidate in candidates:
        value = path.candidate_value(candidate, lam)
        if value < best_value:  # strictly: ties keep B̄
            best, best_value = candidate, value
    return target.b_bar if best is None else path.form(best)


def _check_inputs(Bs: list[Tensor], As: list[Tensor], weights: Tensor | Sequence[float]) -> Tensor:
    """Validate one layer's client factors and weights; return the weights as a float64 vector."""
    if len(Bs) == 0 or len(As) == 0:
        raise ValueError("lora_fair: no client factors given (Bs and As must be non-empty)")
    if len(Bs) != len(As):
        raise ValueError(f"lora_fair: {len(Bs)} B factors but {len(As)} A factors; give one of each per client")
    b_shape, a_shape = Bs[0].shape, As[0].shape
    if len(b_shape) != 2 or len(a_shape) != 2 or b_shape[1] != a_shape[0] or b_shape[1] == 0:
        raise ValueError(f"lora_fair: B {tuple(b_shape)} and A {tuple(a_shape)} must be d_out x r and r x d_in with r >= 1")
    for k, (b, a) in enumerate(zip(Bs, As)):
        if b.shape != b_shape or a.shape != a_shape:
            raise ValueError(
                f"lora_fair: client {k} has B {tuple(b.shape)}, A {tuple(a.shape)}; "
                f"client 0 has B {tuple(b_shape)}, A {tuple(a_shape)}"
            )
    p = torch.as_tensor(weights, dtype=_WORK_DTYPE).detach().cpu().reshape(-1)
    if p.numel() != len(Bs):
        raise ValueError(f"lora_fair: {p.numel()} weights for {len(Bs)} clients")
    if not torch.all(torch.isfinite(p)) or torch.any(p < 0):
        raise ValueError(f"lora_fair: weights must be finite and non-negative, got {p.tolist()}")
    if abs(float(p.sum()) - 1) > WEIGHT_SUM_TOLERANCE:
        raise ValueError(f"lora_fair: weights must sum to 1 (within {WEIGHT_SUM_TOLERANCE}), got {float(p.sum())!r}")
    return p


def _check_options(lam: float, method: str, refinements: int) -> None:
    """Validate the solver options."""
    if method not in METHODS:
        raise ValueError(f"lora_fair: unknown method {method!r}; use one of {', '.join(METHODS)}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lora_fair: lam must be finite and >= 0, got {lam!r}")
    if refinements < 0:
        raise ValueError(f"lora_fair: refinements must be >= 0, got {refinements!r}")


# --- Flower strategy ---
class LoraFair(LoraStrategy):
    """Clients train A and B; the server averages both and corrects B̄ towards sum p_k B_k A_k.

    Parameters (beside LoraStrategy's)
    ----------------------------------
    fair_lambda : float
        Weight lam of ||dB||_F in the objective (0: the correction's size is free).
    fair_method : str
        "cosine" (the paper's objective, default) or "lstsq" (closed-form least squares).
    """

    name = "lora_fair"
    description = "LoRA-FAIR: clients train A and B; the server corrects the averaged B towards the ideal update"
    trains = "AB"

    def __init__(self, *args: object, fair_lambda: float = 0.01, fair_method: str = "cosine", **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        _check_options(fair_lambda, fair_method, refinements=0)
        self.fair_lambda = fair_lambda
        self.fair_method = fair_method

    @classmethod
    def options(cls, config: StrategyConfig) -> dict[str, object]:
        """fair_lambda and fair_method from [strategy]."""
        return {"fair_lambda": config.fair_lambda, "fair_method": config.fair_method}

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """Per layer: (B̄ + dB, Ā) from every client's (B_k, A_k)."""

        def corrected(layer: str) -> dict[str, Tensor]:
            b, a = lora_fair_correction(
                [u.factors[layer]["B"] for u in updates],
                [u.factors[layer]["A"] for u in updates],
                weights,
                self.fair_lambda,
                method=self.fair_method,
            )
            return {"A": a, "B": b}

        return LoraState(factors=map_layers(corrected, global_state.factors))
