"""The server's aggregation quiet and beside busy client processes, against its fair share.

A ServerApp aggregates while Ray's client actors may still be busy on the same cores. Here each
strategy's `aggregate_train` (bench_reply_path's Llama-7B-shaped replies) runs once with
nothing of ours beside it and once beside --busy single-threaded processes spinning in Python.
Fair share: with R runnable threads on C cores each gets C/R of a core, so a round run under
R1 runnable takes quiet x max(1, R1/C) / max(1, R0/C), R0 being the runnable count of the quiet
run. Nominally R0 is the server's threads and R1 adds the busy processes; on a shared machine
others' work counts too, so R0 and R1 are also read from the kernel (procs_running in
/proc/stat, sampled around every timed call) and the expectation uses them. The ratio printed
is the loaded time over that expectation: above 1, the server loses more than its share
(threads waiting on descheduled threads). Processes of other niceness weigh differently in the
kernel's shares than a count says, so the CPU time the server burns, loaded over quiet, is
printed too: about 1 when no thread spins or waits for another, whatever else runs. Medians of
--repeats.

    python -m tests.benchmarks.bench_loaded [--layers 4] [--busy 3] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app import ConfigRecord

from fedlora.config import FederationConfig
from fedlora.threads import cores_owned, use_threads
from strategies import STRATEGIES
from tests.benchmarks.bench_reply_path import replies, timed
from tests.conftest import task_identity

# Busy in Python until its parent is gone (so that a killed benchmark leaves none behind).
SPIN = "import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(1_000_000): pass"


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` single-threaded Python processes spinning on the cores while it lasts."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(count)]
    try:
        time.sleep(0.5)  # let them start and take their cores
        yield
    finally:
        for process in spinners:
            process.kill()
            process.wait()


def runnable() -> int | None:
    """Threads running or ready to run on this machine now, this one included (Linux), else None."""
    try:
        with open("/proc/stat") as stat:
            return next(int(line.split()[1]) for line in stat if line.startswith("procs_running"))
    except (OSError, StopIteration):
        return None


def median_round(name: str, layers: int, clients: int, repeats: int, nominal: int) -> tuple[float, float, float]:
    """Median wall and CPU seconds of one strategy's aggregate_train on round-1 replies, and the mean runnable count."""
    strategy, initial, messages = replies(STRATEGIES[name], layers, clients)
    times, cpu_times, counts = [], [], []
    for _ in range(repeats):
        list(strategy.configure_train(1, initial, ConfigRecord(), grid=None))
        counts.append(runnable())
        cpu_started = time.process_time()
        times.append(timed(lambda: strategy.aggregate_train(1, messages)))
        cpu_times.append(time.process_time() - cpu_started)
        counts.append(runnable())
    seen = [count for count in counts if count is not None]
    return statistics.median(times), statistics.median(cpu_times), (statistics.mean(seen) if seen else nominal)


def main(
    layers: int = 4, clients: int = 10, busy: int = 3, repeats: int = 3, threads: int | None = None
) -> dict[str, dict[str, float]]:
    """Print and return, per strategy: quiet and loaded seconds and runnable counts, the fair-share expectation, the ratio."""
    threads = use_threads(FederationConfig().server_cpus if threads is None else threads)
    cores = cores_owned()
    print(
        f"aggregation quiet and beside {busy} busy processes: {layers} Llama-7B-shaped layers, {clients} replies,"
        f" {threads} server thread(s) on {cores} cores; nominal fair share {max(1.0, (busy + threads) / cores):.2f} x quiet;"
        f" load average {', '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    figures = {}
    with task_identity():
        for name in STRATEGIES:
            quiet, quiet_cpu, quiet_runnable = median_round(name, layers, clients, repeats, threads)
            with busy_processes(busy):
                loaded, loaded_cpu, loaded_runnable = median_round(name, layers, clients, repeats, threads + busy)
            share = max(1.0, loaded_runnable / cores) / max(1.0, quiet_runnable / cores)
            row = figures[name] = {
                "quiet_s": quiet,
                "loaded_s": loaded,
                "quiet_runnable": quiet_runnable,
                "loaded_runnable": loaded_runnable,
                "fair_s": quiet * share,
                "cpu_ratio": loaded_cpu / quiet_cpu,
            }
            row["ratio"] = loaded / row["fair_s"]
            print(
                f"  {name:<10} quiet {quiet:7.3f} s ({quiet_runnable:4.1f} runnable)"
                f"   loaded {loaded:7.3f} s ({loaded_runnable:4.1f} runnable)"
                f"   fair share {row['fair_s']:7.3f} s   loaded / fair {row['ratio']:5.2f};"
                f" CPU time loaded / quiet {row['cpu_ratio']:5.2f}",
                flush=True,
            )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--busy", type=int, default=3, help="busy single-threaded processes beside the server")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="server threads (default: federation.server_cpus)")
    args = parser.parse_args()
    main(args.layers, args.clients, args.busy, args.repeats, args.threads)
