"""FedSA-LoRA (Guo et al., ICLR 2025): A is shared and averaged, B never leaves its client.

The paper's finding: the A matrices learn what is general across clients and the B matrices
what is client-specific. Each client trains both A and B locally and uploads A alone; the server
averages A, Ā = sum p_k A_k, and broadcasts it. Client k's model is (B_k, Ā): its personalized
model, and the only model the method trains.

Where B lives. The client keeps its B between rounds in its own state (Flower's Context.state,
clients/app.py: in simulation the engine keeps each node's context across rounds, on a deployed
SuperNode the node's process keeps it for the run), and trains next round from (its own B, the
broadcast Ā). The server never sees a B_k.

What the broadcast B is. The server's B stays the global initialization B_0 (peft's: zeros) for
the whole run. A client that has never been sampled (or has lost its state, below) starts from
B_0 with the current Ā; on a layer of B_0 = 0 its adapter adds nothing until it trains.

The server's "global" model is (B_0, Ā) with the averaged head: with B_0 = 0 it is the base
model plus the shared head, so the server's held-out accuracy measures what is shared, not the
clients' models. Personalized figures can only come from the clients: with evaluation.clients > 0
each client evaluates its own (B_k, Ā) on its held-out share (fedlora/client_eval.py; a client
that never trained evaluates (B_0, Ā)). The exported adapter is the server's (B_0, Ā).

Resume. The server's checkpoint holds Ā, the head and the ledgers, never a B_k: a resumed run
would start new client processes whose B restart from B_0, so its rounds would not be those of
the run it continues. A resume after round 0 is therefore refused in one line (fedlora/server.py:
DESIGN's rule, a resume continues exactly the run or refuses). A deployed node that restarts
mid-run loses its B the same way and goes on from B_0; the server cannot see it.

Bytes. A reply carries A (and the head when it trains): r x d_in a layer against FedIT's
r x (d_in + d_out), half of it on a square layer (attention's query and value).

DP. Under DP-SGD each client trains A and B together: every example's gradient of both factors
(and of the head) is clipped as one vector and noised, so the B it keeps is as private as the A it
sends; the accounting is that of any strategy (the same steps, noise and sample rate). A defence
screens the uploaded A (and head) updates.

User-level DP (fedlora/user_privacy.py). Ā is a plain mean of the clients' A, so it is privatized
like FedIT's factors: the change of A (and the head's) is clipped to S and noised, centrally or by
the clients' shares; B is never sent and never noised. What that guarantees: the server's
releases (Ā, the head, the exported (B_0, Ā)) are user-level DP, and a client's personalized model
(B_k, Ā) is DP with respect to every other user (it sees them only through the released Ā). It
is not private with respect to client k's own data: B_k is trained on it without noise, which is
the client's own business as long as B_k stays on the client; a client that publishes its
(B_k, Ā) publishes its data's imprint without any guarantee.
"""

from __future__ import annotations

from torch import Tensor

from fedlora.lora import LoraState
from strategies.base import LoraStrategy, weighted_sum


def fedsa_aggregate(initial_b: Tensor, as_: list[Tensor], weights: Tensor) -> tuple[Tensor, Tensor]:
    """(B, Ā) of the server's model: the initial B (the server has no B_k) and the weighted mean of A."""
    return initial_b, weighted_sum(as_, weights)


# --- Flower strategy ---
class FedSALoRA(LoraStrategy):
    """Clients train A and B, keep B and upload A; the server averages A (module docstring)."""

    name = "fedsa_lora"
    description = "FedSA-LoRA: clients train A and B, keep B to themselves (personalized) and upload A, which is averaged"
    trains = "AB"
    keeps = "B"
    trains_label = "A and B (B stays on the client)"
    user_level_dp = (
        "the change of A (and the head), the only factor sent; each client's B stays on it, trained on its own data "
        "without noise: the released model is user-level DP, a client's personalized (B_k, Ā) only towards other users"
    )

    def aggregate_factors(self, global_state: LoraState, updates: list[LoraState], weights: Tensor) -> LoraState:
        """Ā from the replies (A only); B as broadcast, the initial B."""
        factors = {}
        for layer, parts in global_state.factors.items():
            b, a = fedsa_aggregate(parts["B"], [u.factors[layer]["A"] for u in updates], weights)
            factors[layer] = {"A": a, "B": b}
        return LoraState(factors=factors)
