"""A 20-run sweep of the from-scratch tier, timed as a user runs it, against its training floor.

The sweep: simulations/from_scratch.toml at --rounds rounds (50 clients, all 50 a round, 4 SGD
steps of 64 each), FedIT and FFA-LoRA x 10 learning rates (0.02 to 0.2), seed 0: issue 28's
measure of a researcher's wait. It runs as `fedlora compare CONFIG --out DIR` in a fresh process
(Ray's start-up and the report included) and prints:

- the wall time, and per run: the first (Ray and the actors start there), the mean of the rest,
  round 1 and the later rounds, the time outside the rounds;
- the training floor: the clients' own training time (each round's `train_seconds`, as the
  clients time it inside their actors) spread over the client actors. No engine, however fast,
  runs the sweep in less: the share of the rounds above it is the engine's and the server's.

    python -m tests.benchmarks.bench_sweep_tier [--rounds 4] [--out DIR]

About 7 minutes on two quiet cores; --out keeps the runs (else a temporary folder), and a second
call with the same --out only reprints the figures of the finished runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LEARNING_RATES = [round(0.02 * i, 2) for i in range(1, 11)]
STRATEGIES = ["fedit", "ffa_lora"]


def sweep_config(rounds: int) -> str:
    """The sweep's TOML: the tier's config with its rounds and the two axes."""
    tier = (REPO / "simulations" / "from_scratch.toml").as_posix()
    return (
        f'extends = "{tier}"\n\n[federation]\nrounds = {rounds}\n\n[sweep]\n'
        f'"strategy.name" = {json.dumps(STRATEGIES)}\n"federation.lr" = {json.dumps(LEARNING_RATES)}\n'
    )


def run_figures(run_dir: Path) -> dict[str, float]:
    """One finished run's timings from its summary and history."""
    wall = json.loads((run_dir / "summary.json").read_text())["wall_seconds"]
    rounds = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()[1:]]
    return {
        "wall_s": wall,
        "rounds_s": sum(r["seconds"] for r in rounds),
        "round1_s": rounds[0]["seconds"],
        "later_round_s": statistics.mean(r["seconds"] for r in rounds[1:]) if len(rounds) > 1 else float("nan"),
        "train_s": sum(r.get("train_seconds") or 0.0 for r in rounds),
        "rounds": len(rounds),
    }


def main(rounds: int = 4, out: Path | None = None) -> dict[str, float]:
    """Run the sweep (unless --out holds it finished already); print and return the figures."""
    out = out or Path(tempfile.mkdtemp(prefix="bench-sweep-tier-"))
    out.mkdir(parents=True, exist_ok=True)
    config = out / "sweep_tier.toml"
    config.write_text(sweep_config(rounds))
    print(
        f"sweep: from_scratch.toml, {rounds} rounds, {len(STRATEGIES)} strategies x {len(LEARNING_RATES)} learning rates; load average {os.getloadavg()[0]:.2f}"
    )
    started = time.perf_counter()
    command = [sys.executable, "-m", "fedlora.cli", "compare", str(config), "--out", str(out / "runs")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"the sweep failed (exit {done.returncode}): {done.stderr[-2000:]}")
    runs = sorted((p.parent for p in (out / "runs").glob("*/summary.json")), key=lambda p: p.stat().st_mtime)
    figures = [run_figures(run) for run in runs]
    actors = os.cpu_count() or 1  # the tier's client actors take one CPU each
    floor = sum(f["train_s"] for f in figures) / actors
    total_rounds = sum(f["rounds"] for f in figures)
    rounds_s = sum(f["rounds_s"] for f in figures)
    later = figures[1:] or figures
    print(
        f"  {len(figures)} runs in {wall:.0f} s ({wall / 60:.1f} min, the report included); the first run {figures[0]['wall_s']:.1f} s, "
        f"the others {statistics.mean(f['wall_s'] for f in later):.1f} s each: round 1 {statistics.mean(f['round1_s'] for f in later):.2f} s, "
        f"later rounds {statistics.mean(f['later_round_s'] for f in later):.2f} s, outside the rounds "
        f"{statistics.mean(f['wall_s'] - f['rounds_s'] for f in later):.1f} s"
    )
    print(
        f"  training floor: the clients' own training {floor:.0f} s over {actors} actors ({floor / total_rounds:.2f} s a round); "
        f"the rounds {rounds_s:.0f} s, {1 - floor / rounds_s:.0%} of them the engine's and the server's; load average {os.getloadavg()[0]:.2f}"
    )
    return {"wall_s": wall, "training_floor_s": floor, "rounds_s": rounds_s, "runs": len(figures)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    if args.rounds < 1:
        print(f"--rounds {args.rounds}: at least 1", file=sys.stderr)
        raise SystemExit(2)
    main(args.rounds, args.out)
