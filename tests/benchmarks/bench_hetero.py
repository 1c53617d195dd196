"""The heterogeneous-rank strategies' server round, factored, against the dense computation a peer does.

For one Llama-7B decoder layer's seven projections (q, k, v, o: 4096 x 4096; gate, up:
11008 x 4096; down: 4096 x 11008), 10 clients at rank 16, it times each strategy's
`aggregate_factors` (the factored way: stacks, thin QRs and small SVDs, no d_out x d_in matrix)
and, in the same run, what peers do (FedLLM-Factory's FLoRA, FlexLoRA and FedEx-LoRA): form
dW = sum_k p_k s B_k A_k densely; FlexLoRA then takes its dense SVD, FedEx-LoRA forms the dense
residual dW - s B̄ Ā, FLoRA keeps dW to merge (the merge itself, one addition, is not timed
either way). Both ways are checked to agree. The factored FLoRA and FedEx-LoRA times are of a
first round, with no merged delta yet: later rounds re-factorize the merged delta as well.
LoRA-FAIR and FedSVD (stacked Grams, a small solve; FedSVD's QRs of d x r factors), FedSA-LoRA and
RoLoRA (factors averaged exactly as peers do) have no dense counterpart here: time only.
The factored round is timed whole, over --layers decoder layers (default 32, as Llama-7B): the
strategies spread a round's layers over the ServerApp's threads (strategies/per_layer.py), so a
round is not 32 times one layer. The decoder layers hold copies of one layer's values, each in
its own memory.

    python -m tests.benchmarks.bench_hetero [--scale 1.0] [--clients 10] [--repeats 3] [--factored-only] [--threads 2] [--layers 32]

--factored-only skips the peers' dense computation (FlexLoRA's dense SVD alone takes about 17
minutes on two cores at full scale) and times the factored rounds only.
"""

from __future__ import annotations

import argparse

import torch

from fedlora.lora import LoraState
from fedlora.roster import Roster
from strategies import STRATEGIES
from tests.benchmarks.bench_fedsvd_layer import timed

SHAPES = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # one Llama-7B decoder layer
RANK, ALPHA, LAYERS_7B = 16, 32.0, 32
METHODS = ("flora", "flexlora", "fedex_lora", "lora_fair", "fedsvd", "fedsa_lora", "rolora")
DENSE = ("flora", "flexlora", "fedex_lora")
# Issue 28: these five server rounds at 7B shape (32 layers) under this many seconds on two quiet cores.
TARGETED, TARGET_7B_S = ("flora", "flexlora", "fedex_lora", "lora_fair", "fedsvd"), 3.0


def states(scale: float, clients: int, seed: int = 0, layers: int = 1) -> tuple[LoraState, list[LoraState]]:
    """A global state and the clients' trained factors (A and B) for `layers` decoder layers,
    dimensions times `scale`. Every decoder layer holds a copy of the same values, in its own
    memory (1.6 GB for 32 layers of 10 clients), so that a round reads as much as a real one."""
    g = torch.Generator().manual_seed(seed)
    one_global = {}
    for i, (d_out, d_in) in enumerate(SHAPES):
        d_out, d_in = int(d_out * scale), int(d_in * scale)
        one_global[f"proj{i}"] = {
            "A": torch.randn(RANK, d_in, generator=g) / d_in**0.5,
            "B": torch.randn(d_out, RANK, generator=g) * 1e-3,
        }
    one_updates = [
        {
            name: {part: t + 1e-3 * torch.randn(t.shape, generator=g) for part, t in parts.items()}
            for name, parts in one_global.items()
        }
        for _ in range(clients)
    ]

    def repeated(one: dict[str, dict[str, torch.Tensor]]) -> LoraState:
        return LoraState(
            factors={
                f"layers.{j}.{name}": {part: t.clone() for part, t in parts.items()}
                for j in range(layers)
                for name, parts in one.items()
            }
        )

    return repeated(one_global), [repeated(update) for update in one_updates]


def first_layer(state: LoraState) -> LoraState:
    """The first decoder layer's projections (what the dense computation is checked on)."""
    return LoraState(factors={name: parts for name, parts in state.factors.items() if name.startswith("layers.0.")})


