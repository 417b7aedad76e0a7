"""Text-to-image generation: `pipe("a tiger", guidance_scale=7.5).images[0]`."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
from numbers import Integral, Real
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from . import attention, diffusion, model_folder
from .models import save_clip_folder, vae_scale_factor
from .tracing import TracedCall

logger = logging.getLogger(__name__)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
MAX_SIZE_FACTOR = 8  # height and width up to 8× the model's native size: beyond, memory, not quality, is the limit


class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Latent diffusion (Rombach et al. 2022) conditioned on a CLIP text encoder, with classifier-free guidance.

    The five components are those of a Stable Diffusion pipeline, so folders move between this class and
    diffusers' `StableDiffusionPipeline` in both directions; `clip` is the full CLIP the text encoder came from,
    kept for evaluation (CLIP score) and saved as `clip/`. LoRA weights load with `pipe.load_lora_weights(dir)`.

    Speed: on the CPU, from the second call with the same shapes on, the U-Net and the VAE decoder run as cached
    `torch.jit.trace` graphs (`latentdiff.tracing`): the same ops on the same weights, so the same images, without
    Python's per-module overhead. Set `pipe.use_tracing = False` for plain eager calls. Reduced precision:
    `pipe.to(dtype=torch.bfloat16)` (or `torch_dtype=` in from_pretrained) runs the networks in bf16 while the
    sampler's arithmetic (the initial noise included) stays in float32; on the CPU their attention then runs as
    plain bf16 matmuls (`latentdiff.attention`), which is faster there.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["clip"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        clip: CLIPModel | None = None,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              clip=clip)
        self.vae_scale_factor = vae_scale_factor(vae.config)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        for model in (unet, vae):
            attention.fit(model)  # diffusers' default, but bf16/fp16 attention on the CPU as plain matmuls
        self.use_tracing = True
        self._traced_unet = TracedCall(_unet_forward)
        self._traced_decoder = TracedCall(_vae_decode)

    def to(self, *args, **kwargs) -> "LatentDiffusionPipeline":
        """DiffusionPipeline.to (device and/or dtype), then the attention that suits the new dtype and device."""
        # diffusers warns about modules "that should be kept in float32: []" on every dtype cast, the list empty
        with _without_log_records("diffusers.models.modeling_utils", "should be kept in float32: []"):
            super().to(*args, **kwargs)
        for model in (self.unet, self.vae):
            attention.fit(model)
        return self

    def load_lora_weights(self, *args, **kwargs) -> None:
        """StableDiffusionLoraLoaderMixin.load_lora_weights, without the warning that a U-Net-only LoRA (what
        `train_unet.py --lora-rank` writes) has no text-encoder keys."""
        with _without_log_records("diffusers.loaders.lora_base", "No LoRA keys associated to CLIPTextModel"):
            super().load_lora_weights(*args, **kwargs)

    # Loading and saving ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path | None = None, torch_dtype=None,
                        variant: str | None = None, **components) -> "LatentDiffusionPipeline":
        """Load a model folder; with no argument, the small model shipped inside the package.

        Components given as keyword arguments (e.g. `scheduler=...`) replace the folder's.
        """
        unknown = set(components) - set(model_folder.COMPONENTS) - {"clip"}
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {sorted(unknown)}")
        root = model_folder.resolve_model_dir(pretrained_model_name_or_path)
        model_folder.check_model_folder(root)
        loaded = model_folder.load_components(root, dtype=torch_dtype, variant=variant)
        return cls(**{**loaded, **components})

    def save_pretrained(self, save_directory: str | Path, max_shard_size: str | int = "15MB",
                        safe_serialization: bool = True, *, components: tuple[str, ...] | None = None) -> None:
        """Write a diffusers pipeline folder (safetensors, shards ≤ `max_shard_size`) plus `clip/` when present.

        Only the component folders and model_index.json are replaced; other files in the folder are left alone.
        Each component is written completely to a staging folder before it replaces the old one
        (`model_folder.write_component`), so an interrupted save never leaves a half-written component.
        `components` (e.g. `("unet", "scheduler")`) writes only those into a folder that already holds the rest,
        leaving the others as they are on disk; it must include the scheduler, whose class model_index.json names.
        """
        if not safe_serialization:
            raise ValueError("safe_serialization must be True: latentdiff writes safetensors only")
        known = set(model_folder.COMPONENT_FOLDERS)
        if components is not None and (not set(components) <= known or "scheduler" not in components):
            raise ValueError(f"components must name some of {sorted(known)}, the scheduler among them (model_index.json "
                             f"names its class), got {components!r}")
        if components is not None:
            missing = [n for n in model_folder.COMPONENTS
                       if n not in components and not (Path(save_directory) / n).is_dir()]
            if missing:
                raise ValueError(f"components={components!r} writes part of a pipeline, but {str(save_directory)!r} "
                                 f"does not hold the rest: {missing} missing")
        target = Path(save_directory).resolve()
        if target.exists() and not target.is_dir():
            raise ValueError(f"save_directory must be a folder, got the file {str(save_directory)!r}")
        target.mkdir(parents=True, exist_ok=True)
        for name in model_folder.COMPONENT_FOLDERS if components is None else components:
            component = getattr(self, name)
            if component is None:  # a whole pipeline without a CLIP: a stale clip/ goes
                model_folder.write_component(target / name, None)
            elif name in ("tokenizer", "scheduler"):
                model_folder.write_component(target / name, component.save_pretrained)
            elif name == "clip":
                model_folder.write_component(
                    target / name, lambda folder: save_clip_folder(self.clip, self.tokenizer, folder, max_shard_size))
            else:
                model_folder.write_component(
                    target / name, lambda folder, c=component: c.save_pretrained(folder, max_shard_size=max_shard_size))
        model_folder.write_model_index(target, self.scheduler)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was built for: the U-Net's sample size × the VAE's factor."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    # Generation --------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """CLIP hidden states (B, L, D) for a list of prompts, padded to the tokenizer's context, truncated with a
        warning (the end-of-text token is kept)."""
        ids = self.tokenize(prompts)
        hidden = self.text_encoder(ids.to(device))[0]  # (B, L, D)
        return hidden.to(self.unet.dtype)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, L) padded to the context L; longer prompts keep their first L − 1 tokens plus end-of-text
        (what the tokenizer's own truncation gives), with a warning."""
        tok, max_length = self.tokenizer, self.tokenizer.model_max_length
        rows = tok(prompts, verbose=False).input_ids  # one tokenization, untruncated
        too_long = [p for p, ids in zip(prompts, rows) if len(ids) > max_length]
        if too_long:
            logger.warning("%d prompt(s) are longer than the text encoder's context of %d tokens and were truncated, "
                           "e.g. %r", len(too_long), max_length, too_long[0])
        rows = [ids[: max_length - 1] + [tok.eos_token_id] if len(ids) > max_length
                else ids + [tok.pad_token_id] * (max_length - len(ids)) for ids in rows]
        return torch.tensor(rows, dtype=torch.long)

    def check_inputs(self, prompts, negative_prompt, height, width, num_inference_steps, guidance_scale,
                     guidance_rescale, eta, num_images_per_prompt, output_type, generator, latents) -> list[str] | None:
        """Validate the arguments of __call__; return the negative prompts as a list (or None)."""
        for name, value, native in (("height", height, self.native_size[0]), ("width", width, self.native_size[1])):
            if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_scale_factor} (the VAE's "
                                 f"downsampling factor), got {value!r}")
            if value > MAX_SIZE_FACTOR * native:
                raise ValueError(f"{name} must be at most {MAX_SIZE_FACTOR * native} ({MAX_SIZE_FACTOR} × the "
                                 f"model's native {native} px; the U-Net's attention memory grows with the fourth "
                                 f"power of the side), got {value!r}")
        _check_positive_int("num_inference_steps", num_inference_steps)
        train_steps = getattr(self.scheduler.config, "num_train_timesteps", None)
        if train_steps is not None and num_inference_steps > train_steps:
            raise ValueError(f"num_inference_steps must be at most {train_steps} (the scheduler's "
                             f"num_train_timesteps), got {num_inference_steps!r}")
        _check_positive_int("num_images_per_prompt", num_images_per_prompt)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, Real) \
                or not math.isfinite(guidance_scale) or guidance_scale < 0:
            raise ValueError(f"guidance_scale must be a finite number ≥ 0, got {guidance_scale!r}")
        if not isinstance(guidance_rescale, Real) or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if isinstance(eta, bool) or not isinstance(eta, Real) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        total = len(prompts) * num_images_per_prompt
        generators = generator if isinstance(generator, list) else [generator]
        bad = next((g for g in generators if g is not None and not isinstance(g, torch.Generator)), None)
        if bad is not None or not generators:
            got = f"{type(bad).__name__}: {bad!r}" if generators else "an empty list"
            raise TypeError(f"generator must be a torch.Generator or a list of them (e.g. "
                            f"torch.Generator().manual_seed(5)), got {got}")
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"generator list must have one generator per image ({len(prompts)} prompts × "
                             f"{num_images_per_prompt} images = {total}), got {len(generator)}")
        shape = (total, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor (torch.from_numpy(array) for a numpy array), "
                            f"got {type(latents).__name__}")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for these prompts, height and width, "
                             f"got {tuple(latents.shape)}")
        if (height, width) != self.native_size:
            logger.warning("%dx%d is not the model's native %dx%d: a model trained at one size tends to repeat or "
                           "stretch objects at another", width, height, *self.native_size[::-1])
        if negative_prompt is None:
            return None
        negatives = _as_prompt_list("negative_prompt", negative_prompt)
        if isinstance(negative_prompt, str):
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"negative_prompt must be one string or one per prompt ({len(prompts)}), "
                             f"got {len(negatives)}")
        return negatives

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_rescale: float = 0.0,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for `prompt`.

        guidance_scale: s in ε̂ = ε_u + s (ε_c − ε_u) — the w + 1 of Ho & Salimans' (1 + w) ε_c − w ε_u. s = 1 is
            plain conditional sampling (no unconditional pass), s = 0 unconditional sampling (no conditional pass);
            otherwise both run as one batched U-Net call per step. Unlike diffusers' StableDiffusionPipeline, which
            samples conditionally whenever s ≤ 1, 0 ≤ s < 1 here means the formula above (s = 0: unconditional).
        negative_prompt: replaces "" as the unconditional text.
        eta: DDIM's η (used by schedulers whose `step` takes it).
        generator / latents: the seed (one generator, or one per image) or the initial noise itself.
        output_type: "pil" (list of PIL images), "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1], or
            "latent" (the final latents, not decoded).
        guidance_rescale: φ of Lin et al. 2024 (0 = off).
        The progress bar is turned off with `pipe.set_progress_bar_config(disable=True)`.
        """
        prompts = _as_prompt_list("prompt", prompt)
        height = self.native_size[0] if height is None else height
        width = self.native_size[1] if width is None else width
        negatives = self.check_inputs(prompts, negative_prompt, height, width, num_inference_steps, guidance_scale,
                                      guidance_rescale, eta, num_images_per_prompt, output_type, generator, latents)
        device = self._execution_device
        n = num_images_per_prompt

        # 1. Text conditions: (B·n, L, D), the unconditional rows first, as one text-encoder call.
        run_uncond, run_cond = guidance_scale != 1, guidance_scale != 0
        uncond_texts = negatives or [""] * len(prompts)
        texts = (uncond_texts if run_uncond else []) + (prompts if run_cond else [])
        embeds = self.encode_prompt(texts, device).repeat_interleave(n, dim=0)

        # 2. Initial noise x_T (B·n, C, h, w), scaled as the scheduler expects; the sampler works in float32 whatever
        #    the networks' dtype. The call samples with its own copy of the scheduler: set_timesteps and multistep
        #    solvers' history are per-call state, so threads sharing one pipeline must not share them.
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (len(prompts) * n, self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents.to(device=device, dtype=torch.float32) * scheduler.init_noise_sigma
        step_kwargs = _accepted_kwargs(scheduler.step, eta=eta, generator=generator)

        # 3. Denoise: one U-Net call per step on [uncond; cond] when guiding.
        unet, unet_dtype = self._traced_unet.bind(self.unet, trace=self.use_tracing), self.unet.dtype
        passes = int(run_uncond) + int(run_cond)
        for i, t in enumerate(self.progress_bar(scheduler.timesteps)):
            model_input = scheduler.scale_model_input(torch.cat([latents] * passes), t)
            output = unet(model_input.to(unet_dtype), t, embeds).float()
            if passes == 2:
                uncond, cond = output.chunk(2)
                output = diffusion.classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)
            latents = scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
            _check_finite(latents, f"the latents after step {i + 1} of {num_inference_steps}", guidance_scale)

        # 4. Decode z_0 → image.
        if output_type == "latent":
            images = latents.to(self.unet.dtype)  # as diffusers returns them: ready for pipe.vae.decode
        else:
            decode = self._traced_decoder.bind(self.vae, trace=self.use_tracing)
            decoded = decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).float()
            _check_finite(decoded, "the decoded images", guidance_scale)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)


def _unet_forward(unet, sample, timestep, hidden_states):
    return unet(sample, timestep, encoder_hidden_states=hidden_states, return_dict=False)[0]


def _vae_decode(vae, latents):
    return vae.decode(latents, return_dict=False)[0]


@contextlib.contextmanager
def _without_log_records(logger_name: str, text: str):
    """Drop one library's log records that contain `text`, for the duration of the block."""
    drop = lambda record: text not in record.getMessage()  # noqa: E731
    target = logging.getLogger(logger_name)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)


def _check_finite(tensor: torch.Tensor, what: str, guidance_scale: float) -> None:
    """Sampling that overflows raises here, instead of writing a black or noisy image."""
    if torch.isfinite(tensor).all():
        return
    cause = (f"guidance_scale={guidance_scale:g} amplifies the guidance difference past float range"
             if guidance_scale > 100 else "the weights or the given latents give NaN/inf (a damaged weights file?)")
    raise FloatingPointError(f"sampling failed: {what} hold NaN or infinite values; {cause}")


def _as_prompt_list(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{name} must be a str or a non-empty list of str, got an empty list")
    bad = value if not isinstance(value, (list, tuple)) else next(v for v in value if not isinstance(v, str))
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(bad).__name__}: {bad!r}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")


def _accepted_kwargs(fn, **kwargs) -> dict:
    """The subset of kwargs that `fn` takes (schedulers differ: DDIM takes eta, Euler takes no eta …)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}
