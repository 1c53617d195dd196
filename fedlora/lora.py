"""LoraState: the federated part of a model, as per-layer factors {A, B} plus the head.

Shapes follow peft: for a layer W (d_out x d_in), B is d_out x r and A is r x d_in, and the
adapted weight is W + s * B A with s = alpha / r. Layer names drop peft's wrapper prefixes
(`base_model.model.` ... `.lora_A.default.weight`), so "bert.encoder.layer.0.attention.self.query".

In a Flower ArrayRecord, factors travel as "<layer>.A" / "<layer>.B" and head parameters as
"head.<name>". A state may hold only some parts (a client that trained B only sends B only).

Fed-SB and RAVAN train a core between frozen A and B (fedlora/lora_core.py): a layer's "R"
(h x q x q) and RAVAN's per-head scalars "S" (h), so that the layer adds s B blockdiag(s_i R_i) A.

Strategies that fold an update into the frozen base weights (FedEx-LoRA's residual, FLoRA's
stack) add a layer's "U" (d_out x q) and "V" (q x d_in): the base weight becomes W0 + U V
(scaling included), where W0 is the pretrained weight. Loading a state that holds a layer's
factors sets that layer's base weight to W0 + U V, or back to W0 without them, so that a model
shared between rounds and clients never accumulates another state's merge.

A LoRA-A2 reply sends some rank components of one factor: the factor's selected columns (B) or
rows (A) and, under "<layer>.index", which components they are (fedlora/rank_components.py).
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from torch import nn

from fedlora.lora_core import CORE, CORE_PARTS, SCALES, fold_core, set_core

FACTORS = ("A", "B")
MERGED = ("U", "V")  # a delta folded into the base weight: W = W0 + U V
COMPONENT_INDEX = "index"  # which rank components a reply's factor holds (LoRA-A2: fedlora/rank_components.py)
HEAD_PREFIX = "head."
_PEFT_PREFIX = "base_model.model."
_PEFT_FACTOR = {"lora_A": "A", "lora_B": "B"}
_CORE_TOKENS = {".lora_A.default.core.weight": CORE, ".lora_A.default.core.scales": SCALES}
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

    def at_rank(self, rank: int, gain: float = 1.0) -> LoraState:
        """The first `rank` components of every layer's factors (B's columns, A's rows), each factor
        times `gain`; U, V and the head as they are (a client of a smaller rank is sent this)."""
        factors = {}
        for layer, parts in self.factors.items():
            factors[layer] = dict(parts)
            if "A" in parts:
                factors[layer]["A"] = parts["A"][:rank] * gain
            if "B" in parts:
                factors[layer]["B"] = parts["B"][:, :rank] * gain
        return LoraState(factors=factors, head=dict(self.head))

    def merged_delta(self, layer: str) -> torch.Tensor | None:
        """The delta U V this state folds into a layer's base weight (d_out x d_in), or None."""
        parts = self.factors.get(layer, {})
        if "U" not in parts:
            return None
        return parts["U"].double() @ parts["V"].double()

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
                h.update(tensor.detach().contiguous().cpu().numpy())  # hashed where it lies, not copied
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
    def from_array_record(cls, record: ArrayRecord, copy: bool = True) -> LoraState:
        """Decode from a Flower ArrayRecord; raises LoraRecordError on what it cannot decode or place.

        With copy=False the tensors are read-only views of the record's bytes (nothing is copied):
        the server's reply path reads each reply once this way and must never write into them.
        """
        with warnings.catch_warnings():  # torch warns that a view of immutable bytes is not writable
            warnings.simplefilter("ignore", UserWarning)
            views = {key: _tensor_view(key, array) for key, array in record.items()}
        return cls.from_tensors({key: t.clone() for key, t in views.items()} if copy else views)

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LoraState:
        """The state holding tensors under their record keys (inverse of `tensors`)."""
        state = cls()
        for key, tensor in tensors.items():
            if key.startswith(HEAD_PREFIX):
                state.head[key[len(HEAD_PREFIX) :]] = tensor
                continue
            layer, _, part = key.rpartition(".")
            if part not in (*FACTORS, *MERGED, *CORE_PARTS, COMPONENT_INDEX) or not layer:
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

    def folded(self) -> LoraState:
        """The same adapter as plain LoRA factors: each layer's core multiplied into its B (what peft exports)."""
        factors = {}
        for layer, parts in self.factors.items():
            factors[layer] = {p: t for p, t in parts.items() if p not in CORE_PARTS}
            if CORE in parts:
                factors[layer]["B"] = fold_core(parts["B"], parts[CORE], parts.get(SCALES))
        return LoraState(factors=factors, head=dict(self.head))

    def load_into(self, model: nn.Module) -> None:
        """Copy the tensors this state holds into a peft model (others stay as they are); a layer it
        holds gets its merged delta and its core as this state has them, or none."""
        with torch.no_grad():
            for name, module in list(model.named_modules()):  # cores first: their parameters are loaded below
                layer = name.removeprefix("_module.").removeprefix(_PEFT_PREFIX)
                if layer in self.factors and hasattr(module, "base_layer"):
                    _set_base_weight(module, self.merged_delta(layer))
                    set_core(module, self.factors[layer].get(CORE), self.factors[layer].get(SCALES))
            for name, param in model.named_parameters():
                located = locate_parameter(name)
                if located is None:
                    continue
                kind, layer, part = located
                source = self.factors.get(layer, {}).get(part) if kind == "factor" else self.head.get(layer)
                if source is not None:
                    param.copy_(source.to(param.device, param.dtype))


