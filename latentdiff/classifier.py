"""The noise-aware latent classifier p_φ(y | x_t) of classifier guidance (Dhariwal & Nichol 2021): trained by
training/train_classifier.py, used in sampling by `pipe(..., classifier=...)` (`pipelines.guidance.ClassifierGuidance`).
"""

from __future__ import annotations

import math

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config


class NoisyLatentClassifier(ModelMixin, ConfigMixin):
    """logits = f(x_t, t): three convolution blocks over the latent grid (the last two strided), each shifted by an
    embedding of t, average and max pooling, and a linear head. `classes` names the labels in order."""

    @register_to_config
    def __init__(self, in_channels: int = 4, width: int = 64, classes: tuple[str, ...] = (),
                 num_train_timesteps: int = 1000):
        super().__init__()
        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {list(classes)}")
        self.time = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.SiLU(), torch.nn.Linear(width, 3 * width))
        self.stem = torch.nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.GroupNorm(8, width), torch.nn.SiLU(),
                                torch.nn.Conv2d(width, width, 3, stride=2 if k else 1, padding=1))
            for k in range(3))
        self.norm = torch.nn.Sequential(torch.nn.GroupNorm(8, width), torch.nn.SiLU())
        self.head = torch.nn.Linear(2 * width, len(classes))  # average- and max-pooled: small objects count too

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(len(x)).float()
        freqs = torch.exp(-math.log(10_000) * torch.arange(32, device=x.device) / 32)
        angles = t[:, None] * freqs[None]
        shifts = self.time(torch.cat([angles.sin(), angles.cos()], dim=1)).chunk(3, dim=1)
        h = self.stem(x)
        for block, shift in zip(self.blocks, shifts):
            h = block(h + shift[:, :, None, None])
        h = self.norm(h)
        return self.head(torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1))
