"""LoRA-FAIR's ridge path and the search along it (strategies/lora_fair.py, _cosine_solution).

Its numpy arithmetic runs under np.errstate(all="ignore") (the callers' with-blocks): overflow
and 0/0 at the extremes of the path are expected and handled (NaN counts as +inf), as they were
silently in torch.

The path B'(rho) = (kappa(rho) G + rho B̄)(H + rho I)^{-1} holds every stationary point of
LoRA-FAIR's objective with a positive cosine; in H's eigenbasis the objective along it needs
only r numbers per column kind, so the search costs O(r) a point whatever d_out is. Those
(r,)-sized computations run in numpy: a round searches 224 paths at 7B shape, and torch's
per-call overhead (and the GIL it releases and takes back on every call, which made two
threads searching side by side each twice as slow) was a third of the round. The d_out x r
matrices (G V, B̄ V, the result) stay torch tensors, on the factors' device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

_TINY = np.finfo(np.float64).tiny
_EPS = np.finfo(np.float64).eps
# Objective values this close are equal for the search: 1 - cos + lam ||dB|| is rounded at the
# scale of its terms (1 and the penalty), not of its value.
_FLAT = 4 * _EPS
# The search: a log-spaced grid over rho with this many points per decade, from 1e-6 x the
# smallest nonzero eigenvalue of Ā Ā^T to 1e12 x the largest (beyond it ||dB|| < ~1e-12 ||B̄||:
# nothing left to gain), shifted down while its lowest point is its best, then refinements that
# each narrow the bracket around the best point 16-fold, until the objective is flat to rounding
# over the bracket (_FLAT) or the refinements asked for are done.
GRID_PER_DECADE = 8
DECADES_BELOW, DECADES_ABOVE = 6, 12
REFINE_POINTS = 33
# Downward shifts of the grid allowed while the minimum lies below it (each ~ 18 decades).
MAX_SHIFTS = 16

# A point B' of the path's plane in H's eigenbasis, column by column: the weights (a, b, c)
# with B' V = a G V + b B̄ V and dB V = (B' - B̄) V = a G V - c B̄ V (c = 1 - b, kept apart so
# that a small dB is not the difference of two large terms); each (r,), or (n, r) for n points.
Weights = tuple[np.ndarray, np.ndarray, np.ndarray]


@dataclass(frozen=True)
class RidgePath:
    """The path B'(rho) = (kappa(rho) G + rho B̄)(H + rho I)^{-1}, rho > 0, in H's eigenbasis.

    Setting the gradient of 1 - cos(dW, B' Ā) + lam ||B' - B̄|| to zero gives
    B' (beta H + mu I) = alpha G + mu B̄ with alpha = 1 / (||dW|| ||B'Ā||),
    beta = <dW, B'Ā> / (||dW|| ||B'Ā||^3) and mu = lam / ||dB||. With a positive cosine
    (beta > 0), divide by beta: rho = mu / beta > 0 and kappa = alpha / beta = ||B'Ā||^2 /
    <dW, B'Ā>. For B' on the path that last identity is a quadratic in kappa with exactly one
    positive root, so one parameter remains. As rho -> infinity the path ends at B̄ (leaving it
    along -grad(1 - cos) when cos(dW, B̄ Ā) > 0); as rho -> 0 it tends to low_rho_end().

    With H = V diag(lambda) V^T, column i of B' V combines columns i of G V and B̄ V only, so
    the objective along the path needs just the r 2x2 Gram blocks of those columns: O(r) per
    point, however large d_out.
    """

    eigenvalues: np.ndarray  # (r,), of H = Ā Ā^T, ascending, clamped at 0
    eigenvectors: Tensor  # r x r
    g_rot: Tensor  # d_out x r: G V
    b_rot: Tensor  # d_out x r: B̄ V
    gg: np.ndarray  # (r,): squared norms of the columns of G V
    gb: np.ndarray  # (r,): inner products of matching columns of G V and B̄ V
    bb: np.ndarray  # (r,): squared norms of the columns of B̄ V
    dw_norm: float

    @classmethod
    def build(cls, g: Tensor, b_bar: Tensor, h: Tensor, dw_norm: float) -> RidgePath:
        """Diagonalize H and precompute the column Grams of G V and B̄ V, all in float64."""
        eigenvalues, eigenvectors = torch.linalg.eigh(h.to(torch.float64))
        g_rot, b_rot = g.to(torch.float64) @ eigenvectors, b_bar.to(torch.float64) @ eigenvectors
        return cls(
            eigenvalues=_numpy(eigenvalues).clip(min=0),  # H is PSD; rounding may dip below 0
            eigenvectors=eigenvectors,
            g_rot=g_rot,
            b_rot=b_rot,
            gg=_numpy(torch.sum(g_rot * g_rot, dim=0)),
            gb=_numpy(torch.sum(g_rot * b_rot, dim=0)),
            bb=_numpy(torch.sum(b_rot * b_rot, dim=0)),
            dw_norm=dw_norm,
        )

    def kappa(self, rho: np.ndarray) -> np.ndarray:
        """The positive root kappa(rho) of (n1 - q2) k^2 + (n0 - 2 q1) k - q0 = 0, for a batch of rho.

        From kappa n(kappa) = q(kappa), with n = <dW, B'Ā> = n1 k + n0 and
        q = ||B'Ā||^2 = q2 k^2 + 2 q1 k + q0 along the path; the differences are summed in
        closed form so that nothing cancels.
        """
        lam_h, rho = self.eigenvalues, rho[:, None]
        den = lam_h + rho
        quad = np.sum(self.gg * rho / den**2, axis=1)  # n1 - q2 > 0 when G != 0
        lin = np.sum(self.gb * rho * (rho - lam_h) / den**2, axis=1)  # n0 - 2 q1
        const = np.sum(lam_h * (rho / den) ** 2 * self.bb, axis=1)  # q0 >= 0
        root = np.sqrt(lin**2 + 4 * quad * const)
        # The two algebraically equal forms, each used where it does not cancel.
        with np.errstate(divide="ignore", invalid="ignore"):
            from_const = 2 * const / np.maximum(lin + root, _TINY)
            from_quad = (root - lin) / np.maximum(2 * quad, _TINY)
        return np.where(lin >= 0, from_const, from_quad)

    def objective(self, rho: np.ndarray, lam: float) -> np.ndarray:
        """The objective at B'(rho) for a batch of rho, from the column Grams only."""
        den = self.eigenvalues + rho[:, None]
        return self.value((self.kappa(rho)[:, None] / den, rho[:, None] / den, self.eigenvalues / den), lam)

    def value(self, weights: Weights, lam: float) -> np.ndarray:
        """The objective (1 - cos(dW, B' Ā)) + lam ||B' - B̄||_F at the B' of `weights`, from the
        column Grams only: O(r) a point."""
        a, _, c = weights
        db_sq = np.sum(a**2 * self.gg - 2 * a * c * self.gb + c**2 * self.bb, axis=-1)
        return 1 - self._cosine(weights) + lam * np.sqrt(np.maximum(db_sq, 0))

    def candidate_value(self, weights: Weights, lam: float) -> float:
        """value() with ||dB|| from dB's columns, d_out x r: the Grams' form of ||dB||^2 is a
        difference of large terms when dB is small next to G H^-1 (a least-squares B' close to
        B̄), too coarse to tell such a B' from B̄."""
        a, _, c = weights
        db_norm = 0.0  # B̄ itself: no pass over the columns
        if np.any(a) or np.any(c):
            db_norm = float(torch.linalg.matrix_norm(self._on_device(a) * self.g_rot - self._on_device(c) * self.b_rot))
        return 1 - float(self._cosine(weights)) + lam * db_norm

    def _cosine(self, weights: Weights) -> np.ndarray:
        """cos(dW, B' Ā) at the B' of `weights`, 0 where B' Ā = 0."""
        a, b, _ = weights
        n = np.sum(a * self.gg + b * self.gb, axis=-1)
        q = np.sum(self.eigenvalues * (a**2 * self.gg + 2 * a * b * self.gb + b**2 * self.bb), axis=-1)
        return np.where(q > 0, n / (self.dw_norm * np.sqrt(np.maximum(q, _TINY))), 0.0)

    def form(self, weights: Weights) -> Tensor:
        """The B' of `weights`, d_out x r."""
        a, b, _ = (self._on_device(part) for part in weights)
        return (a * self.g_rot + b * self.b_rot) @ self.eigenvectors.T

    def _on_device(self, part: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(part)).to(self.g_rot.device)

    def b_bar(self) -> Weights:
        """B̄ itself (dB = 0)."""
        zero = np.zeros_like(self.eigenvalues)
        return zero, np.ones_like(zero), zero

    def point(self, rho: float) -> Weights:
        """B'(rho)."""
        den = self.eigenvalues + rho
        return self.kappa(np.array([rho]))[0] / den, rho / den, self.eigenvalues / den

    @property
    def reached(self) -> np.ndarray:
        """Mask of the eigen-directions Ā reaches (eigenvalue above torch.linalg.pinv's cut-off)."""
        lam_h = self.eigenvalues
        return lam_h > lam_h.shape[0] * _EPS * lam_h[-1]

    def reaches_anything(self) -> bool:
        """Whether any of dW's correlation with Ā's row space is left (G != 0)."""
        return bool(np.any(self.gg > 0))

    def ridge(self, lam: float) -> Weights:
        """(G + lam B̄)(H + lam I)^{-1}; for lam = 0, its limit G H^+ + B̄ (I - H H^+)."""
        if lam > 0:
            den = self.eigenvalues + lam
            return 1 / den, lam / den, self.eigenvalues / den
        # Directions Ā does not reach keep B̄: the least-squares solution closest to B̄.
        return self._on_reached(1.0)

    def least_squares_scale(self) -> float:
        """s = <B_ls, B̄> / ||B_ls||^2 with B_ls = G H^+: the multiple of B_ls closest to B̄."""
        lam_h = np.where(self.reached, self.eigenvalues, math.inf)
        return float(np.sum(self.gb / lam_h) / np.sum(self.gg / lam_h**2))

    def low_rho_end(self) -> Weights:
        """lim B'(rho) as rho -> 0: s B_ls + B̄ (I - H H^+), zero on Ā's row space when s <= 0."""
        return self._on_reached(max(self.least_squares_scale(), 0.0))

    def _on_reached(self, scale: float) -> Weights:
        """scale G H^+ on the directions Ā reaches, B̄ on the others."""
        reached = self.reached
        a = np.where(reached, scale / np.where(reached, self.eigenvalues, 1.0), 0.0)
        b = (~reached).astype(np.float64)
        return a, b, 1 - b


