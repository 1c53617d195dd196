"""FedSVD's refactorization against a dense SVD of B A, on small random factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from strategies.fedsvd import refactorize

DIM = st.integers(min_value=1, max_value=24)
SEED = st.integers(min_value=0, max_value=2**31 - 1)
LOG_SCALE = st.floats(min_value=-3, max_value=2)


def factors(seed: int, d_out: int, d_in: int, r: int, dtype: torch.dtype = torch.float64, log_scale: float = 0.0):
    """Random B (d_out x r) and A (r x d_in), B scaled by 10**log_scale."""
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64) * 10**log_scale
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    return B.to(dtype), A.to(dtype)


def relative_error(B_new: torch.Tensor, A_new: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
    """||B'A' - BA||_F / ||BA||_F, both products formed densely in float64."""
    reference = B.double() @ A.double()
    error = torch.linalg.matrix_norm(B_new.double() @ A_new.double() - reference)
    return float(error / torch.linalg.matrix_norm(reference))


@st.composite
def shapes(draw, max_rank_over: int = 0):
    """(d_out, d_in, r) with 1 <= r <= min(d_out, d_in) + max_rank_over."""
    d_out, d_in = draw(DIM), draw(DIM)
    return d_out, d_in, draw(st.integers(1, min(d_out, d_in) + max_rank_over))


@settings(max_examples=150, deadline=None)
@given(shape=shapes(), seed=SEED, log_scale=LOG_SCALE)
@example(shape=(16, 16, 1), seed=0, log_scale=0.0)
@example(shape=(20, 7, 7), seed=1, log_scale=0.0)
@example(shape=(5, 19, 5), seed=2, log_scale=-3.0)
def test_product_preserved_and_rows_orthonormal_float32(shape, seed, log_scale):
    d_out, d_in, r = shape
    B, A = factors(seed, d_out, d_in, r, torch.float32, log_scale)
    B_new, A_new = refactorize(B, A)
    assert B_new.shape == B.shape and A_new.shape == A.shape
    assert B_new.dtype == torch.float32 and A_new.dtype == torch.float32
    assert relative_error(B_new, A_new, B, A) < 1e-5
    torch.testing.assert_close(A_new.double() @ A_new.double().T, torch.eye(r, dtype=torch.float64), atol=1e-5, rtol=0)


@settings(max_examples=150, deadline=None)
@given(shape=shapes(), seed=SEED, log_scale=LOG_SCALE)
@example(shape=(12, 9, 9), seed=3, log_scale=0.0)
def test_matches_dense_svd(shape, seed, log_scale):
    d_out, d_in, r = shape
    B, A = factors(seed, d_out, d_in, r, torch.float64, log_scale)
    B_new, A_new = refactorize(B, A)
    U, S, Vh = torch.linalg.svd(B @ A, full_matrices=False)
    top = S[:r]
    # B' = U S: orthogonal columns whose norms are the singular values, in descending order.
    torch.testing.assert_close(B_new.T @ B_new, torch.diag(top**2), atol=1e-10 * float(S[0]) ** 2, rtol=0)
    for i in _well_separated(S, r):
        sign = torch.sign(A_new[i] @ Vh[i])
        torch.testing.assert_close(A_new[i], sign * Vh[i], atol=1e-8, rtol=0)
        torch.testing.assert_close(B_new[:, i] / S[i], sign * U[:, i], atol=1e-8, rtol=0)


def _well_separated(S: torch.Tensor, r: int) -> list[int]:
    """Indices i < r whose singular value is nonzero and 1e-3-relatively apart from its neighbours,
    so that its singular vectors are determined up to sign (and stable to rounding)."""
    gap = 1e-3 * float(S[0])
    # B A has rank <= r: what follows the top r singular values is (numerically) zero.
    padded = torch.cat([S.new_full((1,), float("inf")), S[:r], S.new_zeros(1)])
    return [i for i in range(r) if min(padded[i] - padded[i + 1], padded[i + 1] - padded[i + 2]) > gap]


@settings(max_examples=100, deadline=None)
@given(shape=shapes(max_rank_over=6), seed=SEED)
@example(shape=(3, 10, 6), seed=0)  # r > d_out only: A' keeps r orthonormal rows
@example(shape=(10, 3, 6), seed=0)  # r > d_in: only d_in rows can be orthonormal
def test_rank_above_layer_dimensions(shape, seed):
    d_out, d_in, r = shape
    B, A = factors(seed, d_out, d_in, r)
    B_new, A_new = refactorize(B, A)
    assert B_new.shape == (d_out, r) and A_new.shape == (r, d_in)
    assert relative_error(B_new, A_new, B, A) < 1e-12
    # The first min(r, d_in) rows of A' are orthonormal, any others zero (with zero columns of B').
    k = min(r, d_in)
    expected = torch.zeros(r, r, dtype=torch.float64)
    expected[:k, :k] = torch.eye(k, dtype=torch.float64)
    torch.testing.assert_close(A_new @ A_new.T, expected, atol=1e-12, rtol=0)
    assert not torch.any(B_new[:, min(r, d_out, d_in) :])


@pytest.mark.parametrize("case", ["duplicate-columns", "zero-A", "rank-one-A"])
def test_rank_deficient_factors(case):
    B, A = factors(5, 9, 8, 4)
    if case == "duplicate-columns":
        B[:, 1] = B[:, 0]
    elif case == "zero-A":
        A.zero_()
    else:
        A = torch.outer(torch.randn(4, dtype=torch.float64), A[0])
    B_new, A_new = refactorize(B, A)
    torch.testing.assert_close(B_new @ A_new, B @ A, atol=1e-12, rtol=0)
    torch.testing.assert_close(A_new @ A_new.T, torch.eye(4, dtype=torch.float64), atol=1e-12, rtol=0)


def test_zero_B_returned_unchanged():
    B = torch.zeros(6, 3)
    A = torch.randn(3, 5)
    B_new, A_new = refactorize(B, A)
    assert B_new is B and A_new is A


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_preserved(dtype):
    B, A = factors(7, 10, 12, 4, dtype)
    B_new, A_new = refactorize(B, A)
    assert B_new.dtype == dtype and A_new.dtype == dtype


@pytest.mark.parametrize(("b_shape", "a_shape"), [((6, 3), (4, 5)), ((6,), (3, 5)), ((6, 3), (3, 5, 1)), ((6, 0), (0, 5))])
def test_bad_shapes_raise(b_shape, a_shape):
    with pytest.raises(ValueError):
        refactorize(torch.ones(b_shape), torch.ones(a_shape))
