"""Server aggregation of one round, for adapters shaped like a 7B Llama, per strategy.

32 decoder layers; q, k, v, o of 4096 x 4096, gate and up of 11008 x 4096, down of 4096 x 11008;
rank 16; 10 clients. Each strategy's `aggregate_factors` runs in a fresh subprocess so that the
peak resident memory it reports is its own; the clients' adapters are part of that peak (they
are the input), and the ratio printed is peak / size of the clients' adapters. With few layers
the process's own footprint (Python, torch, Flower) weighs in that ratio, so on Linux the peak
from just before the adapters are built, above the memory the process held then, is given
relative to the adapters too (ideal: about 1 x, the inputs plus a small output).

    python -m tests.benchmarks.bench_aggregation [--layers 32] [--clients 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedlora.lora import LoraState
from fedlora.roster import Roster

SHAPES = {  # (d_out, d_in) per projection of one Llama-7B decoder layer
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
RANK = 16


def llama_states(
    layers: int, clients: int, trains: str, seed: int = 0, initial: Callable[[LoraState], LoraState] = lambda state: state
) -> tuple[LoraState, list[LoraState]]:
    """A global state (a strategy's `initial` state of random factors: Fed-SB's and RAVAN's hold their
    cores only from there) and the clients' trained factors (random, as after local training)."""
    g = torch.Generator().manual_seed(seed)
    global_state = LoraState()
    for i in range(layers):
        for name, (d_out, d_in) in SHAPES.items():
            layer = f"model.layers.{i}.{name}"
            global_state.factors[layer] = {
                "A": torch.randn(RANK, d_in, generator=g) / d_in**0.5,
                "B": torch.randn(d_out, RANK, generator=g) * 1e-3,
            }
    global_state = initial(global_state)
    updates = []
    for _ in range(clients):
        updates.append(
            LoraState(
                factors={
                    layer: {part: t + 1e-3 * torch.randn(t.shape, generator=g) for part, t in parts.items() if part in trains}
                    for layer, parts in global_state.factors.items()
                }
            )
        )
    return global_state, updates


def measure_one(strategy_name: str, layers: int, clients: int) -> dict[str, float]:
    """Time one aggregation by the named strategy (run in its own process)."""
    from strategies import STRATEGIES

    torch.set_num_threads(2)
    cls = STRATEGIES[strategy_name]
    roster = Roster({i: i for i in range(clients)}, {i: 100 for i in range(clients)})
    strategy = cls(roster, clients_per_round=clients, seed=0, train_head=False)
    baseline = resident_bytes(reset_peak=True)  # the process before any adapter
    global_state, updates = llama_states(layers, clients, cls.trains, initial=strategy.initial_state)
    strategy.global_state = global_state
    strategy.server_round = 1
    weights = torch.rand(clients, dtype=torch.float64) + 0.5
    weights /= weights.sum()
    adapter_bytes = sum(u.factor_bytes() for u in updates)
    started = time.perf_counter()
    strategy.aggregate_factors(strategy.global_state, updates, weights)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peak_since = proc_status_bytes("VmHWM") if baseline is not None else None
    return {
        "seconds": seconds,
        "peak_bytes": peak,
        "adapter_bytes": adapter_bytes,
        "baseline_bytes": baseline,
        "peak_since_baseline_bytes": peak_since,
    }


def proc_status_bytes(key: str) -> int | None:
    """A memory figure of this process from /proc/self/status (Linux), or None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def resident_bytes(reset_peak: bool = False) -> int | None:
    """Resident memory now; with reset_peak, also restart the peak (VmHWM) from here (Linux).

    Importing torch and Flower peaks higher than the process then stays, so ru_maxrss alone
    cannot tell what the adapters and the aggregation added.
    """
    now = proc_status_bytes("VmRSS")
    if reset_peak and now is not None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
        except OSError:
            return None
    return now


def main(layers: int = 32, clients: int = 10) -> dict[str, dict[str, float]]:
    """Print and return, per strategy: seconds, peak memory, and its ratio to the adapters."""
    from strategies import STRATEGIES

    figures = {}
    print(f"server aggregation, Llama-7B-shaped adapters: {layers} layers x 7 projections, r={RANK}, {clients} clients")
    for name in STRATEGIES:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.benchmarks.bench_aggregation",
                "--one",
                name,
                "--layers",
                str(layers),
                "--clients",
                str(clients),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        figures[name] = result
        ratio = result["peak_bytes"] / result["adapter_bytes"]
        above = ""
        if result.get("peak_since_baseline_bytes") is not None:
            result["above_baseline_ratio"] = (result["peak_since_baseline_bytes"] - result["baseline_bytes"]) / result[
                "adapter_bytes"
            ]
            above = (
                f"; above the {result['baseline_bytes'] / 2**30:.2f} GiB the process held before them:"
                f" {result['above_baseline_ratio']:4.2f} x"
            )
        print(
            f"  {name:<10} {result['seconds']:7.2f} s   peak memory {result['peak_bytes'] / 2**30:5.2f} GiB"
            f" = {ratio:4.2f} x the clients' adapters ({result['adapter_bytes'] / 2**30:.2f} GiB){above}",
            flush=True,
        )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--one", help="measure only this strategy and print JSON (internal)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(args.one, args.layers, args.clients)))
    else:
        main(args.layers, args.clients)
