"""A trained core between a layer's frozen LoRA factors: Delta W = s B blockdiag(s_1 H_1, ..., s_h H_h) A.

Fed-SB (one r x r core) and RAVAN (h heads of q x q, each with a trained scalar s_i) keep B and
A fixed and train only what sits between them; s = alpha / r is peft's scaling, r = h q the
adapter's rank. In a LoraState a layer's core is the part "R", h x q x q (Fed-SB: 1 x r x r), and
RAVAN's scalars the part "S", h values (none: every s_i is 1). In the model the core is a
`LoraCore` held by peft's lora_A as its child "core", applied to lora_A's output by a forward hook,
so peft's own forward computes lora_B(core(lora_A(x))) * scaling unchanged.

Loading a state that holds a layer's R installs the core (or refills it); loading one without R
removes it (plain LoRA again), so a model shared between rounds, clients and strategies carries the
core of the state it was last given. Opacus finds no grad sampler for `LoraCore` and computes its
per-sample gradients with functorch, in each grad_sample_mode. peft knows nothing of the core:
`fold_core` multiplies it into B for the exported adapter (same Delta W, rank unchanged).
"""

from __future__ import annotations

import torch
from torch import nn

CORE = "R"  # a layer's h x q x q core
SCALES = "S"  # RAVAN's h per-head scalars
CORE_PARTS = (CORE, SCALES)
_CORE_CHILD = "core"


class LoraCore(nn.Module):
    """x (..., h q) -> per head i, s_i H_i x_i: the core, block-diagonal over the heads."""

    def __init__(self, heads: int, size: int, scaled: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(heads, size, size))
        self.scales = nn.Parameter(torch.ones(heads)) if scaled else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        heads, size, _ = self.weight.shape
        mixed = torch.einsum("...hq,hpq->...hp", x.unflatten(-1, (heads, size)), self.weight)
        if self.scales is not None:
            mixed = mixed * self.scales[:, None]
        return mixed.flatten(-2)


def core_matrix(core: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """blockdiag(s_1 H_1, ..., s_h H_h) as an (h q) x (h q) matrix (s_i = 1 without scales)."""
    if scales is not None:
        core = core * scales.to(core.dtype)[:, None, None]
    return torch.block_diag(*core)


def fold_core(b: torch.Tensor, core: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """B blockdiag(s_i H_i), in B's dtype (computed in float64): plain LoRA factors (B', A) with B' A = B core A."""
    return (b.double() @ core_matrix(core.double(), None if scales is None else scales.double())).to(b.dtype)


def set_core(lora_module: nn.Module, core: torch.Tensor | None, scales: torch.Tensor | None) -> None:
    """Give a peft LoRA layer a core shaped like `core` (with trained scalars when `scales` is given),
    or none when `core` is None. Only the structure: the values are the parameters' to load."""
    linear = lora_module.lora_A["default"]
    installed = linear._modules.get(_CORE_CHILD)
    if core is None:
        if installed is not None:
            linear._modules[_CORE_CHILD] = None
        return
    if installed is not None and installed.weight.shape == core.shape and (installed.scales is None) == (scales is None):
        return
    if _CORE_CHILD not in linear._modules:  # the hook stays for good; it passes through while no core is held
        linear.register_forward_hook(_through_core)
    heads, size, _ = core.shape
    setattr(linear, _CORE_CHILD, LoraCore(heads, size, scales is not None).to(linear.weight.device, linear.weight.dtype))


def _through_core(linear: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """lora_A's output through its core, if it holds one (a module-level function: a deep copy of the
    model calls its own copy of the core, not the original's)."""
    core = linear._modules.get(_CORE_CHILD)
    return output if core is None else core(output)
