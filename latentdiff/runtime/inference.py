"""What the pipeline's OpenVINO backend (`pipelines/openvino.py`) and the torch-free runtime share, without torch:
the cache root, the one OpenVINO Core of the process, and running an even batch as two halves in parallel.

Two halves: on the 2-core development machine two batch-1 U-Net passes on one core each took 9.9 ms where one
batch-2 pass on both took 11.1 ms (bf16: 5.2 against 7.0 ms), and a guided step at batch 1 is such a pair. A network
meant for batch B is then compiled for B/2 with two streams and called through two infer requests at once.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

_CORE: list = []
_CORE_LOCK = threading.Lock()


def cache_home() -> Path:
    """$LATENTDIFF_CACHE, else $XDG_CACHE_HOME/latentdiff (default ~/.cache/latentdiff)."""
    root = os.environ.get("LATENTDIFF_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"),
                                                       "latentdiff")
    return Path(root)


def core():
    """One OpenVINO Core per process: creating several and compiling with them crashed the test suite with a
    segmentation fault (as ultralytics reports, PR #25864)."""
    import openvino as ov

    with _CORE_LOCK:
        if not _CORE:
            _CORE.append(ov.Core())
        return _CORE[0]


def half_of(batch: int) -> int | None:
    """The half batch an even batch of ≥ 2 runs as, on a machine with two cores or more; else None."""
    return batch // 2 if batch >= 2 and batch % 2 == 0 and (os.cpu_count() or 1) >= 2 else None


def compile_hints(half: int | None) -> dict:
    """Two streams for the halves, else OpenVINO's latency hint (one request on every core)."""
    return {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": 2} if half else {"PERFORMANCE_HINT": "LATENCY"}


def halves(arrays: list[np.ndarray], half: int) -> list[list[np.ndarray]]:
    """The two halves of the inputs: those whose first dimension is the batch are cut, the others go to both."""
    batch = 2 * half
    return [[a[k * half:(k + 1) * half] if a.ndim and a.shape[0] == batch else a for a in arrays] for k in (0, 1)]


def infer(requests: list, arrays: list[np.ndarray], half: int | None) -> np.ndarray:
    """The first output for `arrays`: through one request, or, with `half`, as two halves run in parallel through
    two requests (inputs read in place, not copied)."""
    if half is None:
        requests[0].infer(arrays, share_inputs=True)
        return requests[0].get_output_tensor(0).data.copy()
    for request, inputs in zip(requests, halves(arrays, half)):
        request.start_async(inputs, share_inputs=True)
    for request in requests:
        request.wait()
    return np.concatenate([r.get_output_tensor(0).data for r in requests])
