"""Who is in the federation, and the weight the server gives each client.

The server learns both at the handshake, once for the run: which client each Flower node is, and
how many examples each client declares. A client's weight in every aggregation (and in every
defence) comes from that declaration, never from a reply: a reply that states another count is
refused (strategies/base.py). The weight is capped by a rule of the config, so that one client
declaring a huge data set cannot take the aggregate over:

- `examples` (default): w_k = min(n_k, cap * median(n)), cap = `federation.max_weight_ratio`;
- `uniform`: w_k = 1 for every client.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Literal

Weighting = Literal["examples", "uniform"]


# The largest magnitude of a whole number the handshake takes: 2^53, float64's largest run of exact
# integers. A declared count becomes a float64 weight, and a reply repeats it as a float metric that
# must equal it exactly; a larger int would not even convert to a float. No data set comes near.
MAX_WHOLE = 2**53


class RosterError(ValueError):
    """A handshake that does not describe a usable federation."""


def declared_count_problem(value: object) -> str | None:
    """Why a declared example count is unusable (not a positive finite integer), or None."""
    problem = whole_number_problem("num-examples", value)
    if problem is None and value <= 0:
        problem = f"num-examples must be a positive whole number, got {value!r}"
    return problem


def client_id_problem(value: object, num_clients: int) -> str | None:
    """Why a declared client id is not one of the federation's (a whole number 0..num_clients-1), or None."""
    problem = whole_number_problem("client-id", value)
    if problem is None and not 0 <= value < num_clients:
        problem = f"client-id must be one of the federation's, 0..{num_clients - 1}, got {value!r}"
    return problem


def whole_number_problem(key: str, value: object) -> str | None:
    """Why a handshake value is not a finite whole number within `MAX_WHOLE` (a bool or a string is not one), or None."""
    if value is None:
        return f"{key} is missing"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"{key} must be a number, got {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} must be finite, got {value!r}"
    if abs(value) > MAX_WHOLE:  # log10, not repr: a huge int has no float and too many digits to print
        return f"{key} must be at most 2^53 in magnitude, got about 10^{math.log10(abs(value)):.0f}"
    if value != int(value):
        return f"{key} must be a whole number, got {value!r}"
    return None


@dataclass(frozen=True)
class Roster:
    """The federation as the server's handshake established it, fixed for the run.

    clients: Flower node id -> client id; examples: client id -> declared example count;
    excluded: node id -> why its handshake was refused.
    """

    clients: dict[int, int]
    examples: dict[int, int]
    excluded: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.clients.values()) != set(self.examples):
            raise RosterError("every client needs exactly one declared example count")
        if len(set(self.clients.values())) != len(self.clients):
            raise RosterError("two nodes claim the same client id")

    @classmethod
    def of(cls, examples: dict[int, int], first_node: int = 1) -> Roster:
        """A roster whose node ids are first_node + client id (tests, benchmarks)."""
        return cls({first_node + client: client for client in examples}, dict(examples))

    def client_ids(self) -> list[int]:
        """Client ids in order."""
        return sorted(self.examples)

    def weights(self, rule: Weighting = "examples", max_ratio: float | None = None) -> dict[int, float]:
        """Each client's aggregation weight under the rule (see the module docstring)."""
        if rule == "uniform":
            return dict.fromkeys(self.examples, 1.0)
        if max_ratio is None:
            return {client: float(n) for client, n in self.examples.items()}
        cap = max_ratio * statistics.median(self.examples.values())
        return {client: float(min(n, cap)) for client, n in self.examples.items()}