def search_path(path: RidgePath, lam: float, refinements: int) -> float | None:
    """The rho of the best point on the path (None if no attained one): grid, then zoom in."""
    vanishing_end = path.least_squares_scale() <= 0
    grid, values = _path_grid(path, lam, extend_down=not vanishing_end)
    best = _best_index(values, interior_only=vanishing_end)
    if best is None:
        return None
    for _ in range(refinements):
        # The minimum lies between the best point's neighbours: zoom in there.
        left, right = grid[max(best - 1, 0)], grid[min(best + 1, grid.shape[0] - 1)]
        grid = np.linspace(left, right, REFINE_POINTS)
        values = _path_values(path, grid, lam)
        best = int(np.argmin(values))
        if np.ptp(values) <= _FLAT * (1 + abs(values[best])):
            break  # flat to rounding over the bracket: zooming further would pick among rounding errors
    return math.exp(grid[best])


def _path_grid(path: RidgePath, lam: float, *, extend_down: bool) -> tuple[np.ndarray, np.ndarray]:
    """A grid over log rho and the objective on it, spanning the eigenvalues of Ā Ā^T.

    The stationary rho is lam ||B'Ā||^2 / (cos ||dB||): it scales with the size of B as well as
    with the eigenvalues, so it may lie below the grid. With `extend_down`, while the best
    point is the lowest, the window shifts down by its own width.
    """
    reached = path.eigenvalues[path.reached]
    ln10 = math.log(10)
    lo = math.log(reached[0]) - DECADES_BELOW * ln10
    hi = math.log(reached[-1]) + DECADES_ABOVE * ln10
    count = math.ceil((hi - lo) / ln10 * GRID_PER_DECADE) + 1
    grid = np.linspace(lo, hi, count)
    values = _path_values(path, grid, lam)
    for _ in range(MAX_SHIFTS if extend_down else 0):
        if int(np.argmin(values)) != 0:
            break
        grid = grid - (hi - lo)
        values = _path_values(path, grid, lam)
    return grid, values


def _best_index(values: np.ndarray, *, interior_only: bool) -> int | None:
    """The grid index of the least value; with interior_only, of the least interior local minimum."""
    if not interior_only:
        return int(np.argmin(values))
    inner = values[1:-1]
    is_local_min = (inner <= values[:-2]) & (inner <= values[2:]) & np.isfinite(inner)
    if not np.any(is_local_min):
        return None
    return 1 + int(np.argmin(np.where(is_local_min, inner, math.inf)))


def _path_values(path: RidgePath, log_rho: np.ndarray, lam: float) -> np.ndarray:
    """The objective along the path at rho = exp(log_rho); NaN (0/0) counts as +inf."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore", under="ignore"):
        return np.nan_to_num(path.objective(np.exp(log_rho), lam), nan=math.inf)


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float64).numpy()
