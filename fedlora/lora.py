"""LoraState: the federated part of a model, as per-layer factors {A, B} plus the head.

Shapes follow peft: for a layer W (d_out x d_in), B is d_out x r and A is r x d_in, and the
adapted weight is W + s * B A with s = alpha / r. Layer names drop peft's wrapper prefixes
(`base_model.model.` ... `.lora_A.default.weight`), so "bert.encoder.layer.0.attention.self.query".

In a Flower ArrayRecord, factors travel as "<layer>.A" / "<layer>.B" and head parameters as
"head.<name>". A state may hold only some parts (a client that trained B only sends B only).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

FACTORS = ("A", "B")
HEAD_PREFIX = "head."
_PEFT_PREFIX = "base_model.model."
_PEFT_FACTOR = {"lora_A": "A", "lora_B": "B"}
_HEAD_MARKER = ".modules_to_save.default."


@dataclass
class LoraState:
    """Per-layer LoRA factors and the (optional) classification head, as CPU tensors."""

    factors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)

    # --- access ---------------------------------------------------------------------------
    def layers(self) -> list[str]:
        """Layer names in a stable order."""
        return sorted(self.factors)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor under its record key ("<layer>.A", "<layer>.B", "head.<name>")."""
        out = {f"{layer}.{part}": t for layer in self.layers() for part, t in sorted(self.factors[layer].items())}
        out.update({HEAD_PREFIX + name: t for name, t in sorted(self.head.items())})
        return out

    def select(self, parts: Iterable[str], head: bool) -> LoraState:
        """A state with only the given factor parts ("A", "B") and, if asked, the head."""
        parts = tuple(parts)
        return LoraState(
            factors={layer: {p: t for p, t in f.items() if p in parts} for layer, f in self.factors.items()},
            head=dict(self.head) if head else {},
        )

    def clone(self) -> LoraState:
        """A deep copy."""
        return LoraState(
            factors={layer: {p: t.clone() for p, t in f.items()} for layer, f in self.factors.items()},
            head={name: t.clone() for name, t in self.head.items()},
        )

    def factor_bytes(self) -> int:
        """Bytes of the LoRA factors alone (what the uplink comparison between strategies counts)."""
        return sum(t.numel() * t.element_size() for f in self.factors.values() for t in f.values())

    def num_bytes(self) -> int:
        """Bytes of every tensor in the state (factors and head)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def digest(self, part: str = "A") -> str:
        """A SHA-256 digest of one factor part over all layers (FFA-LoRA checks the shared A)."""
        h = hashlib.sha256()
        for layer in self.layers():
            tensor = self.factors[layer].get(part)
            if tensor is not None:
                h.update(layer.encode())
                h.update(tensor.detach().contiguous().cpu().numpy().tobytes())
        return h.hexdigest()

    # --- flat vectors (robust aggregation and attacks work on updates as vectors) ---------
    def flatten(self) -> torch.Tensor:
        """Every tensor of the state, in record-key order, as one float32 vector."""
        tensors = list(self.tensors().values())
        if not tensors:
            return torch.zeros(0)
        return torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])

    def unflatten(self, vector: torch.Tensor) -> LoraState:
        """A state shaped like this one holding the values of `vector` (inverse of flatten)."""
        pieces, offset = {}, 0
        for key, tensor in self.tensors().items():
            pieces[key] = vector[offset : offset + tensor.numel()].reshape(tensor.shape).to(tensor.dtype)
            offset += tensor.numel()
        if offset != vector.numel():
            raise ValueError(f"vector has {vector.numel()} values, the state {offset}")
        return LoraState.from_tensors(pieces)

    def minus(self, reference: LoraState) -> LoraState:
        """This state's change from `reference`, over the tensors this state holds."""
        return LoraState(
            factors={
                layer: {p: t - reference.factors[layer][p] for p, t in parts.items()} for layer, parts in self.factors.items()
            },
            head={name: t - reference.head[name] for name, t in self.head.items()},
        )

    def plus(self, delta: LoraState) -> LoraState:
        """This state moved by `delta`, over the tensors `delta` holds."""
        return LoraState(
            factors={layer: {p: self.factors[layer][p] + t for p, t in parts.items()} for layer, parts in delta.factors.items()},
            head={name: self.head[name] + t for name, t in delta.head.items()},
        )

    # --- Flower records -------------------------------------------------------------------
    def to_array_record(self) -> ArrayRecord:
        """Encode as a Flower ArrayRecord."""
        record = ArrayRecord()
        for key, tensor in self.tensors().items():
            record[key] = Array(tensor.detach().contiguous().cpu().numpy())
        return record

    @classmethod
    def from_array_record(cls, record: ArrayRecord) -> LoraState:
        """Decode from a Flower ArrayRecord; raises LoraRecordError on keys it cannot place."""
        return cls.from_tensors({key: torch.from_numpy(np.array(array.numpy(), copy=True)) for key, array in record.items()})

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LoraState:
        """The state holding tensors under their record keys (inverse of `tensors`)."""
        state = cls()
        for key, tensor in tensors.items():
            if key.startswith(HEAD_PREFIX):
                state.head[key[len(HEAD_PREFIX) :]] = tensor
                continue
            layer, _, part = key.rpartition(".")
            if part not in FACTORS or not layer:
                raise LoraRecordError(f"unexpected array key {key!r}")
            state.factors.setdefault(layer, {})[part] = tensor
        return state

    # --- models ---------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module) -> LoraState:
        """Read the adapter factors and the trainable head out of a peft model."""
        state = cls()
        for name, param in model.named_parameters():
            located = locate_parameter(name)
            if located is None:
                continue
            kind, layer, part = located
            if kind == "factor":
                state.factors.setdefault(layer, {})[part] = param.detach().cpu().clone()
            else:
                state.head[layer] = param.detach().cpu().clone()
        return state

    def load_into(self, model: nn.Module) -> None:
        """Copy the tensors this state holds into a peft model (others stay as they are)."""
        with torch.no_grad():
            for name, param in model.named_parameters():
                located = locate_parameter(name)
                if located is None:
                    continue
                kind, layer, part = located
                source = self.factors.get(layer, {}).get(part) if kind == "factor" else self.head.get(layer)
                if source is not None:
                    param.copy_(source.to(param.device, param.dtype))


class LoraRecordError(ValueError):
    """An ArrayRecord that is not a LoraState encoding."""


def locate_parameter(param_name: str) -> tuple[str, str, str] | None:
    """Map a peft parameter name to ("factor", layer, "A"|"B") or ("head", name, "")."""
    # Opacus wraps the model and prefixes every name with "_module.".
    name = param_name.removeprefix("_module.").removeprefix(_PEFT_PREFIX)
    if _HEAD_MARKER in name:
        module, _, leaf = name.partition(_HEAD_MARKER)
        return "head", f"{module}.{leaf}", ""
    for marker, part in _PEFT_FACTOR.items():
        token = f".{marker}.default.weight"
        if name.endswith(token):
            return "factor", name[: -len(token)], part
    return None
