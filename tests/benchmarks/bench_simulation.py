"""One federation through Flower's simulation engine (Ray) against the same rounds in a plain loop.

The tiny experiment of the tests (tests.conftest.tiny_config), or a config file (--config, e.g.
simulations/from_scratch.toml: the from-scratch tier), with --clients clients that all train in
each of --rounds rounds, runs twice, each in a fresh process:

- flower: `fedlora.simulation.simulate`, i.e. run_simulation with the ServerApp and ClientApp
  on the Ray backend (client actors of `federation.client_cpus` CPUs each);
- loop: the same rounds in one process without Flower or Ray: the strategy samples the clients,
  each trains with `clients.trainer.train_local` under the seed the ClientApp would use, and the
  strategy aggregates the trained factors (`LoraStrategy._aggregate`: example weights,
  `aggregate_factors`, head average); the server evaluates on the held-out split each round.

Both report: startup (from the call until the round-0 evaluation is recorded: Ray and its
actors for flower; data and model for both), the first round (flower's client actors build
their model there), the later rounds, and the whole wall time; and the final test accuracy
and loss, which agree when both train the same (same seeds; here they agree to the bit).

    python -m tests.benchmarks.bench_simulation [--clients 4] [--rounds 3] [--strategy fedit] [--config FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

# Ray and Flower settings must be in the environment before they are imported.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

ENGINES = ("flower", "loop")
RESULT = "bench-simulation-result "  # marks the JSON line among whatever Ray prints


def experiment(clients: int, rounds: int, strategy: str, local_steps: int | None, config_path: str | None = None):
    """The tiny test experiment (or the config file's), every client training in every round."""
    from fedlora.config import load_config
    from tests.conftest import tiny_config

    overrides = [
        f"federation.num_clients={clients}",
        f"federation.clients_per_round={clients}",
        f"federation.rounds={rounds}",
        f"strategy.name={strategy!r}",
    ]
    if local_steps is not None:
        overrides.append(f"federation.local_steps={local_steps}")
    return load_config(config_path, overrides) if config_path else tiny_config(*overrides)


def run_flower(config, run_dir: Path) -> dict[str, Any]:
    """Run through fedlora.simulation; timestamps of every recorded round."""
    from fedlora.results import read_history
    from fedlora.simulation import quiet_flower_logs, simulate

    quiet_flower_logs()
    marks: list[float] = []
    evaluations: list[tuple[float, float]] = []

    def on_round(record) -> None:
        marks.append(time.perf_counter())
        evaluations.append((record.accuracy, record.loss))

    started = time.perf_counter()
    simulate(config, run_dir, on_round=on_round)
    ended = time.perf_counter()
    return _figures(started, marks, ended, evaluations) | {"later_rounds": engine_breakdown(config, read_history(run_dir))}


def engine_breakdown(config, history: list[dict[str, Any]]) -> dict[str, float]:
    """Per client-round of the later rounds (round 1 builds the actors' models): the wall time the
    server waits for its clients, the clients' own training (as they time it, inside the actor),
    and the engine's cost: actor-seconds not spent training (the message's encoding, Ray's
    transfer, the ClientApp's set-up, scheduling, actors idle at a round's end)."""
    later = history[2:]
    client_rounds = sum(len(line["sampled"]) for line in later)
    actors = min(actor_count(config), max(len(line["sampled"]) for line in later))
    waited = sum(line["client_seconds"] for line in later)
    training = sum(line["train_seconds"] for line in later)
    return {
        "client_rounds": client_rounds,
        "actors": actors,
        "wait_s": waited / client_rounds,
        "train_s": training / client_rounds,
        "engine_s": (waited * actors - training) / client_rounds,
        "server_s": sum(line["server_seconds"] for line in later) / len(later),
    }


def actor_count(config) -> int:
    """How many client actors Ray runs at once on this machine for the config."""
    return max(1, int((os.cpu_count() or 1) / config.federation.client_cpus))


def run_loop(config, run_dir: Path) -> dict[str, Any]:
    """The same rounds in this process: trainer functions and strategy aggregation, no Flower."""
    import torch

    from clients.trainer import TrainPlan, train_local
    from fedlora import workspace
    from fedlora.model import evaluate, seeded
    from fedlora.roster import Roster
    from fedlora.seeds import derive_seed
    from strategies import build_strategy
    from strategies.base import ClientUpdate

    marks: list[float] = []
    evaluations: list[tuple[float, float]] = []
    started = time.perf_counter()
    task = workspace.federated_task(config)
    test = workspace.test_examples(config)
    model = workspace.lora_model(config, task.num_labels)
    federation = config.federation
    clients = {node: node for node in range(federation.num_clients)}  # node id = client id
    # What the server's handshake makes every client do: load its data, declare its size.
    roster = Roster(clients, {client: len(workspace.client_examples(config, client)) for client in clients.values()})
    strategy = build_strategy(config, roster)
    state = strategy.initial_state(workspace.initial_state(config, task.num_labels))

    def evaluate_state() -> None:
        state.load_into(model)
        evaluations.append(evaluate(model, test))
        marks.append(time.perf_counter())

    evaluate_state()
    for server_round in range(1, federation.rounds + 1):
        strategy.global_state, strategy.server_round = state, server_round
        updates = []
        for client_id in sorted(clients[n] for n in strategy.sample_clients(server_round)):
            examples = workspace.client_examples(config, client_id)
            state.load_into(model)
            plan = TrainPlan(
                trains=strategy.trains,
                train_head=strategy.train_head,
                local_steps=federation.local_steps,
                lr=federation.lr,
                batch_size=federation.batch_size,
                seed=derive_seed(config.seed, client_id, server_round),
            )
            with seeded(plan.seed):  # as the ClientApp does: dropout draws from the global generator
                result = train_local(model, examples, plan)
            trained = result.state.select(plan.trains, plan.train_head)
            updates.append(ClientUpdate(client_id, trained, strategy.weights[client_id], {"train-loss": result.loss}, {}))
        with torch.no_grad():
            state = strategy._aggregate(updates)
        evaluate_state()
    ended = time.perf_counter()
    return _figures(started, marks, ended, evaluations)


def _figures(started: float, marks: list[float], ended: float, evaluations: list[tuple[float, float]]) -> dict[str, Any]:
    later = [b - a for a, b in pairwise(marks[1:])]
    return {
        "startup_s": marks[0] - started,
        "first_round_s": marks[1] - marks[0],
        "later_round_s": sum(later) / len(later) if later else float("nan"),
        "rounds_s": marks[-1] - marks[0],
        "teardown_s": ended - marks[-1],
        "total_s": ended - started,
        "final_accuracy": evaluations[-1][0],
        "final_loss": evaluations[-1][1],
    }


def measure_one(
    engine: str, clients: int, rounds: int, strategy: str, local_steps: int | None, config_path: str | None = None
) -> dict[str, Any]:
    """Run one engine in this process and return its figures."""
    config = experiment(clients, rounds, strategy, local_steps, config_path)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_flower if engine == "flower" else run_loop
        return run(config, Path(tmp) / engine)


def check_rounds(rounds: int) -> None:
    """Refuse, in one line (exit 2), fewer rounds than the figures need: round 1 builds the actors'
    models, and the breakdown is of the rounds after it."""
    if rounds < 2:
        print(
            f"--rounds {rounds}: at least 2 (round 1 builds the actors' models; the figures are of the rounds after it)",
            file=sys.stderr,
        )
        raise SystemExit(2)


def main(
    clients: int = 4, rounds: int = 3, strategy: str = "fedit", local_steps: int | None = None, config_path: str | None = None
) -> dict[str, dict[str, Any]]:
    """Run both engines, each in a fresh process; print and return their figures and ratios."""
    check_rounds(rounds)
    config = experiment(clients, rounds, strategy, local_steps, config_path)
    print(
        f"simulation: {config_path or 'the tiny BERT of the tests'}, {clients} clients x {rounds} rounds, {config.federation.local_steps} local steps of "
        f"batch {config.federation.batch_size}, {strategy}; Flower's Ray engine vs a plain loop (each in a fresh process)"
    )
    # Every torch in both runs (Flower's server and client actors, the loop) gets the threads
    # that `simulate` gives a client actor: on a busy machine, two OpenMP threads per process
    # spinning against other processes can make a tiny model's step many times slower.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, int(config.federation.client_cpus)))
    env = dict(os.environ, OMP_NUM_THREADS=threads)
    actors = actor_count(config)
    print(
        f"  {threads} torch thread(s) per process (OMP_NUM_THREADS); Ray runs {actors} client actor(s) at once, the loop one client at a time"
    )
    figures: dict[str, dict[str, Any]] = {}
    for engine in ENGINES:
        command = [
            sys.executable,
            "-m",
            "tests.benchmarks.bench_simulation",
            "--one",
            engine,
            "--clients",
            str(clients),
            "--rounds",
            str(rounds),
            "--strategy",
            strategy,
        ]
        if local_steps is not None:
            command += ["--local-steps", str(local_steps)]
        if config_path:
            command += ["--config", config_path]
        started = time.perf_counter()
        out = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        process_s = time.perf_counter() - started
        if out.returncode != 0:
            raise RuntimeError(f"{engine} run failed:\n{out.stderr[-3000:]}")
        result = [line for line in out.stdout.splitlines() if line.startswith(RESULT)][-1]
        figures[engine] = json.loads(result[len(RESULT) :]) | {"process_s": process_s}
    for engine, row in figures.items():
        print(
            f"  {engine:<6} startup {row['startup_s']:6.1f} s, round 1 {row['first_round_s']:5.2f} s, "
            f"later rounds {row['later_round_s']:5.2f} s each, all rounds {row['rounds_s']:6.2f} s, "
            f"total {row['total_s']:6.1f} s (process incl. imports {row['process_s']:5.1f} s); "
            f"final accuracy {row['final_accuracy']:.4f}, loss {row['final_loss']:.6f}"
        )
    flower, loop = figures["flower"], figures["loop"]
    parts = flower["later_rounds"]
    loop_per_client_round = loop["later_round_s"] / clients
    print(
        f"  per client-round of the later rounds ({parts['client_rounds']} of them, {parts['actors']} actor(s)): "
        f"the server waits {parts['wait_s']:.3f} s; an actor spends {parts['train_s']:.3f} s training and "
        f"{parts['engine_s']:.3f} s on the engine (encoding, transfer, set-up, scheduling, idle); "
        f"the loop {loop_per_client_round:.3f} s (training and its set-up); server {parts['server_s']:.2f} s a round"
    )
    print(
        f"  flower / loop: total {flower['total_s'] / loop['total_s']:.2f}x, rounds only "
        f"{flower['rounds_s'] / loop['rounds_s']:.2f}x, later rounds {flower['later_round_s'] / loop['later_round_s']:.2f}x; "
        f"Flower/Ray startup overhead {flower['startup_s'] - loop['startup_s']:.1f} s; "
        f"final test loss differs by {abs(flower['final_loss'] - loop['final_loss']):.1e}",
        flush=True,
    )
    figures["ratios"] = {
        "total": flower["total_s"] / loop["total_s"],
        "rounds": flower["rounds_s"] / loop["rounds_s"],
        "later_rounds": flower["later_round_s"] / loop["later_round_s"],
        "startup_overhead_s": flower["startup_s"] - loop["startup_s"],
        "engine_share_of_actor_time": parts["engine_s"] / (parts["engine_s"] + parts["train_s"]),
    }
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="fedit")
    parser.add_argument("--local-steps", type=int, default=None, help="default: the tiny config's")
    parser.add_argument("--config", default=None, help="a config file instead of the tests' tiny experiment")
    parser.add_argument("--one", choices=ENGINES, help="run only this engine and print JSON (internal)")
    args = parser.parse_args()
    check_rounds(args.rounds)
    if args.one:
        print(RESULT + json.dumps(measure_one(args.one, args.clients, args.rounds, args.strategy, args.local_steps, args.config)))
    else:
        main(args.clients, args.rounds, args.strategy, args.local_steps, args.config)