def has_merged_delta(model: nn.Module) -> bool:
    """Whether some base weight of the model holds a merged delta (W0 + U V, not W0) now."""
    return any(
        getattr(module, "_fedlora_w0", None) is not None and not torch.equal(module.base_layer.weight, module._fedlora_w0)
        for module in model.modules()
    )


def _set_base_weight(lora_module: nn.Module, delta: torch.Tensor | None) -> None:
    """Base weight <- W0 + delta (W0 kept aside at the first merge; no delta and no merge yet: untouched)."""
    weight = lora_module.base_layer.weight
    original = getattr(lora_module, "_fedlora_w0", None)
    if original is None:
        if delta is None:
            return
        original = lora_module._fedlora_w0 = weight.detach().clone()
    if delta is not None and getattr(lora_module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores W^T
        delta = delta.T
    merged = original if delta is None else (original.double() + delta.to(original.device)).to(original.dtype)
    weight.copy_(merged)


class LoraRecordError(ValueError):
    """An ArrayRecord that is not a LoraState encoding."""


def _tensor_view(key: str, array: Array) -> torch.Tensor:
    """The values of a Flower Array (a .npy file in bytes) as a tensor over those bytes, no copy.

    np.load would copy the data twice (through BytesIO, in chunks); here only the header is parsed,
    and the values are viewed where they lie, right after it.
    """
    data = array.data
    try:
        offset, dtype, shape, fortran_order = _npy_header(bytes(data[: _npy_header_end(data)]))
        values = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=offset)
        return torch.from_numpy(values.reshape(shape, order="F" if fortran_order else "C"))
    except (ValueError, TypeError, OverflowError) as err:  # not .npy, too short, a dtype torch lacks, a size beyond memory
        raise LoraRecordError(f"array {key!r} cannot be decoded: {err}") from None


def _npy_header_end(data: bytes) -> int:
    """Where the header of a .npy payload ends: magic (6 bytes), version (2), length (2 or 4), header."""
    length_bytes = 2 if data[6:7] == b"\x01" else 4  # _npy_header refuses what is neither 1.0 nor 2.0
    return 8 + length_bytes + int.from_bytes(data[8 : 8 + length_bytes], "little")


@lru_cache(maxsize=1024)
def _npy_header(header: bytes) -> tuple[int, np.dtype, tuple[int, ...], bool]:
    """(data offset, dtype, shape, Fortran order) of a .npy payload's header.

    Cached: every client sends the same few headers (one per tensor shape), and parsing one
    (numpy evaluates it as a Python literal) costs more than viewing the data it describes.
    """
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise ValueError(f".npy format version {version} (expected 1.0 or 2.0)")
    return stream.tell(), dtype, shape, fortran_order


def locate_parameter(param_name: str) -> tuple[str, str, str] | None:
    """Map a peft parameter name to ("factor", layer, "A"|"B"|"R"|"S") or ("head", name, "")."""
    # Opacus wraps the model and prefixes every name with "_module.".
    name = param_name.removeprefix("_module.").removeprefix(_PEFT_PREFIX)
    if _HEAD_MARKER in name:
        module, _, leaf = name.partition(_HEAD_MARKER)
        return "head", f"{module}.{leaf}", ""
    for marker, part in _PEFT_FACTOR.items():
        token = f".{marker}.default.weight"
        if name.endswith(token):
            return "factor", name[: -len(token)], part
    for token, part in _CORE_TOKENS.items():
        if name.endswith(token):
            return "factor", name[: -len(token)], part
    return None
