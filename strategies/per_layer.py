"""A strategy's per-layer work spread over the cores the ServerApp owns, one layer per thread.

The heterogeneous-rank rules and LoRA-FAIR spend a round on independent per-layer work: float64
Gram matrices (BLAS), small eigendecompositions and LoRA-FAIR's path search, many small torch
calls each. Splitting each layer's large products among threads (strategies/gram_svd.py's
blocks, torch's intra-op pool) leaves the small calls serial, and two threads then ran a
7B-shaped round only 1.3x faster than one. Here each layer runs whole on one of the ServerApp's
threads (torch.get_num_threads(), set from `federation.server_cpus`), with torch and BLAS on
one thread each meanwhile: the cores the ServerApp owns, never more. torch and numpy release the
GIL in their kernels, so one thread's Python runs while another's BLAS computes.

A layer is computed by one thread from start to end, and strategies/gram_svd.py sums its
blocks in the same order on any thread count: a round's result is the same to the bit on one
core or sixteen (tests/test_per_layer.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import TypeVar

import torch

from strategies.gram_svd import blas_pools

Result = TypeVar("Result")


def map_layers(work: Callable[[str], Result], layers: Iterable[str]) -> dict[str, Result]:
    """{layer: work(layer)} for every layer, in order, on torch.get_num_threads() threads.

    `work` must write only its own layer's data (shared inputs it may read). After a failure
    the layers not started yet are dropped, those running finish, and the first failure in
    layer order is raised. A single layer (or a single thread) runs in the caller's thread,
    with torch on one thread meanwhile."""
    layers = list(layers)
    before = torch.get_num_threads()
    threads = min(before, len(layers))
    if before > 1:
        # The pool's threads run torch on one thread each (their own setting); the process-wide
        # count, which some of torch's kernels read, is one too while they run (without it, two
        # threads' results differed from one thread's in their last bits, now and then), and so
        # is a single layer's, run in the caller's thread: the same arithmetic on any count.
        torch.set_num_threads(1)
    try:
        with blas_pools().limit(limits=1, user_api="blas"):  # nested limits (gram_svd's) restore to one
            if threads <= 1:
                results = [work(layer) for layer in layers]
            else:
                futures = [_pool(threads).submit(work, layer) for layer in layers]
                wait(futures, return_when=FIRST_EXCEPTION)
                for future in futures:
                    future.cancel()  # after a failure: the layers not started yet
                wait(futures)  # those running finish before the thread counts are put back
                results = [future.result() for future in futures]  # the first failure, in layer order, raises
    finally:
        if before > 1:
            torch.set_num_threads(before)
    return dict(zip(layers, results))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """Threads running torch on one intra-op thread each; idle ones wait on a queue (they do not
    spin); kept for the process's later rounds."""
    return ThreadPoolExecutor(threads, thread_name_prefix="layers", initializer=torch.set_num_threads, initargs=(1,))
