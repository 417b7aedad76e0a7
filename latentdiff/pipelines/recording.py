"""What a recorded graph is made of and keyed by: a function of a module as a module, and hashable stand-ins for
the Python settings a recording bakes in. Shared by torch traces (`tracing.py`) and OpenVINO (`openvino.py`)."""

from __future__ import annotations

from collections.abc import Callable

import torch


class Forward(torch.nn.Module):
    """`fn(module, *tensors)` as a module, so that torch.jit.trace records it with `module`'s parameters."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *tensors):
        return self.fn(self.module, *tensors)


def setting(value, identity: Callable[[object], object] = id):
    """A hashable stand-in for a Python setting: itself for plain values, contents for containers, else its type
    and `identity` (the object's id; a disk cache, which outlives the process, passes one that drops it)."""
    if isinstance(value, (bool, int, float, str, type(None), torch.dtype, torch.device)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(setting(v, identity) for v in value)
    if isinstance(value, dict):
        return tuple((k, setting(v, identity)) for k, v in value.items())
    if isinstance(value, torch.Tensor):
        return ("tensor", identity(value))
    return (type(value).__name__, identity(value))
