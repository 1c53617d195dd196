"""FedSA-LoRA (Guo et al., 2025): A is shared and averaged, B stays with each client.

The paper's finding: the A matrices learn what is general across clients and the B matrices
what is client-specific. Clients train both; the server averages A only and keeps each client's
B, so client k's model is (B_k, Ā): its personalized model. The global model (for clients that
never trained, and the server's held-out evaluation) uses the averaged B̄ with Ā.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lora import LoraState
from strategies.base import LoraStrategy, weighted_sum


def fedsa_aggregate(bs: list[Tensor], as_: list[Tensor], weights: Tensor) -> tuple[Tensor, Tensor]:
    """(B̄, Ā): the global model's factors; each client's personalized model is (B_k, Ā)."""
    return weighted_sum(bs, weights), weighted_sum(as_, weights)


# --- Flower strategy ---
class FedSALoRA(LoraStrategy):
    """Clients train A and B; the server averages A and keeps each client's B for its next round.

    A client that has trained before is sent (its own B, Ā); one that has not, the global
    (B̄, Ā). `personalized_states` gives the server every client's own model to evaluate beside
    the global one. The per-client B live in the server process (a resumed run restarts them
    from the global B̄).
    """

    name = "fedsa_lora"
    description = "FedSA-LoRA: A averaged and shared, B kept per client (personalized); global model uses the mean B"
    trains = "AB"

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.own_b: dict[int, dict[str, Tensor]] = {}  # client id -> layer -> its last trained B

    def client_state(self, client_id: int) -> LoraState | None:
        """(the client's own B, Ā) once it has trained; the global state before."""
        own = self.own_b.get(client_id)
        if own is None:
            return None
        return self._personal(own)

    def personalized_states(self) -> dict[int, LoraState]:
        """Each client that has trained: its own model (B_k, Ā, the shared head)."""
        return {client: self._personal(own) for client, own in sorted(self.own_b.items())}

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """Ā and B̄ from the replies; each replying client's B kept."""
        for client, update in zip(self.aggregated_clients, updates):
            if client >= 0:  # -1: a robust defence's own statistic, nobody's B
                self.own_b[client] = {layer: parts["B"] for layer, parts in update.factors.items()}
        factors = {}
        for layer in global_state.factors:
            b, a = fedsa_aggregate([u.factors[layer]["B"] for u in updates], [u.factors[layer]["A"] for u in updates], weights)
            factors[layer] = {"A": a, "B": b}
        return LoraState(factors=factors)

    def _personal(self, own: dict[str, Tensor]) -> LoraState:
        return LoraState(
            factors={layer: {"A": parts["A"], "B": own[layer]} for layer, parts in self.global_state.factors.items()},
            head=dict(self.global_state.head),
        )
