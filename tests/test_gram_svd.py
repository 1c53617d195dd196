"""The float32 path of the stacked re-factorizations (strategies/gram_svd.py) against float64 dense references.

Clients send float32 factors; FLoRA, FlexLoRA, FedEx-LoRA and LoRA-FAIR re-factorize their
stacks from float64 Gram matrices. Each result must be within RELATIVE of what float64 dense
math gives for the same float32 inputs, also for ill-conditioned stacks: clients nearly
parallel to one broadcast (the usual case a few local steps after it), one A shared by all
clients up to tiny moves (FLoRA's fresh seeded A), moves along one common direction, and
stacks of lower rank than their width.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import gram_svd
from strategies.fedex_lora import residual_stack
from strategies.fedsvd import low_rank, product_svd
from strategies.flexlora import flexlora_aggregate
from strategies.flora import fold, stack
from strategies.gram_svd import gram, gram_product_svd
from strategies.lora_fair import lora_fair_correction

RELATIVE = 1e-5  # issue 28: the fast path's error against the float64 dense reference
KINDS = ("independent", "near_parallel", "shared_a", "common_direction", "identical")


def clients(kind: str, spread: float, d_out: int, d_in: int, k: int, r: int, seed: int = 0):
    """K float32 client factor pairs of the given kind and weights summing to 1 (float64)."""
    g = torch.Generator().manual_seed(seed)

    def noise(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    a0, b0, direction = noise(r, d_in) / d_in**0.5, 1e-2 * noise(d_out, r), noise(r, d_in) / d_in**0.5
    if kind == "independent":
        pairs = [(1e-2 * noise(d_out, r), noise(r, d_in) / d_in**0.5) for _ in range(k)]
    elif kind == "near_parallel":  # every client a small step from the broadcast (b0, a0)
        pairs = [(b0 + spread * 1e-2 * noise(d_out, r), a0 + spread * noise(r, d_in) / d_in**0.5) for _ in range(k)]
    elif kind == "shared_a":  # FLoRA: one seeded A, B trained from zero
        pairs = [(1e-3 * noise(d_out, r), a0 + spread * noise(r, d_in) / d_in**0.5) for _ in range(k)]
    elif kind == "common_direction":  # clients moving along one direction, by different amounts
        pairs = [
            (b0 + 1e-3 * noise(d_out, r), a0 + 1e-2 * (i + 1) * direction + spread * noise(r, d_in) / d_in**0.5) for i in range(k)
        ]
    else:  # identical clients: the stack has rank r whatever its width
        pairs = [(b0, a0)] * k
    weights = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    return [b for b, _ in pairs], [a for _, a in pairs], weights / weights.sum()


def dense_sum(bs, as_, weights) -> torch.Tensor:
    """sum_k p_k B_k A_k, formed densely in float64 (one product of the float64 stacks)."""
    return torch.cat([w * b.double() for w, b in zip(weights.tolist(), bs)], dim=1) @ torch.cat(as_).double()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(actual.double() - expected) / torch.linalg.matrix_norm(expected))


FEDERATIONS = st.tuples(
    st.sampled_from(KINDS),
    st.sampled_from([1e-2, 1e-4, 1e-6]),
    st.integers(16, 300),
    st.integers(16, 300),
    st.integers(1, 10),
    st.sampled_from([1, 4, 16]),
    st.integers(0, 2**31 - 1),
)


@settings(max_examples=40, deadline=None)
@given(FEDERATIONS)
def test_the_product_and_its_best_truncations_are_within_the_bound(federation):
    kind, spread, d_out, d_in, k, r, seed = federation
    bs, as_, weights = clients(kind, spread, d_out, d_in, k, r, seed)
    b_stack, a_stack = stack(bs, as_, weights)
    assert b_stack.dtype == torch.float32
    dense = dense_sum(bs, as_, weights)
    u, s, vh = gram_product_svd(b_stack, a_stack)
    assert relative_error((u.double() * s) @ vh.double(), dense) <= RELATIVE
    exact = torch.linalg.svdvals(dense)
    assert torch.allclose(s, exact[: s.shape[0]], rtol=0, atol=RELATIVE * float(exact[0]))
    for rank in (1, r):  # Eckart-Young: what a truncation leaves is the least any rank-r matrix can
        kept = (u[:, :rank].double() * s[:rank]) @ vh[:rank].double()
        best = float(exact[rank:].square().sum().sqrt())
        assert float(torch.linalg.matrix_norm(dense - kept)) <= best + RELATIVE * float(torch.linalg.matrix_norm(dense))


@pytest.mark.parametrize(
    ("kind", "spread", "size"),
    [
        # A 7B q/k/v/o projection, 10 clients at rank 16 (bench_hetero's shapes). Clients 1e-4
        # apart make FedEx-LoRA's residual ~1e-8 of the products: the dense float64 reference,
        # a difference of the two, is itself good to ~1e-8 of it (at 1e-5 apart, only to ~1e-5).
        ("near_parallel", 1e-4, 4096),
        ("shared_a", 1e-5, 2048),
        ("independent", 1.0, 1024),
        ("identical", 0.0, 1024),
    ],
)
def test_flora_flexlora_fedex_at_a_7b_projections_scale(kind, spread, size):
    bs, as_, weights = clients(kind, spread, size, size, 10, 16)
    dense = dense_sum(bs, as_, weights)
    # FLoRA: the stack folded into the merged delta, at its numerical rank.
    u, v = fold(None, None, *stack(bs, as_, weights))
    assert u.dtype == torch.float32 and relative_error(u.double() @ v.double(), dense) <= RELATIVE
    if kind == "identical":
        assert u.shape[1] == 16  # the stack's rank, not its width
    # FlexLoRA: the top 16 components, as good as the best rank-16 approximation (dW's singular
    # values from the float64 stack's Householder QRs: a dense SVD of 4096 x 4096 takes minutes).
    top = flexlora_aggregate(bs, as_, weights, [16])[16]
    exact = product_svd(*stack([b.double() for b in bs], [a.double() for a in as_], weights))[1]
    left = float(torch.linalg.matrix_norm(dense - top.B.double() @ top.A.double()))
    assert left <= float(exact[16:].square().sum().sqrt()) + RELATIVE * float(exact.square().sum().sqrt())
    # FedEx-LoRA: the residual sum p_k B_k A_k - B̄ Ā, however small next to the products.
    b_mean, a_mean, u_stack, v_stack = residual_stack(bs, as_, weights)
    residual = fold(None, None, u_stack, v_stack)
    expected = dense - b_mean @ a_mean
    if kind == "identical":
        assert residual is None
    else:
        assert relative_error(residual[0].double() @ residual[1].double(), expected) <= RELATIVE


@pytest.mark.parametrize("kind", ["independent", "near_parallel", "common_direction"])
def test_lora_fair_on_float32_factors_matches_float64(kind):
    bs, as_, weights = clients(kind, 1e-3, 2048, 1024, 10, 16)
    b_new, a_new = lora_fair_correction(bs, as_, weights, 0.01)
    b_ref, a_ref = lora_fair_correction([b.double() for b in bs], [a.double() for a in as_], weights, 0.01)
    assert b_new.dtype == torch.float32
    assert relative_error(b_new, b_ref) <= RELATIVE and relative_error(a_new, a_ref) <= RELATIVE


def test_low_rank_keeps_float32_factors_of_full_rank_as_they_are():
    bs, as_, weights = clients("near_parallel", 1e-3, 300, 200, 4, 8)
    b, a = stack(bs, as_, weights)
    u, v = low_rank(b, a)
    assert u is b and v is a  # rank 32 = the width: nothing to shed, no re-factorization


def test_a_zero_product_has_no_components():
    u, s, vh = gram_product_svd(torch.zeros(50, 8), torch.randn(8, 40))
    assert u.shape == (50, 0) and s.shape == (0,) and vh.shape == (0, 40)
    assert low_rank(torch.zeros(50, 8), torch.randn(8, 40))[0].shape == (50, 0)


def test_the_grams_blas_runs_on_one_thread(monkeypatch):
    asked: list[int] = []
    pools = gram_svd.blas_pools()
    real_limit = pools.limit

    def limit(**kwargs):
        asked.append(kwargs["limits"])
        return real_limit(**kwargs)

    monkeypatch.setattr(pools, "limit", limit)
    x = torch.randn(16, 3000)
    saved = torch.get_num_threads()
    try:
        for threads in (1, 2):  # torch's threads share the blocks out, each on a one-thread BLAS
            torch.set_num_threads(threads)
            torch.testing.assert_close(gram(x), x.double() @ x.double().T)
            torch.testing.assert_close(gram(x.T.contiguous().T), x.double() @ x.double().T)
    finally:
        torch.set_num_threads(saved)
    assert asked == [1, 1, 1, 1]  # OpenBLAS's own pool would leave idle workers spinning beside torch's
