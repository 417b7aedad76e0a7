"""Text to image from a runtime bundle, without torch: tokenise (`tokenizers`), encode, sample with classifier-free
guidance (or the few-step student's embedded guidance), decode, as `LatentDiffusionPipeline.__call__` does for the
same arguments (its noise, step for step, from `noise.TorchGenerator`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from . import inference
from .noise import TorchGenerator
from .samplers import LCM, DPMSolverPP, guidance_embedding

class Runtime:
    """A bundle, its networks compiled on first use for each input shape."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "bundle.json").read_text())
        self._compiled: dict = {}

    def supports(self, steps: int, height: int, width: int) -> bool:
        factor = self.config["vae_scale_factor"]
        return (1 <= steps <= len(self.config["dpm"]["schedules"]) and height % factor == 0 and width % factor == 0)

    def uses_few_step(self, steps: int) -> bool:
        return "lcm" in self.config and steps <= self.config["lcm"]["max_steps"]

    def _requests(self, name: str, shapes: list[list[int]], half: int | None) -> list:
        key = (name, tuple(map(tuple, shapes)), half)  # a half's shape alone is also a whole batch's
        if key not in self._compiled:
            core = inference.core()
            model = core.read_model(self.folder / f"{name}.xml")
            model.reshape({i: shape for i, shape in enumerate(shapes)})
            compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32",
                                                         "CACHE_DIR": str(self.folder / "compiled"),
                                                         **inference.compile_hints(half)})
            self._compiled[key] = [compiled.create_infer_request() for _ in range(2 if half else 1)]
        return self._compiled[key]

    def _run(self, name: str, *arrays: np.ndarray) -> np.ndarray:
        """The network on these inputs; an even batch as two halves in parallel (`inference.infer`)."""
        half = inference.half_of(arrays[0].shape[0])
        shapes = [list(a.shape) for a in (inference.halves(list(arrays), half)[0] if half else arrays)]
        return inference.infer(self._requests(name, shapes, half), list(arrays), half)

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """The pipeline's `tokenize`: ids padded to the context, or cut to its first L − 1 tokens plus end-of-text."""
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        length, eos, pad = self.config["context"], self.config["eos"], self.config["pad"]
        rows = [e.ids for e in tokenizer.encode_batch(prompts)]
        rows = [ids[: length - 1] + [eos] if len(ids) > length else ids + [pad] * (length - len(ids)) for ids in rows]
        return np.asarray(rows, dtype=np.int64)

    def __call__(self, prompt: str | list[str], seeds: list[int], steps: int, guidance_scale: float,
                 negative_prompt: str | None = None, height: int | None = None,
                 width: int | None = None, guidance_rescale: float = 0.0,
                 guidance_interval: tuple[float, float] = (0.0, 1.0)) -> np.ndarray:
        """Images (n, H, W, 3) uint8, one per seed: of one prompt, or of a list of n prompts (one per image).
        `guidance_rescale` is φ of `diffusion.classifier_free_guidance` and `guidance_interval` the fraction of the
        steps that are guided, as the pipeline's (the few-step student ignores both, as the pipeline's embedded
        guidance does)."""
        c = self.config
        factor, (h0, w0) = c["vae_scale_factor"], c["sample_size"]
        height, width = height or h0 * factor, width or w0 * factor
        n, few_step = len(seeds), self.uses_few_step(steps)
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"prompt: one prompt, or one per seed ({n}), got {len(prompts)}")
        uncond, cond = (False, True) if few_step else (guidance_scale != 1, guidance_scale != 0)
        texts = ([negative_prompt or ""] * n if uncond else []) + (prompts if cond else [])
        unique = list(dict.fromkeys(texts))  # each distinct text encoded once
        states = self._run("text_encoder", self.tokenize(unique))
        embeds = states[[unique.index(text) for text in texts]]
        generators = [TorchGenerator(s) for s in seeds]
        shape = (1, c["latent_channels"], height // factor, width // factor)
        latents = np.concatenate([g.randn(shape) for g in generators])
        if few_step:
            lc = c["lcm"]
            sampler = LCM(lc["timesteps"][str(steps)], lc["alphas_cumprod"], lc["final_alpha_cumprod"],
                          lc["timestep_scaling"])
            extra = (guidance_embedding(guidance_scale - 1.0, n, lc["dim"]),)
        else:
            schedule = c["dpm"]["schedules"][str(steps)]
            sampler = DPMSolverPP(schedule["timesteps"], schedule["sigmas"], c["dpm"]["config"])
            latents = latents * np.float32(c["dpm"]["init_noise_sigma"])
            extra = ()
        first, stop = (int(f * len(sampler.timesteps)) for f in guidance_interval)
        for i, t in enumerate(sampler.timesteps):
            model_input = np.concatenate([latents] * (int(uncond) + int(cond)))
            output = self._run("student" if few_step else "unet", model_input, np.asarray(t, dtype=np.int64),
                               embeds, *extra).astype(np.float32)
            if uncond and cond and not first <= i < stop:
                output = output[n:]
            elif uncond and cond:
                u, k = output[:n], output[n:]
                output = u + np.float32(guidance_scale) * (k - u)
                if guidance_rescale > 0:  # toward the conditional ε's standard deviation, per image
                    axes = tuple(range(1, output.ndim))
                    rescaled = output * (k.std(axis=axes, ddof=1, keepdims=True)
                                         / output.std(axis=axes, ddof=1, keepdims=True))
                    output = (np.float32(guidance_rescale) * rescaled
                              + np.float32(1 - guidance_rescale) * output).astype(np.float32)
            latents = sampler.step(output, latents, generators) if few_step else sampler.step(output, latents)
            if not np.isfinite(latents).all():
                raise FloatingPointError(f"the latents became NaN or infinite (guidance_scale {guidance_scale})")
        decoded = self._run("decoder", (latents / np.float32(c["scaling_factor"])).astype(np.float32))
        images = np.clip(decoded / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1)
        return (images * 255).round().astype(np.uint8)
