"""OpenVINO as the CPU backend of the pipeline's compiled calls (the U-Net step and the VAE decoder).

OpenVINO compiles a whole network for the CPU it runs on (fused convolutions, normalisations and attention, static
shapes), which runs the small U-Net's step faster than torch's kernels at batch 1-2; in fp32 its images match
eager ones to within one level of 255, not bit for bit. `TracedCall` (`tracing.py`) decides when a graph is
compiled: the second time a call meets the same shapes (the first runs eagerly, so a one-off call never waits for
a compilation); from the third on, calls run the compiled network.

A compiled network holds a copy of the weights: `TracedCall` keys graphs by every weight's identity and version,
so weights changed in place (an optimiser step, `load_state_dict`, `fuse_lora`) make a new graph; writes through
`.data` bypass the version counter and are not seen (call `pipe.clear_compiled()` after those).

Converting a network takes seconds (about 3 s for the shipped U-Net on the 2-core development machine), so each
converted network is kept on disk, keyed by the hash of its weights, structure and input shapes and by the
versions of OpenVINO and torch, in `$LATENTDIFF_CACHE` (default `~/.cache/latentdiff`)`/openvino`; a later process
reads it back and compiles it in under a second. The cache keeps the 32 networks written last.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from ..runtime import inference
from .recording import Forward, setting

logger = logging.getLogger(__name__)
PRECISION = {torch.float32: "f32", torch.bfloat16: "bf16"}  # the module dtypes OpenVINO runs, and at what precision
MAX_CACHED = 32  # networks kept in the disk cache (the shipped U-Net's is 10 MB)


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def cache_dir() -> Path:
    return inference.cache_home() / "openvino"


class OpenVINOGraph:
    """A compiled network called like the traced one: torch tensors in, a torch tensor out (in `dtype`). Each
    thread has its own infer requests, so threads sharing a pipeline do not share buffers.

    With `half` set, the network was compiled for half the batch with two streams, and a call runs the two halves
    of its batch as two requests in parallel (`latentdiff.runtime.inference`, which says why)."""

    def __init__(self, compiled, dtype: torch.dtype, half: int | None = None):
        self.compiled, self.dtype, self.half = compiled, dtype, half
        self._local = threading.local()

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        requests = getattr(self._local, "requests", None)
        if requests is None:
            requests = self._local.requests = [self.compiled.create_infer_request() for _ in range(2 if self.half
                                                                                                  else 1)]
        output = inference.infer(requests, [_as_numpy(t) for t in tensors], self.half)
        return torch.from_numpy(output).to(self.dtype)


def compile_graph(module: torch.nn.Module, fn: Callable, tensors: tuple[torch.Tensor, ...],
                  parallel_halves: bool = True) -> OpenVINOGraph:
    """`fn(module, *tensors)` compiled by OpenVINO for these input shapes: read from the disk cache when it is there
    (compiling then takes about 0.6 s for the shipped U-Net), else traced, converted (about 3 s) and saved there.
    An even batch on a machine with two cores or more runs as two parallel halves (`OpenVINOGraph`), unless
    `parallel_halves` is False (one request, OpenVINO's latency hint: what optimum-intel compiles)."""
    import openvino as ov

    dtype = next(module.parameters()).dtype
    half = inference.half_of(tensors[0].shape[0] if tensors[0].dim() else 0) if parallel_halves else None
    if half:  # compiled for half the batch, run as two parallel requests (OpenVINOGraph)
        tensors = tuple(t[:half] if t.dim() and t.shape[0] == 2 * half else t for t in tensors)
    folder = cache_dir() / content_key(module, fn, tensors, ov.__version__)
    core = inference.core()
    if (folder / "model.xml").is_file():
        model = core.read_model(folder / "model.xml")
    else:
        model = _convert(module, fn, tensors)
        _save(model, folder)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION[dtype],
                                                 **inference.compile_hints(half)})
    return OpenVINOGraph(compiled, dtype, half)


def _convert(module: torch.nn.Module, fn: Callable, tensors):
    """The OpenVINO model of a trace of `fn` with fp32 weights (OpenVINO runs them at the hinted precision; a module
    in another dtype is traced on an fp32 copy), its input shapes fixed."""
    import openvino as ov

    if next(module.parameters()).dtype != torch.float32:
        module = copy.deepcopy(module).float().eval()
    example = tuple(t.float() if t.is_floating_point() else t for t in tensors)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: the branches they warn of are fixed by the shapes
        trace = torch.jit.trace(Forward(module, fn), example, check_trace=False)
        return ov.convert_model(trace, example_input=example, input=[list(t.shape) for t in tensors])


def content_key(module: torch.nn.Module, fn: Callable, tensors, ov_version: str) -> str:
    """A hash of what the compiled network depends on: its code (types and settings of every submodule and
    attention processor, the function), its weights, the input shapes and dtypes, and the library versions."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{fn.__module__}.{fn.__qualname__}|{torch.__version__}|{ov_version}".encode())
    for m in module.modules():
        processor = getattr(m, "processor", None)
        for obj in (m, processor) if processor is not None else (m,):
            settings = [(k, setting(v, identity=lambda _: None)) for k, v in sorted(vars(obj).items())
                        if not k.startswith("_") and not isinstance(v, torch.nn.Module)]
            digest.update(repr((type(obj).__qualname__, settings)).encode())
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        digest.update(t.detach().float().contiguous().numpy().tobytes())
    digest.update(repr([(tuple(t.shape), t.dtype) for t in tensors]).encode())
    return digest.hexdigest()


def _save(model, folder: Path) -> None:
    """The converted network into `folder`, whole or not at all (written beside it, then renamed)."""
    import openvino as ov

    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        ov.save_model(model, staging / "model.xml", compress_to_fp16=False)
        os.replace(staging, folder)
    except OSError as error:  # another process saved the same network first, or the disk is full
        logger.debug("not cached: %s", error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    kept = sorted((p for p in folder.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[MAX_CACHED:]:  # the least recently written go
        shutil.rmtree(old, ignore_errors=True)


def _as_numpy(t: torch.Tensor):
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).contiguous().numpy()
