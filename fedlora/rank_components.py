"""Rank components of a LoRA factor: which a LoRA-A2 client sends, and how the server reads them.

Both sides need this (clients/app.py selects, strategies/lora_a2.py reads), and strategies and
clients never import each other, so it lives here.

Component i of a layer's adapter is the rank-1 term B[:, i] A[i, :] of B A. In a round that
trains one factor against the other, broadcast and frozen (LoRA-A2's alternating freeze), the
client's change of component i is dB[:, i] A[i, :] (a B round) or B[:, i] dA[i, :] (an A round).
Its importance is that change's Frobenius norm (LoRA-A2, Koo et al., ACL 2025, Eq. 2: "how much
each rank contributes to the change" of the adapter; the equation itself could not be read from
the sources at hand, and this is the score its text describes), computed without the d_out x d_in
matrix: a rank-1 matrix's Frobenius norm is the product of its two vectors' norms,
||dB[:, i]|| ||A[i, :]|| (resp. ||B[:, i]|| ||dA[i, :]||). The scaling alpha / r is the same for
every layer and does not change the order.

The budget. A client with `upload-rank` u sends the u x L components of highest importance over
all L layers of its adapter, as the paper selects across the entire model: an important layer may
send more than u components, an idle one none. Ties go to the earlier layer (sorted by name), then
the lower index, so the choice is deterministic.

On the wire. A layer of a reply holds the trained factor's selected columns (B: d_out x k) or rows
(A: k x d_in) and, under "<layer>.index", their indices (int64, increasing); a layer with none
selected sends empty ones. The server expands a reply into the full factor, each component not
sent as broadcast (no change from that client), after checking its form (`expand_components`);
the values are then checked like any reply's (strategies/reply_values.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlora.lora import COMPONENT_INDEX, LoraState


def other_factor(part: str) -> str:
    """The factor frozen while `part` trains."""
    return "A" if part == "B" else "B"


def component_axis(part: str) -> int:
    """The axis of a factor that runs over its rank components: B's columns, A's rows."""
    return 1 if part == "B" else 0


def component_importance(part: str, trained: Tensor, start: Tensor, frozen: Tensor) -> Tensor:
    """||change of component i||_F for every i, in float64: ||dB[:, i]|| ||A[i, :]|| or ||B[:, i]|| ||dA[i, :]||."""
    change = (trained.double() - start.double()).norm(dim=1 - component_axis(part))
    return change * frozen.double().norm(dim=1 - component_axis(other_factor(part)))


def select_components(importance: dict[str, Tensor], budget: int) -> dict[str, Tensor]:
    """Layer -> the increasing indices of its components among the `budget` most important of all layers."""
    layers = sorted(importance)
    scores = torch.cat([importance[layer] for layer in layers])
    owner = torch.cat([torch.full((len(importance[layer]),), k) for k, layer in enumerate(layers)])
    position = torch.cat([torch.arange(len(importance[layer])) for layer in layers])
    # A stable sort keeps equal scores in (layer, index) order; NaN (a broken training) sorts first.
    chosen = torch.sort(scores, descending=True, stable=True).indices[:budget]
    return {layer: position[chosen[owner[chosen] == k]].sort().values for k, layer in enumerate(layers)}


def top_components(update: LoraState, broadcast: LoraState, part: str, upload_rank: int) -> LoraState:
    """What a client sends of its trained `part`: the upload_rank x layers most important components
    (against the broadcast it trained from), their indices, and its head as it is."""
    frozen = other_factor(part)
    importance = {
        layer: component_importance(part, parts[part], broadcast.factors[layer][part], broadcast.factors[layer][frozen])
        for layer, parts in update.factors.items()
    }
    chosen = select_components(importance, upload_rank * len(importance))
    return LoraState(
        factors={layer: _restricted(update.factors[layer][part], index, part) for layer, index in chosen.items()},
        head=update.head,
    )


def _restricted(factor: Tensor, index: Tensor, part: str) -> dict[str, Tensor]:
    return {part: factor.index_select(component_axis(part), index).contiguous(), COMPONENT_INDEX: index}


def expand_components(received: LoraState, reference: LoraState, part: str, budget: int) -> LoraState | str:
    """The full update a reply of selected components stands for (every component not sent as in
    `reference`: no change), or why the reply cannot be read that way."""
    if set(received.factors) != set(reference.factors):
        missing = sorted(set(reference.factors) - set(received.factors))[:2]
        extra = sorted(set(received.factors) - set(reference.factors))[:2]
        return f"wrong layers (missing {missing}, unexpected {extra})"
    sent = 0
    for layer, parts in received.factors.items():
        problem = _form_problem(layer, parts, reference.factors[layer][part], part)
        if problem:
            return problem
        sent += len(parts[COMPONENT_INDEX])
    if sent > budget:
        return f"sent {sent} rank components, more than its upload budget of {budget} (strategy.upload_rank x layers)"
    factors = {}
    for layer, parts in received.factors.items():
        full = reference.factors[layer][part].clone()
        full.index_copy_(component_axis(part), parts[COMPONENT_INDEX], parts[part])
        factors[layer] = {part: full}
    return LoraState(factors=factors, head=received.head)


def _form_problem(layer: str, parts: dict[str, Tensor], reference: Tensor, part: str) -> str | None:
    """Why one layer of a reply is not `part`'s selected components with their indices, or None."""
    if set(parts) != {part, COMPONENT_INDEX}:
        return f"layer {layer}: sent {sorted(parts)}, expected {part} components and their {COMPONENT_INDEX}"
    index, values = parts[COMPONENT_INDEX], parts[part]
    rank = reference.shape[component_axis(part)]
    if index.dtype != torch.int64 or index.dim() != 1:
        return f"layer {layer}: component index of dtype {index.dtype} and {index.dim()} dimensions, expected int64 and 1"
    if len(index) and (int(index.min()) < 0 or int(index.max()) >= rank or not bool((index[1:] > index[:-1]).all())):
        return f"layer {layer}: component index is not increasing within 0..{rank - 1}"
    expected = (reference.shape[0], len(index)) if part == "B" else (len(index), reference.shape[1])
    if tuple(values.shape) != expected:
        return f"layer {layer}.{part}: shape {tuple(values.shape)}, expected {expected} for {len(index)} components"
    if values.dtype != reference.dtype:
        return f"layer {layer}.{part}: dtype {values.dtype}, expected {reference.dtype}"
    return None
