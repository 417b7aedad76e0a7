"""Traced inference: a module's forward recorded once with `torch.jit.trace` and replayed without Python.

A small U-Net at 16×16 latents spends a large part of each step in Python (diffusers' module calls, argument
handling, attention-processor dispatch); replaying a traced graph removes that and gives the same numbers bit for
bit, because the same aten ops run in the same order on the same weights. The graph is not frozen: it reads the
module's parameters when it runs, so weights changed in place (fine-tuning, `fuse_lora`) are seen at once.

A graph is only valid for what it was recorded with, so `TracedCall` keys its graphs by the input shapes, dtypes
and devices and by the module's structure (its submodules, weights, attention processors and their settings), and
falls back to eager calls wherever a trace cannot be trusted: in training mode, under autograd, with accelerate
hooks (CPU offload), with PEFT adapters (their scales and switches are Python values a trace would freeze), and
for modules that are already `torch.compile`d.
"""

from __future__ import annotations

import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

MAX_GRAPHS = 8  # per module: one per (batch, size, dtype) in use; the oldest is dropped beyond this


class _Forward(torch.nn.Module):
    """`fn(module, *tensors)` as a module, so that torch.jit.trace records it with `module`'s parameters."""

    def __init__(self, module: torch.nn.Module, fn: Callable):
        super().__init__()
        self.module, self.fn = module, fn

    def forward(self, *tensors):
        return self.fn(self.module, *tensors)


class TracedCall:
    """`fn(module, *tensors)` → tensor, replayed from cached traces where that is safe, eagerly otherwise.

    `bind(module)` checks the module once (per pipeline call, say) and returns the function to call per step. fn
    must be a pure function of the tensors and the module. A graph is recorded the second time a bind meets the
    same key, not the first: recording costs about as much as a dozen steps, which one-off calls (`latentdiff
    generate`) would not win back.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self._graphs: OrderedDict = OrderedDict()
        self._first_seen: OrderedDict = OrderedDict()  # key → the bind that met it first

    def bind(self, module: torch.nn.Module, trace: bool = True) -> Callable[..., torch.Tensor]:
        if not (trace and traceable(module)):
            return functools.partial(self.fn, module)
        structure, session = structure_key(module), object()

        def call(*tensors: torch.Tensor) -> torch.Tensor:
            key = (structure, *((t.shape, t.dtype, t.device) for t in tensors))
            graph = self._graphs.get(key)
            if graph is None and self._first_seen.setdefault(key, session) is session:
                _trim(self._first_seen, 8 * MAX_GRAPHS)
                return self.fn(module, *tensors)
            if graph is None:
                with warnings.catch_warnings():  # TracerWarnings: the Python branches they name are in the key
                    warnings.simplefilter("ignore")
                    graph = torch.jit.trace(_Forward(module, self.fn), tensors, check_trace=False)
                self._graphs[key] = graph
                _trim(self._graphs, MAX_GRAPHS)
            self._graphs.move_to_end(key)
            return graph(*tensors)

        return call

    def clear(self) -> None:
        self._graphs.clear()
        self._first_seen.clear()


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


def traceable(module: torch.nn.Module) -> bool:
    """Whether a trace of `module` replays what an eager call would compute."""
    if module.training or torch.is_grad_enabled() or hasattr(module, "_orig_mod"):  # _orig_mod: torch.compile'd
        return False
    if getattr(module, "_hf_peft_config_loaded", False) or getattr(module, "peft_config", None):
        return False
    return not any(hasattr(m, "_hf_hook") or m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def structure_key(module: torch.nn.Module) -> tuple:
    """What a trace bakes in besides the inputs: the identity of every submodule, parameter, buffer and attention
    processor, and every plain Python setting they hold (VAE slicing and tiling, FreeU factors, chunk sizes …)."""
    parts = []
    for m in module.modules():
        processor = getattr(m, "processor", None)
        for obj in (m, processor) if processor is not None else (m,):
            settings = tuple((k, v) for k, v in vars(obj).items() if isinstance(v, (bool, int, float, str, type(None))))
            parts.append((id(obj), settings))
    tensors = (*module.parameters(), *module.buffers())
    return tuple(parts), tuple((id(t), t.data_ptr(), t.dtype, t.device) for t in tensors)