def dense_round(
    method: str, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The peer's computation per layer: dW formed densely, then its SVD (FlexLoRA), residual (FedEx) or merge (FLoRA)."""
    scaling, out = ALPHA / RANK, {}
    for layer in global_state.factors:
        factors = [(u.factors[layer]["B"].to(dtype), u.factors[layer]["A"].to(dtype)) for u in updates]
        delta = sum(w * scaling * b @ a for w, (b, a) in zip(weights.tolist(), factors))
        if method == "flexlora":
            u_, s, vh = torch.linalg.svd(delta, full_matrices=False)
            out[layer] = (u_[:, :RANK] * s[:RANK]) @ vh[:RANK]
        elif method == "fedex_lora":
            b_mean = sum(w * b for w, (b, _) in zip(weights.tolist(), factors))
            a_mean = sum(w * a for w, (_, a) in zip(weights.tolist(), factors))
            out[layer] = delta - scaling * b_mean @ a_mean  # merged into the base weight below, as FLoRA's dW
        else:
            out[layer] = delta
    return out


def factored_effect(method: str, state: LoraState, layer: str) -> torch.Tensor:
    """What the factored result adds to the model (to check it against the dense one)."""
    parts, scaling = state.factors[layer], ALPHA / RANK
    if method == "flexlora":
        return scaling * parts["B"].double() @ parts["A"].double()
    return state.merged_delta(layer)


def measure(
    method: str, global_state: LoraState, updates: list[LoraState], weights: torch.Tensor, repeats: int, with_dense: bool
) -> dict[str, float]:
    """One method's factored round over every decoder layer (median of `repeats`) and, where
    peers compute densely, theirs on one decoder layer (once) and the agreement."""
    clients = len(updates)
    layers = len(global_state.factors) // len(SHAPES)
    roster = Roster({i: i for i in range(clients)}, {i: 100 for i in range(clients)})
    strategy = STRATEGIES[method](roster, clients_per_round=clients, train_head=False, lora_alpha=ALPHA)
    strategy.global_state, strategy.server_round = global_state, 1
    replies = [u.select("B" if method == "rolora" else strategy.trains, head=False) for u in updates]  # RoLoRA: a B round
    strategy.aggregate_factors(global_state, replies, weights)  # warm-up
    round_s, state = timed(lambda: strategy.aggregate_factors(global_state, replies, weights), repeats)
    row = {"round_s": round_s, "factored_s": round_s / layers, "round_7b_s": round_s * LAYERS_7B / layers}
    if with_dense and method in DENSE:
        one_global, one_replies = first_layer(global_state), [first_layer(reply) for reply in replies]
        dense_s, dense = timed(lambda: dense_round(method, one_global, one_replies, weights), 1)
        if method == "fedex_lora":  # a small difference of two products: the reference in float64 (not timed)
            dense = dense_round(method, one_global, one_replies, weights, torch.float64)
        error = max(
            float(torch.linalg.matrix_norm(factored_effect(method, state, layer) - dense[layer].double()) / dense[layer].norm())
            for layer in dense
        )
        row.update(dense_s=dense_s, ratio=dense_s / row["factored_s"], relative_difference=error)
    return row


def main(
    scale: float = 1.0,
    clients: int = 10,
    repeats: int = 3,
    with_dense: bool = True,
    methods: tuple[str, ...] = METHODS,
    threads: int = 2,
    layers: int = LAYERS_7B,
) -> dict[str, dict[str, float]]:
    """Print and return per method: the factored round's seconds (and per decoder layer), the
    dense computation's per decoder layer, their ratio, the agreement."""
    torch.set_num_threads(threads)
    global_state, updates = states(scale, clients, layers=layers)
    weights = torch.rand(clients, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    weights /= weights.sum()
    print(
        f"server round of {layers} decoder layers (Llama-7B shapes x {scale:g}), {clients} clients, r={RANK}, "
        f"{torch.get_num_threads()} threads"
    )
    figures = {}
    for method in methods:
        row = figures[method] = measure(method, global_state, updates, weights, repeats, with_dense)
        line = f"  {method:<11} factored {row['round_s']:6.2f} s ({row['factored_s']:5.3f} s a layer, {row['round_7b_s']:5.2f} s for 32)"
        if "ratio" in row:
            line += f"   dense {row['dense_s']:7.2f} s   dense / factored {row['ratio']:6.1f}x"
            line += f"   relative difference {row['relative_difference']:.1e}"
        print(line, flush=True)
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="layer dimensions times this (0.5: half the 7B shapes)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--factored-only", action="store_true", help="skip the peers' dense computation (minutes at full scale)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: issue 28's two cores)")
    parser.add_argument(
        "--layers", type=int, default=LAYERS_7B, help=f"decoder layers in the round (default {LAYERS_7B}: Llama-7B's)"
    )
    args = parser.parse_args()
    main(args.scale, args.clients, args.repeats, with_dense=not args.factored_only, threads=args.threads, layers=args.layers)
