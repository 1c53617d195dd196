"""A strategy's per-layer work spread over the cores the ServerApp owns, one layer per thread.

The heterogeneous-rank rules and LoRA-FAIR spend a round on independent per-layer work: float64
Gram matrices (BLAS), small eigendecompositions and LoRA-FAIR's path search, many small torch
calls each. Splitting each layer's large products among threads (strategies/gram_svd.py's
blocks, torch's intra-op pool) leaves the small calls serial, and two threads then ran a
7B-shaped round only 1.3x faster than one. Here each layer runs whole on one of the ServerApp's
threads (torch.get_num_threads(), set from `federation.server_cpus`), with torch and BLAS on
one thread each meanwhile: the cores the ServerApp owns, never more. torch and numpy release the
GIL in their kernels, so one thread's Python runs while another's BLAS computes.

A layer is computed by one thread from start to end, on one core: with at least as many layers
as threads (any real adapter), a round's result is the same to the bit on one core or sixteen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

from strategies.gram_svd import blas_pools

Result = TypeVar("Result")


def map_layers(work: Callable[[str], Result], layers: Iterable[str]) -> dict[str, Result]:
    """{layer: work(layer)} for every layer, in order, on torch.get_num_threads() threads.

    `work` must write only its own layer's data (shared inputs it may read). The first
    exception, in layer order, is raised here; layers not yet started are then dropped. One
    layer (or one thread) runs in the caller's thread, on the caller's torch threads."""
    layers = list(layers)
    threads = min(torch.get_num_threads(), len(layers))
    if threads <= 1:
        return {layer: work(layer) for layer in layers}
    before = torch.get_num_threads()
    # torch's count is per thread but its MKL's is not: one for the process while the layers run.
    torch.set_num_threads(1)
    try:
        with blas_pools().limit(limits=1, user_api="blas"):  # nested limits (gram_svd's) restore to one
            results = list(_pool(threads).map(work, layers))
    finally:
        torch.set_num_threads(before)
    return dict(zip(layers, results))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    """Threads running torch on one intra-op thread each; idle ones wait on a queue (they do not
    spin); kept for the process's later rounds."""
    return ThreadPoolExecutor(threads, thread_name_prefix="layers", initializer=torch.set_num_threads, initargs=(1,))
