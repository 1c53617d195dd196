"""The SVD of a product of stacked float32 factors, from their float64 Gram matrices.

FlexLoRA, FLoRA and FedEx-LoRA re-factorize B A where B (d_out x R) and A (R x d_in) stack
every client's factors (R = 160 for 10 clients at rank 16). Householder QRs of both stacks in
float64 (strategies/fedsvd.py) are exact to ~1e-15 but cost several times what the Gram
matrices B^T B and A A^T cost, and a 7B-shaped round has 224 such pairs. For float32 factors,
whose own rounding is 6e-8, this module works from the Gram matrices instead:

- the Grams in float64 (BLAS syrk on blocks widened to float64: gram()). Not in float32: a Gram
  resolves singular values down to ~sqrt(eps) of the largest, 2.4e-4 in float32, and stacks of
  nearly parallel factors (every client starts from the same broadcast) have smaller ones that
  still carry up to ~1e-4 of the product; in float64 they are resolved down to ~1e-8. A
  Cholesky-QR2 in float32 would resolve them only for condition numbers below ~1e3 (beyond, its
  first Cholesky fails) at three float32 products a side, more than one float64 product here.
- W with W^T W = B^T B: Cholesky's W = L^T, or, where Cholesky fails (B of lower numerical
  rank), the eigendecomposition's root over the directions the Gram resolves.
- (W A)(W A)^T = W (A A^T) W^T = Y S^2 Y^T (eigh, R x R): the singular values S of B A, with
  U = B W^+ Y and V^T = S^-1 Y^T W A, the two large products in float32.

B A = U S V^T then holds to ~1e-7 of ||B|| ||A|| whatever the conditioning, with components
below the Grams' resolution dropped (tests/test_gram_svd.py measures it against float64 dense
references, nearly parallel clients included: ~3e-7 everywhere); U and V are orthonormal to
about 1e-6 over the components the product has.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from threadpoolctl import ThreadpoolController
from torch import Tensor

_GRAM_DTYPE = torch.float64
_EPS = torch.finfo(_GRAM_DTYPE).eps
# Columns of a stack widened to float64 at a time (1024 x 160 x 8 bytes: about a core's L2 cache).
_GRAM_BLOCK = 1024


def work_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype to stack factors in: float64 if any of them is, else float32 (bfloat16 and
    float16 widened). Float64 stacks are re-factorized by Householder QRs (fedsvd.product_svd)."""
    return functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.float32)


