"""The CUDA path measured in one run: a federation sharing one GPU, and the DP step ratios on it.

On a machine with one GPU and a CUDA build of torch this takes a few minutes:

1. federation: a simulated federation on Ray, 50 clients, 10 a round, each client actor given
   federation.client_gpus = 0.1 of the GPU (the round's 10 actors share it), all-MiniLM-L6-v2,
   the server evaluating on the GPU (federation.server_device = "cuda"). Printed: clients
   trained per second over the rounds after the first (which builds the actors' models); the
   device's peak memory in use in each round, every process on it counted (torch's
   mem_get_info sampled in a thread here), which stays flat across rounds when nothing leaks;
   and the server process's own peak allocation per round.
2. dp steps: a client's step under DP-SGD against the same step without it (bench_dp_step),
   for MiniLM and a RoBERTa-large-shaped model built from a config, B only and A+B, with
   Opacus's per-sample gradient hooks and with ghost clipping. The target: B only, DP / no DP
   at most 1.25 on a GPU.

--cpu-smoke runs the same code on CPU at toy sizes (6 clients, 3 a round, 2 rounds, the tiny
model, no GPU share, 2 DP steps): what tests/test_gpu_check.py runs. --out writes the figures
as JSON. Packages the machine lacks are named, with the pip line that brings them, before
anything starts.

    python -m tests.benchmarks.gpu_check [--rounds 4] [--out gpu_check.json]
    python -m tests.benchmarks.gpu_check --cpu-smoke
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # before Ray is imported

import torch  # noqa: E402

# What the check imports (module -> pip distribution); torch itself must be a CUDA build.
NEEDED = {"flwr": "flwr[simulation]", "ray": "ray", "peft": "peft", "opacus": "opacus", "transformers": "transformers"}
DP_TARGET = 1.25  # B only, DP / no DP, on a GPU (issue 18)
GPU_FEDERATION = [
    "model.name='minilm'",
    "data.partition='iid'",
    "federation.num_clients=50",
    "federation.clients_per_round=10",
    "federation.client_gpus=0.1",
    "federation.client_cpus=1",
    "federation.server_device='cuda'",
    "federation.local_steps=10",
    "federation.batch_size=16",
]
SMOKE_FEDERATION = [
    "federation.num_clients=6",
    "federation.clients_per_round=3",
    "federation.client_cpus=0.5",
    "federation.local_steps=2",
]
DP_MODELS = {"gpu": ("default", "roberta-large-shape"), "smoke": ("tiny",)}


def missing_packages() -> list[str]:
    """The pip requirements of NEEDED modules that cannot be imported here."""
    return [requirement for module, requirement in NEEDED.items() if importlib.util.find_spec(module) is None]


class DeviceMemory:
    """The device's memory in use (all processes), sampled every `period` seconds; peaks per round."""

    def __init__(self, device: torch.device, period: float = 0.05) -> None:
        self.device, self.period = device, period
        self.peak, self.peaks = 0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def in_use(self) -> int:
        """Bytes in use on the device now, by every process (0 off CUDA)."""
        if self.device.type != "cuda":
            return 0
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(self.period):
            self.peak = max(self.peak, self.in_use())

    def start(self) -> None:
        self._thread.start()

    def end_round(self) -> None:
        """Close a round: keep its peak and start the next from the memory in use now."""
        self.peaks.append(max(self.peak, self.in_use()))
        self.peak = self.in_use()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def server_peak(device: torch.device) -> int:
    """The server process's peak allocation on the device since the last call (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def run_federation(base: dict[str, Any], overrides: list[str], rounds: int, device: torch.device) -> dict[str, Any]:
    """One simulated federation; clients per second after round 1, device memory per round."""
    from fedlora.config import config_from_dict
    from fedlora.simulation import simulate

    config = config_from_dict(base, [*overrides, f"federation.rounds={rounds}"])
    memory, records, server_peaks = DeviceMemory(device), [], []

    def on_round(record) -> None:
        records.append(record)
        if record.round > 0:  # round 0 is the initial evaluation
            memory.end_round()
            server_peaks.append(server_peak(device))

    memory.start()
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory() as run_dir:
            simulate(config, Path(run_dir) / "gpu-check", on_round=on_round)
    finally:
        memory.stop()
    later = [r for r in records if r.round > 1]
    trained = sum(len(r.clients) for r in later)
    return {
        "clients": config.federation.num_clients,
        "clients_per_round": config.federation.clients_per_round,
        "client_gpus": config.federation.client_gpus,
        "server_device": config.federation.server_device,
        "rounds": rounds,
        "wall_s": time.perf_counter() - started,
        "clients_per_s": trained / sum(r.seconds for r in later) if later else None,
        "round_s": [r.seconds for r in records if r.round > 0],
        "accuracy": [r.accuracy for r in records],
        "device_peak_bytes": memory.peaks,
        "server_peak_bytes": server_peaks,
    }


def dp_ratios(models: tuple[str, ...], device: str, steps: int, warmup: int) -> dict[str, Any]:
    """DP / no-DP step ratios per model, Opacus mode and trained factors (bench_dp_step)."""
    from tests.benchmarks import bench_dp_step

    figures: dict[str, Any] = {}
    for model in models:
        for mode in ("hooks", "ghost"):
            rows = bench_dp_step.main(model, device, steps=steps, warmup=warmup, grad_sample_mode=mode, round_steps=0)
            figures[f"{model} {mode}"] = {
                trains: {"ratio": row["ratio"], "paired_ratio": row["paired_ratio"]} for trains, row in rows.items()
            }
    return figures


def report(figures: dict[str, Any]) -> list[str]:
    """The summary lines of a check's figures."""
    federation = figures["federation"]
    gib = 2**30
    lines = [
        f"federation: {federation['clients']} clients, {federation['clients_per_round']} a round, client_gpus"
        f" {federation['client_gpus']}, server on {federation['server_device']}: "
        + (f"{federation['clients_per_s']:.2f} clients/s after round 1" if federation["clients_per_s"] else "one round only")
        + f"; {federation['wall_s']:.0f} s in all",
        "  device memory in use, peak per round (GiB): " + ", ".join(f"{b / gib:.2f}" for b in federation["device_peak_bytes"]),
        "  server process's peak allocation per round (GiB): "
        + ", ".join(f"{b / gib:.2f}" for b in federation["server_peak_bytes"]),
    ]
    for name, rows in figures["dp"].items():
        ratios = ", ".join(f"{'B only' if t == 'B' else 'A+B'} {row['ratio']:.2f}" for t, row in rows.items())
        verdict = f" (target <= {DP_TARGET}: {'met' if rows['B']['ratio'] <= DP_TARGET else 'NOT met'})" if "B" in rows else ""
        lines.append(f"dp step {name}: DP / no DP {ratios}{verdict}")
    return lines


