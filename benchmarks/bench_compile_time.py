"""The compile time of the default backend: four calls of the shipped model in a fresh process, each timed.

    LATENTDIFF_CACHE=$(mktemp -d) python benchmarks/bench_compile_time.py   # run twice: empty cache, then warm

The first call runs eagerly, the second converts and compiles the text encoder, U-Net and decoder (or reads them
from the disk cache, `$LATENTDIFF_CACHE`), the third and fourth run compiled: call 2 minus call 3 is the compile
time. "a tiger", 20 steps, guidance 7.5, seed 0.
"""

import os
import time

import torch

from latentdiff import LatentDiffusionPipeline

pipe = LatentDiffusionPipeline.from_pretrained()
pipe.set_progress_bar_config(disable=True)
seconds = []
for _ in range(4):
    started = time.perf_counter()
    pipe("a tiger", num_inference_steps=20, generator=[torch.Generator().manual_seed(0)])
    seconds.append(time.perf_counter() - started)
print(f"cache {os.environ.get('LATENTDIFF_CACHE', '~/.cache/latentdiff')}: calls of "
      + ", ".join(f"{s:.2f}" for s in seconds) + f" s; compile ≈ {seconds[1] - seconds[2]:.1f} s")
