"""Image-to-image and inpainting on a text-to-image model, as diffusers' StableDiffusionImg2ImgPipeline and (legacy,
4-channel U-Net) StableDiffusionInpaintPipeline do them; each overrides only the stages that differ.

- img2img (SDEdit, Meng et al. 2022): the image's latents, noised to the timestep where `strength` of the schedule
  is left (1: pure noise, the image ignored; 0: the image back), are denoised over the rest of the schedule.
- inpainting with a text-to-image U-Net (the blend of RePaint-style "replace" sampling, Lugmayr et al. 2022, without
  resampling): after each step, the known region (mask 0) of the latents is replaced by the image's latents noised
  to the next timestep, so only the masked region (mask 1, white) is generated.

Both give the images diffusers' pipelines give on the same folder and inputs; the random draws happen in the same
order (the image's latents are sampled from the VAE's posterior with the call's generator, as diffusers does).
"""

from __future__ import annotations

import inspect
from numbers import Real

import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from .text_to_image import LatentDiffusionPipeline


class LatentDiffusionImg2ImgPipeline(LatentDiffusionPipeline):
    """`pipe(prompt, image=init, strength=0.8)`: the text-to-image call's arguments, plus `image` (PIL, numpy or
    tensor, one or one per prompt; its size is the output's unless height/width are given) and `strength`."""

    default_strength = 0.8

    def __call__(self, prompt=None, image=None, strength: float | None = None, **kwargs):
        strength = self.default_strength if strength is None else strength
        if isinstance(strength, bool) or not isinstance(strength, Real) or not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1] (1: ignore the image, 0: return it), got {strength!r}")
        if image is None:
            raise ValueError(f"{type(self).__name__} needs image=, the picture to start from")
        state = self._call_state()
        state.image, state.strength = self.preprocess(image, kwargs.get("height"), kwargs.get("width")), strength
        kwargs["height"] = kwargs.get("height") or state.image.shape[-2]
        kwargs["width"] = kwargs.get("width") or state.image.shape[-1]
        try:
            return super().__call__(prompt, **kwargs)
        finally:
            state.image = state.mask = state.image_latents = state.noise = state.latent_mask = None

    def preprocess(self, image, height: int | None, width: int | None) -> torch.Tensor:
        """The image as (B, 3, H, W) in [−1, 1], resized to height × width when given (else to multiples of the
        VAE's factor)."""
        return self.image_processor.preprocess(image, height=height, width=width).to(torch.float32)

    def get_timesteps(self, scheduler, num_inference_steps, device, timesteps=None, sigmas=None) -> torch.Tensor:
        """The scheduler's schedule, of which the last `strength` part is run."""
        full = super().get_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        steps = len(full) // scheduler.order
        start = max(steps - min(int(steps * self._call_state().strength), steps), 0) * scheduler.order
        if start >= len(full):
            raise ValueError(f"strength {self._call_state().strength} of {steps} steps leaves no step to run; raise "
                             "strength or num_inference_steps")
        scheduler.timesteps = full[start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(start)
        return scheduler.timesteps

    def encode_vae_image(self, pixels: torch.Tensor, generator) -> torch.Tensor:
        """Latents sampled from the VAE's posterior of each image (one generator per image when given a list)."""
        pixels = pixels.to(device=self._execution_device, dtype=self.vae.dtype)
        if isinstance(generator, list):
            sampled = [self.vae.encode(pixels[i: i + 1]).latent_dist.sample(generator[i]) for i in range(len(pixels))]
            latents = torch.cat(sampled)
        else:
            latents = self.vae.encode(pixels).latent_dist.sample(generator)
        return self.vae.config.scaling_factor * latents.float()

    def image_rows(self, batch_size: int) -> torch.Tensor:
        """The call's images, one row per generated image: one image for all, or one per prompt (each prompt's
        repeated for its images)."""
        pixels = self._call_state().image
        if batch_size % len(pixels):
            raise ValueError(f"image must be one image or one per prompt; got {len(pixels)} for {batch_size} images")
        return pixels.repeat_interleave(batch_size // len(pixels), dim=0)

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None, scheduler=None):
        scheduler = scheduler or self.scheduler
        if latents is not None:  # the initial noise given: the image still sets where it starts
            noise = latents.to(device=device, dtype=torch.float32)
        image_latents = self.encode_vae_image(self.image_rows(batch_size), generator)
        if latents is None:
            noise = randn_tensor(image_latents.shape, generator=generator, device=device, dtype=torch.float32)
        start = scheduler.timesteps[:1].repeat(batch_size)
        return scheduler.add_noise(image_latents, noise, start)


class LatentDiffusionInpaintPipeline(LatentDiffusionImg2ImgPipeline):
    """`pipe(prompt, image=init, mask_image=mask)`: white (1) in the mask is generated, black (0) kept from
    `image`. `strength` (default 1: the masked region starts from pure noise) as in img2img."""

    default_strength = 1.0

    @property
    def mask_processor(self) -> VaeImageProcessor:
        """Masks to (B, 1, H, W) in {0, 1}: grey levels, binarised at 0.5, not normalised."""
        return VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_normalize=False, do_binarize=True,
                                 do_convert_grayscale=True)

    def __call__(self, prompt=None, image=None, mask_image=None, strength: float | None = None, **kwargs):
        if mask_image is None:
            raise ValueError(f"{type(self).__name__} needs mask_image=, white where the image is to be generated")
        self._call_state().mask = mask_image
        return super().__call__(prompt, image=image, strength=strength, **kwargs)

    def preprocess(self, image, height: int | None, width: int | None) -> torch.Tensor:
        """The image as in img2img, and the call's mask binarised to (B, 1, H, W) of the same size."""
        pixels = super().preprocess(image, height, width)
        state = self._call_state()
        state.mask = self.mask_processor.preprocess(state.mask, height=pixels.shape[-2], width=pixels.shape[-1])
        if len(state.mask) not in (1, len(pixels)):
            raise ValueError(f"mask_image must be one mask or one per image, got {len(state.mask)} for {len(pixels)}")
        return pixels

    def prepare_latents(self, batch_size, num_channels_latents, height, width, dtype, device, generator,
                        latents=None, scheduler=None):
        scheduler = scheduler or self.scheduler
        state = self._call_state()
        pixels = self.image_rows(batch_size)
        state.image_latents = self.encode_vae_image(pixels, generator)
        noise = randn_tensor(state.image_latents.shape, generator=generator, device=device, dtype=torch.float32) \
            if latents is None else latents.to(device=device, dtype=torch.float32)
        mask = state.mask.repeat_interleave(batch_size // len(state.mask), dim=0) if len(state.mask) > 1 else state.mask
        # diffusers also encodes the masked image here (a 9-channel U-Net's input); its posterior sample draws from
        # the generator, so the same draw is made to keep the later random draws (ancestral steps) the same
        randn_tensor(state.image_latents.shape, generator=generator, device=device, dtype=torch.float32)
        state.latent_mask = torch.nn.functional.interpolate(
            mask.to(device), size=state.image_latents.shape[-2:]).expand(batch_size, -1, -1, -1)
        state.noise = noise
        if state.strength == 1:
            return noise * scheduler.init_noise_sigma
        return scheduler.add_noise(state.image_latents, noise, scheduler.timesteps[:1].repeat(batch_size))

    def after_step(self, latents, i, timesteps, scheduler):
        """The known region back: the image's latents at the next timestep's noise level (clean after the last)."""
        state = self._call_state()
        known = state.image_latents
        if i < len(timesteps) - 1:
            known = scheduler.add_noise(known, state.noise, timesteps[i + 1: i + 2])
        return (1 - state.latent_mask) * known + state.latent_mask * latents


def _signature(cls, extra: list[str]) -> inspect.Signature:
    """The text-to-image call's signature with the image arguments after `prompt` (what `help()` and diffusers'
    signature checks see)."""
    base = list(inspect.signature(LatentDiffusionPipeline.__call__).parameters.values())
    defaults = {"image": None, "mask_image": None, "strength": None}
    added = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=defaults[name])
             for name in extra]
    return inspect.Signature(base[:2] + added + base[2:])


LatentDiffusionImg2ImgPipeline.__call__.__signature__ = _signature(LatentDiffusionImg2ImgPipeline,
                                                                   ["image", "strength"])
LatentDiffusionInpaintPipeline.__call__.__signature__ = _signature(LatentDiffusionInpaintPipeline,
                                                                   ["image", "mask_image", "strength"])
