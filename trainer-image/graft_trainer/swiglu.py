"""SwiGLU MLPs that keep two activations for the backward pass instead of three.

A Llama-style MLP computes down(silu(gate(x)) * up(x)). Stock autograd saves gate(x) for the
SiLU's backward and silu(gate(x)) and up(x) for the product's: three intermediate-sized tensors
per layer, the largest activations of a LoRA step. `SiluMul` saves gate(x) and up(x) and
recomputes the SiLU in the backward pass (an elementwise op), with the stock formulas, so the
gradients are the same. `enable` switches the MLPs of the known architectures whose activation
is SiLU; others are left as they are (GRAFT_SWIGLU=0 switches it off).
"""

from __future__ import annotations

import os
import types
from typing import Any

MODEL_TYPES = {"llama", "mistral", "qwen2", "qwen3", "smollm3", "olmo2"}
_fn: Any = None


def _function() -> Any:
    import torch

    class SiluMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, gate: Any, up: Any) -> Any:
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx: Any, grad: Any) -> Any:
            gate, up = ctx.saved_tensors
            sig = torch.sigmoid(gate)
            g_gate = g_up = None
            if ctx.needs_input_grad[1]:
                g_up = grad * (gate * sig)
            if ctx.needs_input_grad[0]:
                # silu'(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x))), as torch's silu_backward
                g_gate = (grad * up) * (sig * (1 + gate * (1 - sig)))
            return g_gate, g_up

    return SiluMul


def silu_mul(gate: Any, up: Any) -> Any:
    global _fn
    if _fn is None:
        _fn = _function()
    return _fn.apply(gate, up)


def _forward(self: Any, x: Any) -> Any:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def enable(model: Any) -> int:
    """Switch the model's SwiGLU MLPs to `silu_mul`; the number switched (0: none qualify)."""
    if os.environ.get("GRAFT_SWIGLU", "1") == "0":
        return 0
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "model_type", None) not in MODEL_TYPES:
        return 0
    if getattr(config, "hidden_act", None) != "silu":
        return 0
    count = 0
    for module in base.modules():
        if type(module).__name__.endswith("MLP") and all(
            hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")
        ):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count
