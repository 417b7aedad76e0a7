"""Guidance: how the U-Net passes of one sampling step become the one ε̂ the scheduler steps with.

A guidance object says which passes a step needs (unconditional, conditional) and combines their outputs. The
pipeline runs the needed passes as one batched U-Net call, the unconditional rows first. Its scale may change
between steps (a step callback may set `pipe._guidance_scale`); which passes run is fixed when sampling starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import diffusion


@dataclass
class ClassifierFreeGuidance:
    """ε̂ = ε_u + s (ε_c − ε_u) (Ho & Salimans 2022, with s = w + 1), rescaled by φ = `rescale` (Lin et al. 2024).

    s = 1 needs only the conditional pass and s = 0 only the unconditional one; any other s needs both.
    """

    scale: float = 7.5
    rescale: float = 0.0
    uncond: bool = field(init=False)
    cond: bool = field(init=False)

    def __post_init__(self):
        self.uncond, self.cond = self.scale != 1, self.scale != 0

    @property
    def passes(self) -> int:
        return int(self.uncond) + int(self.cond)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        """ε̂ from the batched output of the passes ([uncond; cond] when both)."""
        if self.passes == 1:
            return output
        uncond, cond = output.chunk(2)
        return diffusion.classifier_free_guidance(uncond, cond, self.scale, self.rescale)


@dataclass
class EmbeddedGuidance:
    """Guidance distilled into the U-Net (LCM, Luo et al. 2023): one conditional pass, told the scale through
    `timestep_cond`, an embedding of w = s − 1."""

    scale: float = 7.5
    rescale: float = 0.0
    uncond: bool = field(default=False, init=False)
    cond: bool = field(default=True, init=False)
    passes: int = field(default=1, init=False)

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return output

    def timestep_cond(self, batch: int, dim: int, device, dtype) -> torch.Tensor:
        w = torch.full((batch,), self.scale - 1.0)
        return guidance_embedding(w, dim).to(device=device, dtype=dtype)


def guidance_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of guidance weights w (B,), as the timestep's (Vaswani et al. 2017) of 1000 w:
    sin in the first half, cos in the second, frequencies 10000^(−k/(half − 1)); an odd dim gets a zero column."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000.0) / (half - 1)))
    angles = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    return torch.nn.functional.pad(embedding, (0, dim % 2))
