"""FLoRA, FlexLoRA, FedEx-LoRA, RoLoRA and FedSA-LoRA against dense float64 references, mixed client ranks included."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from strategies.fedex_lora import pad_rank, residual_stack
from strategies.fedsa_lora import fedsa_aggregate
from strategies.fedsvd import low_rank
from strategies.flexlora import flexlora_aggregate
from strategies.flora import stack, stack_bytes
from strategies.rolora import factor_of_round, rolora_aggregate

SEED = st.integers(min_value=0, max_value=2**31 - 1)
RANKS = st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=5)


@st.composite
def federations(draw):
    """(seed, d_out, d_in, client ranks): dimensions down to 1, so that sum r_k often exceeds d_out or d_in."""
    return draw(SEED), draw(st.integers(1, 20)), draw(st.integers(1, 20)), draw(RANKS)


def clients(seed: int, d_out: int, d_in: int, ranks: list[int], dtype=torch.float64):
    """One (B_k, A_k) per rank and example weights summing to 1."""
    g = torch.Generator().manual_seed(seed)
    bs = [torch.randn(d_out, r, generator=g, dtype=torch.float64).to(dtype) for r in ranks]
    as_ = [torch.randn(r, d_in, generator=g, dtype=torch.float64).to(dtype) for r in ranks]
    return bs, as_, torch.softmax(torch.randn(len(ranks), generator=g, dtype=torch.float64), 0)


def dense_average(bs, as_, p) -> torch.Tensor:
    """dW = sum_k p_k B_k A_k, formed densely (the peers' computation)."""
    return sum(w * b.double() @ a.double() for w, b, a in zip(p.tolist(), bs, as_))


def close(actual: torch.Tensor, expected: torch.Tensor, scale: float, tol: float = 1e-10) -> None:
    torch.testing.assert_close(actual.double(), expected, atol=tol * max(scale, 1e-300), rtol=0)


@settings(max_examples=100, deadline=None)
@given(federations())
def test_flora_stack_is_the_exact_sum_of_products(federation):
    seed, d_out, d_in, ranks = federation
    bs, as_, p = clients(seed, d_out, d_in, ranks)
    b, a = stack(bs, as_, p)
    assert b.shape == (d_out, sum(ranks)) and a.shape == (sum(ranks), d_in)
    reference = dense_average(bs, as_, p)
    close(b @ a, reference, float(reference.abs().max()), 1e-13)
    assert stack_bytes(bs, as_) == 8 * sum(ranks) * (d_out + d_in)


def test_stack_refuses_mismatched_factors():
    with pytest.raises(ValueError, match="not a factor pair"):
        stack([torch.ones(3, 2)], [torch.ones(3, 4)], torch.ones(1))


@settings(max_examples=150, deadline=None)
@given(federations(), st.lists(st.integers(1, 12), min_size=1, max_size=3))
@example((0, 16, 16, [2, 4, 8]), [2, 4, 8])
@example((1, 3, 20, [8, 8]), [4, 8])  # R = 16 > d_out = 3
@example((2, 20, 2, [4, 1]), [1, 4])  # R > d_in and r > d_in
def test_flexlora_matches_the_dense_truncated_svd(federation, asked):
    seed, d_out, d_in, ranks = federation
    bs, as_, p = clients(seed, d_out, d_in, ranks)
    reference = dense_average(bs, as_, p)
    u, s, vh = torch.linalg.svd(reference, full_matrices=False)
    result = flexlora_aggregate(bs, as_, p, asked)
    assert sorted(result) == sorted(set(asked))
    for r, truncated in result.items():
        assert truncated.B.shape == (d_out, r) and truncated.A.shape == (r, d_in)
        best = (u[:, :r] * s[:r]) @ vh[:r]  # Eckart-Young: the best rank-r approximation
        close(truncated.B @ truncated.A, best, float(s[0]))
        dropped = float(s[r:].square().sum().sqrt())
        assert truncated.error == pytest.approx(dropped, abs=1e-9 * float(s[0]))
        assert truncated.relative_error == pytest.approx(dropped / float(s.square().sum().sqrt()), abs=1e-9)
        # Balanced: B^T B = A A^T = diag(S_r) over the components the product has.
        m = min(r, int((s > 1e-8 * float(s[0])).sum()))
        close((truncated.B.T @ truncated.B)[:m, :m], torch.diag(s[:m]), float(s[0]))
        close((truncated.A @ truncated.A.T)[:m, :m], torch.diag(s[:m]), float(s[0]))


def test_flexlora_components_the_product_lacks_stay_trainable():
    # Two rank-1 clients: dW has rank 2, a rank-4 client gets 2 zero columns of B with unit rows of A.
    bs, as_, p = clients(3, 6, 5, [1, 1])
    truncated = flexlora_aggregate(bs, as_, p, [4])[4]
    assert not torch.any(truncated.B[:, 2:])
    torch.testing.assert_close(truncated.A[2:] @ truncated.A[2:].T, torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(truncated.A[2:] @ truncated.A[:2].T, torch.zeros(2, 2, dtype=torch.float64))
    close(truncated.B @ truncated.A, dense_average(bs, as_, p), 1.0)
    assert truncated.error == pytest.approx(0, abs=1e-12)


def test_flexlora_keeps_the_clients_dtype():
    bs, as_, p = clients(4, 8, 8, [2, 4], torch.float32)
    truncated = flexlora_aggregate(bs, as_, p, [6])[6]  # dW has rank 6: no truncation
    assert truncated.B.dtype == torch.float32 and truncated.A.dtype == torch.float32
    reference = dense_average(bs, as_, p)
    assert float((truncated.B.double() @ truncated.A.double() - reference).norm() / reference.norm()) < 1e-5


@settings(max_examples=150, deadline=None)
@given(federations())
@example((0, 16, 16, [2, 4, 8]))
@example((1, 3, 20, [8, 8, 8]))
def test_fedex_average_plus_residual_is_exact(federation):
    seed, d_out, d_in, ranks = federation
    top = max(ranks)
    bs, as_, p = clients(seed, d_out, d_in, ranks)
    reference = dense_average(bs, as_, p)
    padded = [pad_rank(b, a, top) for b, a in zip(bs, as_)]
    b_mean, a_mean, u_stack, v_stack = residual_stack(bs, as_, p)
    assert u_stack.shape[1] == (len(ranks) - 1) * top  # the clients' differences from the last one
    close(
        b_mean @ a_mean + u_stack @ v_stack,
        reference,
        sum(w * float(b.norm() * a.norm()) for w, b, a in zip(p.tolist(), bs, as_)),
    )
    u, v = low_rank(u_stack, v_stack)
    close(b_mean, sum(w * b for w, (b, _) in zip(p.tolist(), padded)), 1.0, 1e-13)
    close(a_mean, sum(w * a for w, (_, a) in zip(p.tolist(), padded)), 1.0, 1e-13)
    scale = sum(w * float(b.norm() * a.norm()) for w, b, a in zip(p.tolist(), bs, as_))
    assert u.shape[1] == v.shape[0] <= min(d_out, d_in, (len(ranks) - 1) * top)
    close(b_mean @ a_mean + u @ v, reference, scale)


def test_fedex_identical_clients_need_no_residual():
    bs, as_, _ = clients(5, 7, 9, [4])
    u, v = low_rank(*residual_stack(bs * 3, as_ * 3, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))[2:])
    assert u.shape == (7, 0) and v.shape == (0, 9)


def test_fedex_uniform_residual_rank_at_most_k_r():
    bs, as_, p = clients(6, 30, 30, [3, 3, 3])
    u, _ = low_rank(*residual_stack(bs, as_, p)[2:])
    assert u.shape[1] <= 9


@settings(max_examples=60, deadline=None)
@given(federations(), st.integers(1, 4))
def test_rolora_round_average_is_the_exact_product_average(federation, server_round):
    seed, d_out, d_in, ranks = federation
    r = ranks[0]
    part = factor_of_round(server_round)
    bs, as_, p = clients(seed, d_out, d_in, [r] * len(ranks))
    if part == "B":  # every client trained B against the broadcast A
        trained, shared = bs, as_[0]
        products = [b @ shared for b in bs]
    else:
        trained, shared = as_, bs[0]
        products = [shared @ a for a in as_]
    b, a = rolora_aggregate(shared, trained, p, part)
    reference = sum(w * m for w, m in zip(p.tolist(), products))
    close(b @ a, reference, float(reference.abs().max()) + 1.0)


def test_rolora_alternates_starting_with_b():
    assert [factor_of_round(t) for t in range(1, 6)] == ["B", "A", "B", "A", "B"]


@settings(max_examples=40, deadline=None)
@given(federations())
def test_fedsa_averages_a_and_keeps_the_initial_b(federation):
    """The paper's rule: A is averaged; no B_k reaches the server, whose model keeps the initial B."""
    seed, d_out, d_in, ranks = federation
    bs, as_, p = clients(seed, d_out, d_in, [ranks[0]] * len(ranks))
    b, a = fedsa_aggregate(bs[0], as_, p)
    close(a, sum(w * x for w, x in zip(p.tolist(), as_)), 1.0, 1e-13)
    assert b is bs[0]
