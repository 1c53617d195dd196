"""The server's reply path beside Flower's own FedAvg, on the same replies, in one process.

10 replies of Llama-7B-shaped LoRA factors (bench_aggregation's shapes, r 16), as the Grid
hands them to a strategy: ArrayRecords inside Messages. A strategy's time is its whole
`aggregate_train`: decode each reply, validate it (sender, metrics, keys, shapes, dtypes,
finiteness), its rule's aggregation, encoding the new state. Flower's is
`aggregate_arrayrecords` (what its FedAvg does with the replies: decode and weighted average,
no validation) on the replies that strategy's clients send (B only for a B-only rule; LoRA-A2's, at
strategy.upload_rank = r / 4, hold components of differing shapes: Flower gets every component). The two
alternate, and each figure is the best of --repeats, so that a busy moment on a shared machine
hits both alike. Threads: the ServerApp's (federation.server_cpus, 1 by default) unless --threads.

    python -m tests.benchmarks.bench_reply_path [--layers 32] [--clients 10] [--repeats 3] [--threads N]
                                                [--strategies flora,flexlora,fedex_lora,lora_fair,fedsvd]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedlora.config import FederationConfig
from fedlora.roster import Roster
from fedlora.threads import use_threads
from strategies import STRATEGIES
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY, NUM_EXAMPLES, LoraStrategy
from tests.benchmarks.bench_aggregation import RANK, llama_states
from tests.conftest import reply_from, task_identity

FIRST_NODE = 100
OPTIONS = {"lora_a2": {"upload_rank": RANK // 4}}  # each client sends a quarter of its components


def replies(
    cls: type[LoraStrategy], layers: int, clients: int
) -> tuple[LoraStrategy, ArrayRecord, list[Message], list[RecordDict]]:
    """A strategy, its round-1 state, one reply per client with the factors it sends in its form
    (FedSA-LoRA's A alone, LoRA-A2's selected components), and the records Flower's FedAvg averages:
    the same replies, or for LoRA-A2, whose clients send components of differing shapes, every component."""
    examples = {client: 50 + 10 * client for client in range(clients)}
    roster = Roster({FIRST_NODE + client: client for client in range(clients)}, examples)
    strategy = cls(roster, clients_per_round=clients, seed=0, train_head=False, **OPTIONS.get(cls.name, {}))
    initial, updates = llama_states(layers, clients, strategy.uploads, initial=strategy.initial_state)
    list(strategy.configure_train(1, initial.to_array_record(), ConfigRecord(), grid=None))  # what pack_reply reads
    info = ConfigRecord({"a-digest": initial.digest("A")})  # the A the clients trained with (FFA-LoRA checks it)

    def content(client: int, state) -> RecordDict:
        metrics = MetricRecord({NUM_EXAMPLES: examples[client], "train-loss": 1.0})
        return RecordDict({ARRAYS_KEY: state.to_array_record(), METRICS_KEY: metrics, INFO_KEY: info})

    messages = [reply_from(FIRST_NODE + client, content(client, strategy.pack_reply(u))) for client, u in enumerate(updates)]
    return strategy, initial.to_array_record(), messages, [content(client, u) for client, u in enumerate(updates)]


def timed(run: Callable[[], object]) -> float:
    """Seconds one call takes."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def measure(cls: type[LoraStrategy], layers: int, clients: int, repeats: int) -> dict[str, float]:
    """Best seconds of the strategy's aggregate_train and of Flower's aggregation of the same replies."""
    strategy, initial, messages, contents = replies(cls, layers, clients)
    ours, flower = [], []
    for _ in range(repeats):  # alternate, so that both see the same moments of a shared machine
        list(strategy.configure_train(1, initial, ConfigRecord(), grid=None))  # round 1 sent: not timed
        ours.append(timed(lambda: strategy.aggregate_train(1, messages)))
        if strategy.last_round.accepted != list(range(clients)):
            raise RuntimeError(f"{cls.name} refused replies: {strategy.last_round.rejected}")
        flower.append(timed(lambda: aggregate_arrayrecords(contents, NUM_EXAMPLES)))
    return {"seconds": min(ours), "flower_seconds": min(flower), "ratio": min(ours) / min(flower), "sent": strategy.uploads}


def main(
    layers: int = 32, clients: int = 10, repeats: int = 3, threads: int | None = None, strategies: list[str] | None = None
) -> dict[str, dict[str, float]]:
    """Print and return, per strategy (every registered one by default): aggregate_train seconds, Flower's, and their ratio."""
    threads = use_threads(FederationConfig().server_cpus if threads is None else threads)
    print(
        f"reply path, Llama-7B-shaped adapters: {layers} layers x 7 projections, r={RANK}, {clients} replies,"
        f" {threads} thread(s), best of {repeats}: aggregate_train / Flower's FedAvg aggregate_arrayrecords"
    )
    figures = {}
    for name in strategies or STRATEGIES:
        cls = STRATEGIES[name]
        with task_identity():
            row = figures[name] = measure(cls, layers, clients, repeats)
        print(
            f"  {name:<10} {row['seconds']:7.3f} s   Flower FedAvg ({row['sent']}) {row['flower_seconds']:7.3f} s"
            f"   ratio {row['ratio']:5.2f}",
            flush=True,
        )
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: federation.server_cpus)")
    parser.add_argument("--strategies", default=None, help="comma-separated registered names (default: all)")
    args = parser.parse_args()
    chosen = args.strategies.split(",") if args.strategies else None
    unknown = sorted(set(chosen or []) - set(STRATEGIES))
    if unknown:
        parser.error(f"--strategies: unknown {', '.join(unknown)} (registered: {', '.join(STRATEGIES)})")
    main(args.layers, args.clients, args.repeats, args.threads, chosen)
