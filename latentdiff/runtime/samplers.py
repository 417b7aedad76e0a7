"""The torch-free runtime's samplers, in numpy: the update rules of diffusers' DPMSolverMultistepScheduler
(DPM-Solver++ (2M), Lu et al. 2022, the shipped models' sampler) and LCMScheduler (Luo et al. 2023, the few-step
weights'), on schedules (timesteps, σ's) that diffusers computed when the runtime bundle was built. The bundle's
builder checks each against diffusers' own scheduler on random model outputs before it is used
(`bundle.check_samplers`), so a configuration these do not cover is never sampled wrongly: it runs in torch.
"""

from __future__ import annotations

import numpy as np


class DPMSolverPP:
    """DPM-Solver++ of order 1 or 2 (midpoint), ε-prediction, no thresholding, as diffusers' multistep scheduler
    steps it: x̂₀ = (x − σ_t ε̂) / α_t with α_t = 1/√(σ² + 1), σ_t = σ α_t; λ = ln α_t − ln σ_t, h = λ_t − λ_s;
    first order x_t = (σ_t/σ_s) x − α_t (e^(−h) − 1) x̂₀; second order adds −½ α_t (e^(−h) − 1) (x̂₀ − x̂₀')/r₀,
    r₀ = h₀/h. The last step is first order when the schedule ends at σ = 0, or has fewer than 15 steps
    (lower_order_final), or with euler_at_final."""

    def __init__(self, timesteps: list[int], sigmas: list[float], config: dict):
        self.timesteps = np.asarray(timesteps, dtype=np.int64)
        self.sigmas = np.asarray(sigmas, dtype=np.float32)
        self.order = int(config["solver_order"])
        self.config = config
        self.outputs: list[np.ndarray] = []
        self.index = 0

    @staticmethod
    def _alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
        alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
        return alpha, sigma * alpha

    def step(self, eps: np.ndarray, sample: np.ndarray) -> np.ndarray:
        i, n = self.index, len(self.timesteps)
        alpha_s0, sigma_s0 = self._alpha_sigma(self.sigmas[i])
        x0 = ((sample - sigma_s0 * eps) / alpha_s0).astype(np.float32)
        self.outputs = [*self.outputs[-(self.order - 1):], x0] if self.order > 1 else [x0]
        c = self.config
        last_first_order = i == n - 1 and (c["euler_at_final"] or (c["lower_order_final"] and n < 15)
                                           or c["final_sigmas_type"] == "zero")
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[i + 1])
        with np.errstate(divide="ignore"):  # σ = 0 at the end: λ_t = ∞, e^(−h) = 0
            lambda_t = np.log(alpha_t) - np.log(sigma_t)
        lambda_s0 = np.log(alpha_s0) - np.log(sigma_s0)
        h = lambda_t - lambda_s0
        factor = alpha_t * (np.exp(-h) - np.float32(1.0))
        ratio = sigma_t / sigma_s0
        if self.order == 1 or len(self.outputs) < 2 or last_first_order:
            out = ratio * sample - factor * x0
        else:
            alpha_s1, sigma_s1 = self._alpha_sigma(self.sigmas[i - 1])
            h0 = lambda_s0 - (np.log(alpha_s1) - np.log(sigma_s1))
            d1 = (np.float32(1.0) / (h0 / h)) * (x0 - self.outputs[-2])
            out = ratio * sample - factor * x0 - np.float32(0.5) * factor * d1
        self.index += 1
        return out.astype(np.float32)


class LCM:
    """LCMScheduler's step, ε-prediction: x̂₀ = (x − √(1 − ᾱ_t) ε̂)/√ᾱ_t, the consistency function
    f = c_skip(t) x + c_out(t) x̂₀ (σ_data = 0.5, timestep scaling 10), then, before the last step, fresh noise
    to the next timestep: x = √ᾱ_s f + √(1 − ᾱ_s) z, z drawn per image from that image's generator."""

    def __init__(self, timesteps: list[int], alphas_cumprod: list[float], final_alpha_cumprod: float,
                 timestep_scaling: float = 10.0, sigma_data: float = 0.5):
        self.timesteps = np.asarray(timesteps, dtype=np.int64)
        self.alphas = np.asarray(alphas_cumprod, dtype=np.float32)
        self.final_alpha = np.float32(final_alpha_cumprod)
        self.scaling, self.sigma_data = timestep_scaling, sigma_data
        self.index = 0

    def step(self, eps: np.ndarray, sample: np.ndarray, generators) -> np.ndarray:
        i, t = self.index, int(self.timesteps[self.index])
        prev = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else t
        alpha_t = self.alphas[t]
        alpha_s = self.alphas[prev] if prev >= 0 else self.final_alpha
        scaled = np.float64(t) * self.scaling
        c_skip = np.float32(self.sigma_data ** 2 / (scaled ** 2 + self.sigma_data ** 2))
        c_out = np.float32(scaled / (scaled ** 2 + self.sigma_data ** 2) ** 0.5)
        x0 = (sample - np.sqrt(np.float32(1.0) - alpha_t) * eps) / np.sqrt(alpha_t)
        denoised = (c_out * x0 + c_skip * sample).astype(np.float32)
        self.index += 1
        if self.index == len(self.timesteps):
            return denoised
        noise = np.concatenate([g.randn((1, *sample.shape[1:])) for g in generators])
        return (np.sqrt(alpha_s) * denoised + np.sqrt(np.float32(1.0) - alpha_s) * noise).astype(np.float32)


def guidance_embedding(w: float, batch: int, dim: int) -> np.ndarray:
    """`pipelines.guidance.guidance_embedding` of one weight w for `batch` rows, in numpy."""
    half = dim // 2
    frequencies = np.exp(np.arange(half, dtype=np.float32) * np.float32(-(np.log(10000.0) / (half - 1))))
    angles = np.float32(w * 1000.0) * frequencies
    row = np.concatenate([np.sin(angles), np.cos(angles), np.zeros(dim % 2, dtype=np.float32)])
    return np.tile(row.astype(np.float32), (batch, 1))
