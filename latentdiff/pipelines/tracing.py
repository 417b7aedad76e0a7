"""Traced inference: a module's forward recorded once with `torch.jit.trace` and replayed without Python.

A small U-Net at 16×16 latents spends a large part of each step in Python (diffusers' module calls, argument
handling, attention-processor dispatch); replaying a traced graph removes that and gives the same numbers bit for
bit on the CPU, because the same aten ops run in the same order on the same weights (CPU graphs are not fused). The
graph is not frozen: it reads the module's parameters when it runs, so weights changed in place (fine-tuning,
`fuse_lora`) are seen at once.

A graph is only valid for what it was recorded with, so `TracedCall` keys its graphs by the input shapes, dtypes
and devices and by the module's structure (its submodules, weights, attention processors and their settings), and
runs eagerly wherever a trace cannot be trusted: off the CPU (GPU graphs may be fused, so not bit-identical, and
want CUDA graphs or torch.compile instead), in training mode, under autograd or autocast, with hooks (accelerate's
and diffusers' offloading, casting and caching hooks, global module hooks), with PEFT layers anywhere (their
scales and switches are Python values a trace would freeze), and with any part already `torch.compile`d.

torch 2.15 marks `torch.jit.trace` deprecated in favour of torch.compile and torch.export. It is used here because
it is what works at this size on a CPU: recording the `small` U-Net takes about 0.5 s, where torch.compile took
40–57 s on the 2-core development machine before its first image (benchmarks/RESULTS.md), and an exported
program replays through Python again. The deprecation warning is silenced for the recording only.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable

import torch

from .recording import Forward, setting

# what every nn.Module holds (parameters, buffers, submodules, hooks): covered apart or checked by traceable()
_MODULE_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}
_PLAIN = frozenset({bool, int, float, str, type(None)})  # settings that stand for themselves (the common case)
MAX_GRAPHS = 8  # per module: one per (batch, size, dtype) in use; the oldest is dropped beyond this
BACKENDS = ("openvino", "torch")
logger = logging.getLogger(__name__)


def default_backend() -> str:
    """"openvino" where it is installed, unless $LATENTDIFF_BACKEND says "torch" (traced graphs only)."""
    from . import openvino

    wanted = os.environ.get("LATENTDIFF_BACKEND", "openvino")
    if wanted not in BACKENDS:
        raise ValueError(f"LATENTDIFF_BACKEND must be one of {BACKENDS}, got {wanted!r}")
    return wanted if wanted == "torch" or openvino.available() else "torch"


class TracedCall:
    """`fn(module, *tensors)` → tensor, replayed from cached traces where that is safe, eagerly otherwise.

    `bind(module)` checks the module once (per pipeline call, say) and returns the function to call per step. fn
    must be a module-level pure function of the tensors and the module. A graph is recorded the second time a bind
    meets the same key, not the first: recording costs about as much as a dozen steps, which one-off calls
    (`latentdiff generate`) would not win back. With `backend="openvino"` the graph is compiled by OpenVINO
    instead (`openvino.py`: about 3 s for the shipped U-Net, under 1 s from the disk cache), falling back to a
    trace where that fails (with a warning) or the module's dtype is not one OpenVINO runs. Graphs of another
    structure (a replaced module, weights changed in place) are dropped at the next bind, so they do not keep old
    weights alive. Copies and pickles start with no graphs.
    """

    def __init__(self, fn: Callable[..., torch.Tensor]):
        self.fn = fn
        self._graphs: OrderedDict = OrderedDict()
        self._first_seen: OrderedDict = OrderedDict()  # key → the bind that met it first
        self._lock = threading.Lock()

    def bind(self, module: torch.nn.Module, trace: bool = True, backend: str = "torch",
             first_call: bool = False) -> Callable[..., torch.Tensor]:
        """The function to call per step; `first_call=True` records a key's graph at its first call instead of its
        second (a server: every call of a shape then runs the same graph, so a request's bytes never depend on
        whether its shape was seen before)."""
        modules = list(module.modules())  # one walk for both checks
        if not (trace and traceable(module, modules)):
            return functools.partial(self.fn, module)
        structure, session = _Structure(structure_key(module, modules)), object()
        with self._lock:
            for cache in (self._graphs, self._first_seen):
                for key in [k for k in cache if k[0] != structure]:
                    del cache[key]
            # the equal structure the caches hold, so each step's lookup compares it by identity
            structure = next((k[0] for k in (*self._graphs, *self._first_seen)), structure)

        def call(*tensors: torch.Tensor) -> torch.Tensor:
            key = (structure, *((t.shape, t.dtype, t.device) for t in tensors))
            with self._lock:
                graph = self._graphs.get(key)
                if graph is None and not first_call and self._first_seen.setdefault(key, session) is session:
                    _trim(self._first_seen, 8 * MAX_GRAPHS)
                    graph = "eager"
                elif graph is None:
                    graph = self._compile(module, tensors) if backend == "openvino" else None
                if graph is None:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # its branches are in the key
                        warnings.filterwarnings("ignore", "`torch.jit.trace", FutureWarning)  # see the docstring
                        # the tracer reads every attribute of the module, deprecated properties too (transformers 5.25:
                        # `is_gradient_checkpointing`), each of which warns
                        warnings.filterwarnings("ignore", ".*deprecated", FutureWarning)
                        graph = torch.jit.trace(Forward(module, self.fn), tensors, check_trace=False)
                if graph != "eager" and key not in self._graphs:
                    self._graphs[key] = graph
                    _trim(self._graphs, MAX_GRAPHS)
                elif graph != "eager":
                    self._graphs.move_to_end(key)
            return self.fn(module, *tensors) if graph == "eager" else graph(*tensors)

        return call

    def _compile(self, module: torch.nn.Module, tensors: tuple[torch.Tensor, ...]):
        """The OpenVINO graph of this call, or None (the caller traces instead)."""
        from . import openvino

        if next(module.parameters()).dtype not in openvino.PRECISION:  # fp16 on the CPU: a trace
            return None
        try:
            return openvino.compile_graph(module, self.fn, tensors)
        except Exception as error:  # noqa: BLE001 - whatever fails, the trace computes the same call
            logger.warning("OpenVINO could not compile %s for inputs %s (%s: %s); using a torch trace instead",
                           type(module).__name__, [tuple(t.shape) for t in tensors], type(error).__name__, error)
            return None

    def clear(self) -> None:
        with self._lock:
            self._graphs.clear()
            self._first_seen.clear()

    def __getstate__(self) -> dict:  # graphs and locks neither pickle nor belong to a copy's modules
        return {"fn": self.fn}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["fn"])


def _trim(cache: OrderedDict, size: int) -> None:
    while len(cache) > size:
        cache.popitem(last=False)


class _Structure:
    """A structure key with its hash computed once: graph lookups happen every sampling step."""

    __slots__ = ("key", "hash")

    def __init__(self, key: tuple):
        self.key, self.hash = key, hash(key)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other) -> bool:
        return self is other or isinstance(other, _Structure) and self.hash == other.hash and self.key == other.key


def traceable(module: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> bool:
    """Whether a trace of `module` replays what an eager call would compute (see the module docstring).
    `modules`: `list(module.modules())`, when the caller has it."""
    modules = list(module.modules()) if modules is None else modules
    if module.training or torch.is_grad_enabled() or any(t.device.type != "cpu" for t in _tensors(modules)):
        return False
    if torch.is_autocast_enabled("cpu") or (torch.cuda.is_available() and torch.is_autocast_enabled("cuda")):
        return False
    hooks = torch.nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    for m in modules:  # attributes looked up in __dict__ / _modules: a missing one through getattr raises inside
        attributes = m.__dict__  # nn.Module.__getattr__, which made this check a third of a bind
        if m._forward_hooks or m._forward_pre_hooks or "_hf_hook" in attributes or "_diffusers_hook" in attributes:
            return False
        if "_orig_mod" in m._modules or attributes.get("_compiled_call_impl") is not None:  # torch.compile'd
            return False
        if type(m).__module__.startswith("peft.") or attributes.get("peft_config"):  # LoRA layers and models
            return False
    return True


def structure_key(module: torch.nn.Module, modules: list[torch.nn.Module] | None = None) -> tuple:
    """What a trace bakes in besides the inputs: the type and identity of every submodule and attention processor
    and every Python setting they hold (VAE slicing and tiling, FreeU factors, chunk sizes …), and where and in
    which dtype every weight lives, and its version (bumped by every in-place change: a compiled graph holds a copy
    of the weights)."""
    modules = list(module.modules()) if modules is None else modules
    parts = []
    for m in modules:
        processor = getattr(m, "processor", None)
        for obj in (m, processor) if processor is not None else (m,):
            settings = tuple((k, v if type(v) in _PLAIN else setting(v)) for k, v in vars(obj).items()
                             if k not in _MODULE_INTERNALS)
            parts.append((type(obj), id(obj), settings))
    return tuple(parts), tuple((id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in _tensors(modules))


def _tensors(modules: list[torch.nn.Module]):
    """Every parameter and buffer of the modules (what module.parameters() and buffers() walk the tree again for)."""
    for m in modules:
        yield from (t for t in m._parameters.values() if t is not None)
        yield from (t for t in m._buffers.values() if t is not None)
