"""The values the server aggregates: how large a reply's factors, head and metrics may be, and why.

The reply hygiene (strategies/base.py) refuses a reply that fails `check_against` or
`finite_metrics`, and a round does not install a new global state that fails `state_problem`.

A finite reply can still break the math, so "finite" is not enough. The rules
multiply factors (B A products summed over the rank and the clients, B^T B and A A^T Gram
matrices inside the QR and SVD re-factorizations), return float32, and zPROBE's secure
aggregation encodes each update in a fixed-point ring. So every factor and head value of a reply
must be at most `MAX_VALUE` = 2^16 in magnitude (a larger one is refused like a NaN), and so
must every value of a state the server installs. Why 2^16: a product of two such values is at
most 2^32, and a sum of them over any inner dimension (hidden size x stacked rank x clients, up
to 2^32 terms) at most 2^64, so Gram entries and singular values stay 2^64 below float32's
largest value (2^128, 3.4e38), room enough for alpha / r and the SVD's own scaling; and an
update, the difference of a reply and the global state (at most 2^17), summed over a
secure-aggregation cluster of fewer than 2^13 = 8192 clients, stays inside the ring's 2^30
(strategies/zprobe_protocol.py): a value the ring cannot encode is refused, not rescaled, so one
client never changes how the others are encoded. Honest LoRA factors and heads are around 1e-2 to 1.
A client metric must likewise fit float32 (`MAX_METRIC`): a train loss of 1e308 is no
measurement, and its weighted mean would overflow to Infinity in the history.
If a rule still produces a state with a non-finite or out-of-bound value, or its linear algebra
fails, the round does not install it: the global state stays, the round is skipped, and
`last_round.extra["not_installed"]` says why (`state_problem`).
"""

from __future__ import annotations

import math

import torch
from flwr.app import MetricRecord

from fedlora.lora import LoraState

# The largest magnitude of a factor or head value the server aggregates or installs, and of a
# client metric (float32's largest); see the module docstring for why.
MAX_VALUE = 2.0**16
MAX_METRIC = float(torch.finfo(torch.float32).max)


def finite_metrics(record: MetricRecord) -> dict[str, float] | str:
    """The record's metrics as floats, or why they are refused (not a finite number, or beyond `MAX_METRIC`)."""
    metrics: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value in (math.inf, -math.inf):
            return f"metric {key} is not a finite number (got {value!r})"
        if abs(value) > MAX_METRIC:  # before isfinite: an int beyond float's range makes it raise
            if isinstance(value, int):
                return f"metric {key} is an integer of {len(str(abs(value)))} digits, too large to aggregate"
            return f"metric {key} is {value:.3g}, too large to aggregate (beyond float32's {MAX_METRIC:.3g})"
        metrics[key] = float(value)
    return metrics


def check_against(state: LoraState, reference: LoraState, trains: str, train_head: bool) -> str | None:
    """Why a client's state does not match what it was asked to train, or None if it does."""
    if set(state.factors) != set(reference.factors):
        missing = sorted(set(reference.factors) - set(state.factors))[:2]
        extra = sorted(set(state.factors) - set(reference.factors))[:2]
        return f"wrong layers (missing {missing}, unexpected {extra})"
    for layer, parts in state.factors.items():
        if set(parts) != set(trains):
            return f"layer {layer}: sent factors {sorted(parts)}, expected {sorted(trains)}"
        for part, tensor in parts.items():
            problem = _tensor_problem(tensor, reference.factors[layer][part], f"{layer}.{part}")
            if problem:
                return problem
    expected_head = set(reference.head) if train_head else set()
    if set(state.head) != expected_head:
        return f"head parameters {sorted(state.head)}, expected {sorted(expected_head)}"
    for name, tensor in state.head.items():
        problem = _tensor_problem(tensor, reference.head[name], f"head.{name}")
        if problem:
            return problem
    return None


def _tensor_problem(tensor: torch.Tensor, reference: torch.Tensor, key: str) -> str | None:
    if tensor.shape != reference.shape:
        return f"{key}: shape {tuple(tensor.shape)}, expected {tuple(reference.shape)}"
    if tensor.dtype != reference.dtype:
        return f"{key}: dtype {tensor.dtype}, expected {reference.dtype}"
    return value_problem(tensor, key)


def value_problem(tensor: torch.Tensor, key: str) -> str | None:
    """Why a tensor's values cannot be aggregated (NaN, Inf, or beyond `MAX_VALUE`), or None."""
    if not tensor.is_floating_point() or not tensor.numel():
        return None
    magnitude = _largest_magnitude(tensor)
    if not math.isfinite(magnitude):
        return f"{key}: contains NaN or Inf"
    if magnitude > MAX_VALUE:
        return (
            f"{key}: a value of magnitude {magnitude:.3g} exceeds {MAX_VALUE:g}, the largest the aggregation "
            "can take (float32 products, the secure-aggregation ring)"
        )
    return None


def state_problem(state: LoraState) -> str | None:
    """Why the server must not install a state (a value NaN, Inf or beyond `MAX_VALUE`), or None."""
    for key, tensor in state.tensors().items():
        problem = value_problem(tensor, key)
        if problem:
            return problem
    return None


def _largest_magnitude(tensor: torch.Tensor) -> float:
    """max |value|, NaN if any value is NaN, by min and max reductions (no mask or copy as large as the tensor)."""
    low, high = torch.aminmax(tensor)
    return torch.maximum(-low, high).item()