def gram_product_svd(b: Tensor, a: Tensor, top: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(U, S, V^T) of B A, B A never formed: S (float64) holds the m singular values the Grams
    resolve, descending (m = 0 when B A is zero); U (d_out x m') and V^T (m' x d_in) in the
    factors' dtype hold the first m' = min(m, top) components (all m when top is None)."""
    gram_b, gram_a = gram(b.T), gram(a)
    return _svd_from_grams(b, a, gram_a, _root(gram_b, cholesky_root(gram_b)), top)


def gram_low_rank(b: Tensor, a: Tensor, tolerance: float) -> tuple[Tensor, Tensor]:
    """B A as factors of its rank: (b, a) themselves when both have full rank R (the product then
    has rank R: nothing to shed), else the balanced U sqrt(S), sqrt(S) V^T over the singular
    values above `tolerance` and the Grams' resolution; in the factors' dtype."""
    gram_b, gram_a = gram(b.T), gram(a)
    upper_b = cholesky_root(gram_b)
    if upper_b is not None and cholesky_root(gram_a) is not None:
        return b, a
    u, s, vh = _svd_from_grams(b, a, gram_a, _root(gram_b, upper_b), None)
    q = int((s > tolerance).sum())
    root = s[:q].sqrt()
    return u[:, :q] * root.to(u.dtype), root.to(vh.dtype)[:, None] * vh[:q]


def gram(x: Tensor) -> Tensor:
    """x x^T in float64 (x is R x n, n large), by BLAS syrk, on torch's threads.

    numpy's matmul computes y y^T by syrk (half the products of a general matrix product;
    torch's matmul has no such case): on one core, about twice as fast as torch's on one.
    x is widened to float64 a block of columns at a time, so that the copy stays in cache. The
    blocks' Grams are summed in block order, whichever threads computed them, so the result is
    the same to the bit on any thread count. Outside strategies/per_layer.py's threads (which
    run torch on one thread each), the blocks are shared among torch.get_num_threads() Python
    threads (the cores the ServerApp owns). OpenBLAS always runs on one thread: its own pool
    leaves its idle workers spinning after a call, and beside torch's threads on two busy cores
    that slowed a 7B-shaped round ~40x. numpy releases the GIL for both steps.
    """
    if x.device.type != "cpu":  # numpy's BLAS is the CPU's
        wide = x.to(_GRAM_DTYPE)
        return wide @ wide.T
    narrow, workers = x.detach().numpy(), torch.get_num_threads()
    starts = range(0, narrow.shape[1], _GRAM_BLOCK)

    def block_gram(start: int) -> np.ndarray:
        wide = narrow[:, start : start + _GRAM_BLOCK].astype(np.float64, order="K")
        return wide @ wide.T

    total = np.zeros((narrow.shape[0], narrow.shape[0]))
    with blas_pools().limit(limits=1, user_api="blas"):
        serial = workers == 1 or len(starts) == 1
        for block in map(block_gram, starts) if serial else _workers(workers).map(block_gram, starts):
            total += block
    return torch.from_numpy(total)


@functools.cache
def _workers(count: int) -> ThreadPoolExecutor:
    """Threads for the Grams' blocks (idle ones wait on a queue, they do not spin)."""
    return ThreadPoolExecutor(count, thread_name_prefix="gram")


@functools.cache
def blas_pools() -> ThreadpoolController:
    """The BLAS libraries loaded (numpy's among them), found once."""
    return ThreadpoolController()


def cholesky_root(gram_matrix: Tensor) -> Tensor | None:
    """L^T (upper triangular, L L^T = the Gram) where the Gram is numerically positive definite, else None."""
    lower, info = torch.linalg.cholesky_ex(gram_matrix)
    return lower.T if int(info) == 0 else None


def _root(gram_matrix: Tensor, upper: Tensor | None) -> tuple[Tensor, Tensor]:
    """(W, W^+) with W^T W = the Gram over the directions it resolves: the Cholesky factor where
    there is one, else diag(sqrt(lambda)) V^T over its eigenvalues above R * eps of the largest
    (an all-zero Gram gives 0 x R)."""
    if upper is not None:
        identity = torch.eye(upper.shape[0], dtype=upper.dtype, device=upper.device)
        return upper, torch.linalg.solve_triangular(upper, identity, upper=True)
    values, vectors = torch.linalg.eigh(gram_matrix)
    kept = values > gram_matrix.shape[0] * _EPS * values[-1:].clamp(min=0)
    roots, vectors = values[kept].sqrt(), vectors[:, kept]
    return roots[:, None] * vectors.T, vectors / roots


def _svd_from_grams(
    b: Tensor, a: Tensor, gram_a: Tensor, root: tuple[Tensor, Tensor], top: int | None
) -> tuple[Tensor, Tensor, Tensor]:
    """gram_product_svd's last steps, from A A^T and B's Gram root (W, W^+)."""
    w, w_pinv = root
    squares, vectors = torch.linalg.eigh(w @ gram_a @ w.T)  # (W A)(W A)^T = Y S^2 Y^T
    squares, vectors = squares.flip(0), vectors.flip(1)  # descending
    resolution = (b.shape[1] + max(b.shape[0], a.shape[1]) ** 0.5) * _EPS
    kept = squares > resolution * squares[:1].clamp(min=0)
    s = squares[kept].sqrt()
    vectors = vectors[:, kept][:, :top]
    u = b @ (w_pinv @ vectors).to(b.dtype)
    vh = ((vectors / s[: vectors.shape[1]]).T @ w).to(a.dtype) @ a
    return u, s, vh
