"""FedSVD's refactorization of one layer: factored (two thin QRs + an r x r SVD) vs dense SVD.

For a 4096 x 4096 and an 11008 x 4096 layer at rank 16, on 2 CPU threads, times `refactorize`
(median of several runs) against forming M = B A and taking torch.linalg.svd(M,
full_matrices=False) (timed once or twice: it takes seconds), and prints the ratio measured in
this run. It also checks that both agree: B'A' = M and the top-r singular values match.

    python -m tests.benchmarks.bench_fedsvd_layer [--dense-repeats 1] [--factored-repeats 20] [--shapes 4096x4096,11008x4096]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from strategies.fedsvd import refactorize

SHAPES = [(4096, 4096), (11008, 4096)]  # (d_out, d_in): attention and MLP projections of a 7B Llama
RANK = 16


def layer_factors(d_out: int, d_in: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 factors with LoRA-like magnitudes: B small after training, A Kaiming-like."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, RANK, generator=g) * 1e-2, torch.randn(RANK, d_in, generator=g) / d_in**0.5


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls of fn, and its last result."""
    times, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def dense_svd(B: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Singular values of B A the naive way: form the d_out x d_in product, take its full SVD."""
    _, singular_values, _ = torch.linalg.svd(B @ A, full_matrices=False)
    return singular_values


def measure(d_out: int, d_in: int, factored_repeats: int, dense_repeats: int) -> dict[str, float]:
    """Time both ways for one layer and check that they agree."""
    B, A = layer_factors(d_out, d_in)
    refactorize(B, A)  # warm-up: first-call allocations and LAPACK workspace queries
    factored_s, (B_new, A_new) = timed(lambda: refactorize(B, A), factored_repeats)
    dense_s, singular_values = timed(lambda: dense_svd(B, A), dense_repeats)
    product = B.double() @ A.double()
    product_error = torch.linalg.matrix_norm(B_new.double() @ A_new.double() - product)
    product_error /= torch.linalg.matrix_norm(product)
    # The columns of B' have the singular values as norms; the dense float32 SVD is the coarser.
    value_error = (torch.linalg.vector_norm(B_new.double(), dim=0) - singular_values[:RANK].double()).abs().max()
    return {
        "factored_s": factored_s,
        "dense_s": dense_s,
        "ratio": dense_s / factored_s,
        "product_rel_error": float(product_error),
        "singular_value_rel_error": float(value_error / singular_values[0]),
    }


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'4096x4096,11008x4096' -> [(4096, 4096), (11008, 4096)]."""
    shapes = []
    for item in text.split(","):
        d_out, _, d_in = item.strip().partition("x")
        shapes.append((int(d_out), int(d_in)))
    return shapes


def main(
    factored_repeats: int = 20, dense_repeats: int = 1, shapes: list[tuple[int, int]] | None = None
) -> dict[str, dict[str, float]]:
    """Measure every shape, print one line each, and return the figures keyed by shape."""
    torch.set_num_threads(2)
    figures = {}
    for d_out, d_in in shapes or SHAPES:
        row = measure(d_out, d_in, factored_repeats, dense_repeats)
        figures[f"{d_out}x{d_in}"] = row
        print(
            f"fedsvd layer {d_out}x{d_in} r={RANK}: factored {row['factored_s'] * 1e3:.1f} ms, "
            f"dense {row['dense_s']:.1f} s, ratio {row['ratio']:.0f}x "
            f"(B'A' vs BA rel. error {row['product_rel_error']:.1e}, "
            f"singular values rel. error {row['singular_value_rel_error']:.1e})",
            flush=True,
        )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--factored-repeats", type=int, default=20)
    parser.add_argument("--dense-repeats", type=int, default=1)
    parser.add_argument(
        "--shapes",
        type=parse_shapes,
        default=None,
        help="comma-separated d_outxd_in layers (default: 4096x4096,11008x4096; the dense SVD's cost grows as d^3)",
    )
    args = parser.parse_args()
    main(args.factored_repeats, args.dense_repeats, args.shapes)
