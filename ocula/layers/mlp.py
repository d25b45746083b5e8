"""Feed-forward blocks and the activations checkpoints name in their configs.

Notable features:
- `SwiGLUMLP`: down(act(gate(x)) * up(x)) with the checkpoint names `gate_proj` / `up_proj` / `down_proj`,
  optional biases;
- `activation(name)`: the `hidden_act` strings of transformers' ACT2FN that the supported families use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the CLIP approximation Qwen2-VL's vision tower uses."""
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_new": _gelu_tanh,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function for a config's `hidden_act`."""
    if name not in ACTIVATIONS:
        raise ConfigError(f"hidden_act={name!r} is not supported; use one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


class SwiGLUMLP(nn.Module):
    """Gated MLP of Llama-style decoders: down_proj(act(gate_proj(x)) * up_proj(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "silu", bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.act_fn = activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