def main(cpu_smoke: bool = False, rounds: int = 4, out: Path | None = None) -> dict[str, Any]:
    """Run both parts; print and return the figures (and write them to `out`)."""
    missing = missing_packages()
    if missing:
        raise SystemExit(f"gpu_check needs {', '.join(missing)}: pip install {' '.join(missing)}")
    if cpu_smoke:
        from tests.conftest import TINY  # the tests' tiny experiment

        device, base, overrides, models, steps = torch.device("cpu"), TINY, SMOKE_FEDERATION, DP_MODELS["smoke"], 2
    else:
        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA device (use --cpu-smoke to try it on CPU)")
        device, base, overrides, models, steps = torch.device("cuda"), {}, GPU_FEDERATION, DP_MODELS["gpu"], 10
        print(f"gpu_check on {torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    figures = {
        "device": str(device),
        "federation": run_federation(base, overrides, 2 if cpu_smoke else rounds, device),
        "dp": dp_ratios(models, device.type, steps, 1 if cpu_smoke else 3),
    }
    print("\n== gpu_check summary")
    for line in report(figures):
        print(f"  {line}")
    if out is not None:
        out.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="the same path on CPU at toy sizes (what the tests run)")
    parser.add_argument("--rounds", type=int, default=4, help="federation rounds (default 4)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    args = parser.parse_args()
    main(args.cpu_smoke, args.rounds, args.out)
