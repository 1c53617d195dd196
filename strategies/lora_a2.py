"""LoRA-A2 (Koo, Jang, Ok, ACL 2025, arXiv 2410.22815): alternating freeze and adaptive rank selection.

Alternating freeze. Rounds alternate which factor clients train against the other, broadcast and
frozen: B in odd rounds (the authors' project page: "since the standard convention of LoRA
initializes B to zero, we first train B"), A in even ones, as RoLoRA does; each round's average is
then exact: sum p_k B_k A = (sum p_k B_k) A, and likewise for A.

Adaptive rank selection. Each client trains all r components of the round's factor, then sends
only the `upload_rank` x layers components whose change matters most over its whole adapter, by
the importance ||dB[:, i] A[i, :]||_F (||B[:, i] dA[i, :]||_F in an A round), with their indices
(fedlora/rank_components.py: the score, the selection, the wire form; the client side is
clients/app.py). The paper's Eq. 2 could not be read from the sources at hand; its text defines
the score as how much a rank contributes to the change of the adapter, which this is. What the
paper also does and this does not: a separate learning rate for A and B (after LoRA+), and a
budget per client (here one `strategy.upload_rank` for all).

The server's rule. A reply is expanded to the full factor, each component the client did not send
set to the broadcast value: no change from that client. The factor is then averaged with the
round's weights p_k (normalized over every accepted reply, not per component):

    X <- X + sum_k p_k M_k * (X_k - X)

with M_k client k's component mask. A component sent by some clients moves by their p_k-weighted
changes, which the others' zeros dilute (no renormalization over the senders). Since X is one
factor against the other frozen, the new adapter is exactly sum_k p_k of the adapters the clients
sent (their own with unsent components reverted), each (alpha / r) B_k A or (alpha / r) B A_k.

Bytes. A reply carries, per layer, the selected columns of B (d_out x k) or rows of A (k x d_in)
and k int64 indices: at most upload_rank x layers components in all, against RoLoRA's r a layer.
The downlink is the full adapter.

User-level DP (fedlora/user_privacy.py), central noise only. The server expands each reply to the
round's full factor (the components a client did not send as broadcast: a zero change), clips that
expanded change (and the head's) to S as one vector and noises the sum on every component of the
round's factor, sent or not; the other factor is the broadcast one. Distributed noise is refused:
a client would add its share to all r components a layer, then send only its top upload_rank,
and the noise on the components left out (and the server's view of which it kept) would be lost
while the ledger charged the full sigma.

DP and defences. Under DP-SGD a client trains all r components of the round's factor (and the
head): every example's gradient of them is clipped as one vector and noised. The importance, the
selection and the components left out are post-processing of that private result: they cost no
privacy, and the accounting is any strategy's. A defence screens the expanded updates, in which a
component a client did not send is a zero change; the simulated adversary sends its rewritten
update in the same form (its own most important components within the budget).
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from fedlora.config import ConfigError, ExperimentConfig, StrategyConfig
from fedlora.lora import LoraState
from fedlora.rank_components import expand_components, top_components
from strategies.rolora import RoLoRA


# --- Flower strategy ---
class LoraA2(RoLoRA):
    """RoLoRA's alternating rounds, each client sending only its most important rank components.

    Parameters (besides LoraStrategy's)
    ----------
    upload_rank : int | None
        Rank components a client sends per adapted layer, on average over its adapter
        (None: every component, the global rank).
    """

    name = "lora_a2"
    description = (
        "LoRA-A2: B and A trained in alternate rounds (exact); each client uploads only its most important rank components"
    )
    trains_label = "B, A alternately; top rank components sent"
    user_level_dp = (
        "central noise only: the change of the round's factor as the server expands it (components not sent: zero), "
        "and the head's, clipped together; every component of that factor noised"
    )

    def __init__(self, *args: object, upload_rank: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.upload_rank = upload_rank

    @classmethod
    def options(cls, config: StrategyConfig) -> dict[str, object]:
        """strategy.upload_rank."""
        return {"upload_rank": config.upload_rank}

    @classmethod
    def check_privacy(cls, config: ExperimentConfig) -> None:
        """Also refuse distributed user-level noise: the components a client leaves out would take their noise with them."""
        super().check_privacy(config)
        if config.privacy.user_level and config.privacy.noise == "distributed":
            raise ConfigError(
                "privacy.noise: lora_a2 clients send only their top rank components, so most of a distributed noise "
                "share would never reach the sum; use privacy.noise = 'central' with lora_a2"
            )

    def components_per_layer(self) -> int:
        """The upload budget a layer: strategy.upload_rank, or the global rank (every component)."""
        return self.upload_rank or self.global_rank()

    def upload_budget(self) -> int:
        """The most rank components a reply may carry over all layers."""
        return self.components_per_layer() * len(self.global_state.factors)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """The round's factor (RoLoRA's), and the clients' upload budget a layer."""
        self.global_state = LoraState.from_array_record(arrays, copy=False)  # read, never written
        config = ConfigRecord({**dict(config), "upload-rank": self.components_per_layer()})
        return super().configure_train(server_round, arrays, config, grid)

    def unpack_reply(self, client_id: int, received: LoraState) -> LoraState | str:
        """The full trained factor a reply's components stand for (the others as broadcast), or why not."""
        return expand_components(received, self.reference_state(client_id), self.trains, self.upload_budget())

    def pack_reply(self, update: LoraState) -> LoraState:
        """What a client sends of a trained factor: its most important components within the budget."""
        return top_components(update, self.global_state, self.trains, self.components_per_layer())
