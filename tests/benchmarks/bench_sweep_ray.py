"""A sweep's runs on one Ray instance against each run starting its own Ray (as before).

The tiny experiment of the tests (3 clients, 2 rounds) swept over --seeds seeds, twice in this
process: through `fedlora.sweep.run_sweep` (one Ray instance for all), then each variant
through `fedlora.simulation.simulate` alone (Flower starts and stops Ray for every run, as sweeps
did before). The shared sweep goes first, so whatever this process warms up counts against it. Prints the seconds of every run, the mean per run of each, and the time saved per run;
the load average before and after, since the machine may be shared.

    python -m tests.benchmarks.bench_sweep_ray [--seeds 4]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def main() -> None:
    """Run both ways and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="variants in the sweep (one per seed)")
    args = parser.parse_args()

    from rich.console import Console

    from fedlora.simulation import simulate
    from fedlora.sweep import load_sweep, run_sweep
    from tests.test_report import write_sweep_config

    base = Path(tempfile.mkdtemp(prefix="bench-sweep-ray-"))
    sweep = load_sweep(write_sweep_config(base / "seeds.toml", {"seed": list(range(args.seeds))}))
    print(f"load average before: {os.getloadavg()[0]:.2f} (cpus: {os.cpu_count()})")

    started = time.perf_counter()
    outcomes = run_sweep(sweep, base / "shared", Console(quiet=True))
    shared_total = time.perf_counter() - started
    assert all(outcome.status == "finished" for outcome in outcomes)

    separate = []
    for variant in sweep.variants:
        started = time.perf_counter()
        simulate(variant.config, base / "separate" / variant.name)
        separate.append(time.perf_counter() - started)

    per_run_separate = statistics.mean(separate)
    per_run_shared = shared_total / len(sweep.variants)
    print("each run its own Ray:", ", ".join(f"{s:.1f}" for s in separate), f"s; mean {per_run_separate:.1f} s a run")
    print(f"one Ray for the sweep: {shared_total:.1f} s in all; mean {per_run_shared:.1f} s a run")
    print(f"saved: {per_run_separate - per_run_shared:.1f} s a run ({1 - per_run_shared / per_run_separate:.0%})")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
