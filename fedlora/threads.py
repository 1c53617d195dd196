"""Threads by resource share: each process runs torch (and OpenMP, MKL) on the cores it owns.

A ServerApp beside its own client actors, and each actor beside the others, share the machine.
torch's default, one thread per core, makes every process spread its work over cores that
others are using; under load each parallel region then waits for its descheduled threads, and
aggregation beside three busy clients took up to twice its fair share (issue 18). So the
ServerApp uses `federation.server_cpus` threads, and a client actor the CPUs Ray gave it
(`federation.client_cpus`): whole cores, at least one, never more than the process may run on.
Ray workers start with THREAD_ENV set from the same share (fedlora/simulation.py), so that
OpenMP and MKL size their pools right as torch loads.
"""

from __future__ import annotations

import os
import sys

import torch

# Thread pools that read their size from the environment when their library loads.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cores_owned() -> int:
    """Cores this process may run on (its CPU affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows: no affinity mask
        return os.cpu_count() or 1


def thread_count(cpus: float) -> int:
    """Threads for a share of `cpus` CPUs: its whole cores, at least 1, at most the cores owned."""
    return max(1, min(int(cpus), cores_owned()))


def thread_env(cpus: float) -> dict[str, str]:
    """The environment that sizes OpenMP/MKL/BLAS pools for a share of `cpus`, for processes to come."""
    return dict.fromkeys(THREAD_ENV, str(thread_count(cpus)))


def use_threads(cpus: float) -> int:
    """Size torch's intra-op and inter-op pools for a share of `cpus` CPUs; returns the thread count."""
    threads = thread_count(cpus)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # settable once, before the first inter-op work; that size then stays
            pass
    return threads


def client_cpus() -> float:
    """The CPUs a client owns: what Ray gave the actor it runs in (`federation.client_cpus`, or
    a `flwr run` federation's client resources), else, on a deployed node, every core it may use."""
    ray = sys.modules.get("ray")  # never imported here: a deployed node does not run Ray
    # Only an actor has a grant: the driver of a simulation (a sweep, a test) may have Ray up
    # and still run a client in its own process, where asking Ray for resources fails.
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            return float(cpus)
    return float(cores_owned())
