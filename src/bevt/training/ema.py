"""`ModelEMA`: an exponential moving average of a model's weights (evaluated, saved and exported instead of them)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """Exponential moving average of a model's floating-point weights and buffers.

    After every optimizer step, `update(model)` sets `ema = d * ema + (1 - d) * weights` with
    `d = min(decay, (1 + n) / (10 + n))` (n = updates so far: the average follows the weights closely at first), in
    one `torch._foreach_lerp_` over all floating-point tensors (a few fused kernels instead of one per tensor);
    integer buffers are copied. `module` is a frozen copy in eval mode, on the device of the model it was made from
    (move it with `.to`). `state_dict()` / `load_state_dict()` make it a checkpointable object
    (`accelerator.register_for_checkpointing`).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def to(self, device: torch.device | str) -> ModelEMA:
        self.module.to(device)
        return self

    @property
    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend `model`'s current weights into the average (call after each optimizer step)."""
        decay = self.current_decay
        source = model.state_dict()
        averaged, current = [], []
        for name, ema_value in self.module.state_dict().items():
            value = source[name].detach().to(device=ema_value.device, dtype=ema_value.dtype)
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                current.append(value)
            else:
                ema_value.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        self.num_updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.module.load_state_dict(state["module"])
