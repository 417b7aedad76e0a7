"""A torch-free runtime for `latentdiff generate`: OpenVINO networks, numpy samplers and a numpy copy of torch's
seeded noise, so that a command-line call starts in about a second instead of the eight that importing torch,
diffusers and transformers and building the modules take.

A model's *runtime bundle* is built once, with torch (`bundle.build`, `latentdiff compile`, or in the background
after the first `latentdiff generate` of a model): its text encoder, U-Net (and few-step student) and VAE decoder
converted to OpenVINO IR with free batch and size, the schedules diffusers computes for 1–100 steps, and the
tokenizer. It lives in `$LATENTDIFF_CACHE/runtime/KEY`, KEY a hash of the model folder's file names, sizes and
modification times and of the latentdiff and OpenVINO versions, so a changed model gets a new bundle.

`generate.run` then makes the same images as the torch pipeline for the same seed (within the one level of 255 by
which OpenVINO's float32 kernels differ from torch's) from the bundle alone. It covers what the command line asks
for most: text to image with the model's own sampler (DPM-Solver++, or LCM with the few-step weights). Anything
else (img2img, inpainting, another --scheduler, a model without a bundle, $LATENTDIFF_BACKEND=torch) runs in torch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

MAX_STEPS = 100  # schedules are stored for 1 … MAX_STEPS steps


def cache_root() -> Path:
    from .inference import cache_home

    return cache_home() / "runtime"


def bundle_key(model_dir: Path) -> str:
    """A hash of the model folder's files (relative names, sizes, modification times) and of the versions that
    shape a bundle; computed without reading the weights."""
    from importlib.metadata import version

    from .. import __version__

    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{__version__}|{version('openvino')}".encode())
    for path in sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.name != "recipe.json"):
        stat = path.stat()
        digest.update(f"{path.relative_to(model_dir)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def bundle_dir(model_dir: Path) -> Path:
    return cache_root() / bundle_key(model_dir)
