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
    `interval` (start, stop): guidance applies only at the steps i of N with int(start·N) ≤ i < int(stop·N), as
    diffusers' guiders count them; elsewhere ε̂ = ε_c. Guidance at high noise (the first steps) is what costs
    diversity and breaks counts (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval").
    """

    scale: float = 7.5
    rescale: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    uncond: bool = field(init=False)
    cond: bool = field(init=False)

    def __post_init__(self):
        self.uncond, self.cond = self.scale != 1, self.scale != 0

    @property
    def passes(self) -> int:
        return int(self.uncond) + int(self.cond)

    def applies(self, step: int, steps: int) -> bool:
        """Whether step `step` (0-based) of `steps` lies in the guidance interval."""
        return int(self.interval[0] * steps) <= step < int(self.interval[1] * steps)

    def __call__(self, output: torch.Tensor, step: int = 0, steps: int = 1) -> torch.Tensor:
        """ε̂ at step `step` of `steps` from the batched output of the passes ([uncond; cond] when both)."""
        if self.passes == 1:
            return output
        uncond, cond = output.chunk(2)
        if not self.applies(step, steps):
            return cond
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

    def __call__(self, output: torch.Tensor, step: int = 0, steps: int = 1) -> torch.Tensor:
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


@dataclass
class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021, Algorithm 2 in ε form): after classifier-free guidance,
    ε̂ ← ε̂ − s √(1 − ᾱ_t) ∇_{x_t} log p_φ(y | x_t), the gradient taken through a noise-aware classifier of the
    latents (`models.NoisyLatentClassifier`, trained by training/train_classifier.py) at the step's x_t and t.
    A U-Net that predicts v or x_0 has its output turned into ε, guided, and turned back."""

    classifier: torch.nn.Module
    labels: torch.Tensor  # (B,) the class index wanted for each image
    scale: float
    alphas_cumprod: torch.Tensor  # the model's training schedule ᾱ_t, t = 0 … T − 1
    prediction_type: str = "epsilon"

    def gradient(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """∇_{x_t} log p_φ(y | x_t), one row per image."""
        device, dtype = next(self.classifier.parameters()).device, next(self.classifier.parameters()).dtype
        with torch.enable_grad():
            x = x_t.detach().to(device, dtype).requires_grad_(True)
            times = torch.as_tensor(t, device=device, dtype=torch.float32).reshape(-1).expand(len(x))
            log_p = torch.log_softmax(self.classifier(x, times).float(), dim=-1)
            chosen = log_p.gather(1, self.labels.to(device)[:, None]).sum()
            (grad,) = torch.autograd.grad(chosen, x)
        return grad.to(x_t.device, torch.float32)

    def __call__(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        """The guided model output, from the (CFG-combined) output and the step's x_t (the scaled model input)."""
        if self.scale == 0:
            return output
        index = min(max(int(round(float(t))), 0), len(self.alphas_cumprod) - 1)
        alpha_bar = self.alphas_cumprod[index].to(output.device, torch.float32)
        x_t = x_t.float()
        eps = {"epsilon": lambda: output,
               "v_prediction": lambda: diffusion.predict_eps_from_v(x_t, output, alpha_bar),
               "sample": lambda: diffusion.predict_eps_from_x0(x_t, output, alpha_bar)}[self.prediction_type]()
        guided = diffusion.classifier_guidance(eps, self.gradient(x_t, t), alpha_bar, self.scale)
        if self.prediction_type == "epsilon":
            return guided
        x0 = diffusion.predict_x0_from_eps(x_t, guided, alpha_bar)
        return x0 if self.prediction_type == "sample" else diffusion.predict_v(x0, guided, alpha_bar)
