"""Text-to-image generation: `pipe("a tiger", guidance_scale=7.5).images[0]`."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import threading
from numbers import Integral, Real
from pathlib import Path
from types import SimpleNamespace

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import IPAdapterMixin, StableDiffusionLoraLoaderMixin
from diffusers.pipelines.pipeline_utils import StableDiffusionMixin
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPTokenizer, CLIPVisionModelWithProjection

from . import MAX_SIZE_FACTOR, _without_log_records, attention
from .. import model_folder
from ..argparsing import valid_interval
from .guidance import ClassifierFreeGuidance, ClassifierGuidance, EmbeddedGuidance
from ..model_folder import save_clip_folder, vae_scale_factor
from .few_step import FOLDER as FEW_STEP_FOLDER, FewStep
from .tracing import TracedCall, default_backend

logger = logging.getLogger(__name__)
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class LatentDiffusionPipeline(DiffusionPipeline, StableDiffusionMixin, StableDiffusionLoraLoaderMixin, IPAdapterMixin):
    """Latent diffusion (Rombach et al. 2022) conditioned on a CLIP text encoder, with classifier-free guidance.

    The five components are those of a Stable Diffusion pipeline, so folders move between this class and
    diffusers' `StableDiffusionPipeline` in both directions; `clip` is the full CLIP the text encoder came from,
    kept for evaluation (CLIP score) and saved as `clip/`. LoRA weights load with `pipe.load_lora_weights(dir)`.

    Speed: on the CPU, from the second call with the same shapes on, the text encoder, the U-Net and the VAE
    decoder run as compiled graphs (`latentdiff.pipelines.tracing`), without Python's per-module overhead:
    OpenVINO's where it is installed (`pipe.compile_backend == "openvino"`, the default;
    `latentdiff.pipelines.openvino`), whose images are within one level of 255 of eager ones, else
    `torch.jit.trace` graphs (`pipe.compile_backend = "torch"`, or
    $LATENTDIFF_BACKEND=torch), which run the same ops on the same weights and give the same images bit for bit.
    The second call pays the compilation (seconds; under one from OpenVINO's disk cache). Set
    `pipe.use_tracing = False` for plain eager calls. Reduced precision:
    `pipe.to(dtype=torch.bfloat16)` (or `torch_dtype=` in from_pretrained) runs the networks in bf16 while the
    sampler's arithmetic (the initial noise included) stays in float32; on the CPU their attention then runs as
    plain bf16 matmuls (`latentdiff.pipelines.attention`), which is faster there. Few steps: a model with few-step
    weights (`few_step/`, `latentdiff.pipelines.few_step`; the shipped emoji model has them) samples calls of at
    most 8 steps with its distilled student and LCMScheduler (`few_step_for` says when; `pipe.use_few_step = False`
    turns it off).

    diffusers' call surface: prompt embeddings, custom timesteps or sigmas, step callbacks and interruption,
    `cross_attention_kwargs` (LoRA scale), `clip_skip`, FreeU, fused QKV projections, VAE slicing and tiling
    (`StableDiffusionMixin`), IP-Adapters (`pipe.load_ip_adapter(…)`, then `ip_adapter_image=`; the optional
    `image_encoder` and `feature_extractor` encode the image). A `safety_checker` is accepted and ignored, so code
    written for `StableDiffusionPipeline` runs unchanged.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["clip", "safety_checker", "feature_extractor", "image_encoder"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]
    IGNORED_COMPONENTS = ("safety_checker", "requires_safety_checker")

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: SchedulerMixin,
        clip: CLIPModel | None = None,
        safety_checker=None,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        requires_safety_checker: bool = False,
    ):
        if safety_checker is not None:
            logger.warning("safety_checker is not a component of LatentDiffusionPipeline; it is ignored")
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                              clip=clip, safety_checker=None, feature_extractor=feature_extractor,
                              image_encoder=image_encoder)
        # a pipeline may be built with only some parts (a text encoder alone, to encode prompts), as diffusers' can
        self.vae_scale_factor = vae_scale_factor(vae.config) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        for model in (unet, vae):
            if model is not None:
                attention.fit(model)  # diffusers' default, but bf16/fp16 attention on the CPU as plain matmuls
        self.use_tracing = True
        self.compile_backend = default_backend()
        self.compile_first_call = False  # True: compile at a shape's first call too (servers: same bytes always)
        self.few_step: FewStep | None = None  # the model's few-step weights (from_pretrained finds few_step/)
        self.use_few_step = True
        self._traced_unet = TracedCall(_unet_forward)
        self._traced_guided_unet = TracedCall(_guided_unet_forward)  # guidance distilled in (LCM)
        self._traced_decoder = TracedCall(_vae_decode)
        self._traced_text_encoder = TracedCall(_text_encode)

    def clear_compiled(self) -> None:
        """Drop every traced and compiled graph (after weights were changed through `.data`, which no version
        counter sees); the next calls record them again."""
        self._traced_unet.clear()
        self._traced_guided_unet.clear()
        self._traced_decoder.clear()
        self._traced_text_encoder.clear()
        if self.few_step is not None:
            self.few_step.clear()

    def _bind(self, traced: TracedCall, module: torch.nn.Module, trace: bool = True):
        """`traced` bound to `module` under this pipeline's compile settings."""
        return traced.bind(module, trace=self.use_tracing and trace, backend=self.compile_backend,
                           first_call=self.compile_first_call)

    def to(self, *args, **kwargs) -> "LatentDiffusionPipeline":
        """DiffusionPipeline.to (device and/or dtype), then the attention that suits the new dtype and device."""
        # diffusers warns about modules "that should be kept in float32: []" on every dtype cast, the list empty
        with _without_log_records("diffusers.models.modeling_utils", "should be kept in float32: []"):
            super().to(*args, **kwargs)
        for model in (self.unet, self.vae):
            if model is not None:
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

        torch_dtype: one dtype, or a dict per component ({"unet": torch.bfloat16, "default": torch.float32}).
        variant: load the weight files of that variant (`diffusion_pytorch_model.fp16.safetensors` …).
        Components given as keyword arguments (e.g. `scheduler=...`, `image_encoder=...`) replace the folder's;
        `safety_checker` and `requires_safety_checker` are accepted and ignored. Each component loaded is logged at
        INFO level, as diffusers does.
        """
        ignored = {k: components.pop(k) for k in cls.IGNORED_COMPONENTS if k in components}
        unknown = set(components) - set(model_folder.COMPONENT_FOLDERS)
        if unknown:
            raise TypeError(f"from_pretrained got unexpected keyword arguments {sorted(unknown)}")
        root = model_folder.resolve_model_dir(pretrained_model_name_or_path)
        model_folder.check_model_folder(root)
        loaded = model_folder.load_components(root, dtype=torch_dtype, variant=variant)
        for name, component in loaded.items():
            if component is not None and name not in components:
                logger.info("Loaded %s as %s from `%s` subfolder of %s.", name, type(component).__name__, name, root)
        pipe = cls(**{**loaded, **components}, **{k: v for k, v in ignored.items() if k != "requires_safety_checker"})
        if "unet" not in components:
            pipe.few_step = FewStep.find(root)
        return pipe

    _SHARED_WITH_PIPE = ("use_tracing", "compile_backend", "compile_first_call", "use_few_step", "_traced_unet",
                         "_traced_guided_unet", "_traced_decoder", "_traced_text_encoder")

    @classmethod
    def from_pipe(cls, pipeline, **kwargs) -> "LatentDiffusionPipeline":
        """diffusers' `from_pipe` (another pipeline class and/or other components on the same modules, e.g.
        `LatentDiffusionImg2ImgPipeline.from_pipe(pipe, scheduler=…)`), which from one of ours also shares its
        compiled graphs, settings and few-step weights (unless the U-Net is replaced), so that a server choosing a
        sampler or img2img per request compiles nothing twice."""
        new = super().from_pipe(pipeline, **kwargs)
        if isinstance(pipeline, LatentDiffusionPipeline):
            for name in cls._SHARED_WITH_PIPE:  # graphs are keyed by module structure: sharing them is safe
                setattr(new, name, getattr(pipeline, name))
            if "unet" not in kwargs:
                new.few_step = pipeline.few_step
        return new

    @property
    def components(self) -> dict:
        """The modules that build this pipeline again, `LatentDiffusionPipeline(**pipe.components)`, with the
        optional components of a Stable Diffusion pipeline (None when absent); `clip` when there is one."""
        components = super().components
        if components.get("clip") is None:
            components.pop("clip", None)
        return components

    def save_pretrained(self, save_directory: str | Path, max_shard_size: str | int = "15MB",
                        safe_serialization: bool = True, variant: str | None = None, *,
                        components: tuple[str, ...] | None = None, **kwargs) -> None:
        """Write a diffusers pipeline folder (safetensors, shards ≤ `max_shard_size`) plus `clip/` when present.

        Only the component folders, model_index.json and the few-step weights (`few_step/`, which go with the U-Net:
        written when the pipeline has them, else removed) are replaced; other files in the folder are left alone.
        An IP-Adapter's `image_encoder` and `feature_extractor` are written when the pipeline has them.
        Each component is written completely to a staging folder before it replaces the old one
        (`model_folder.write_component`), so an interrupted save never leaves a half-written component.
        `components` (e.g. `("unet", "scheduler")`) writes only those into a folder that already holds the rest,
        leaving the others as they are on disk; it must include the scheduler, whose class model_index.json names.
        `variant` names the weight files (`diffusion_pytorch_model.fp16.safetensors`). `safe_serialization=False`
        still writes safetensors, with a warning: latentdiff never writes pickles. Hub options (`push_to_hub` …)
        are refused.
        """
        if kwargs:
            raise TypeError(f"save_pretrained got unexpected keyword arguments {sorted(kwargs)} (latentdiff writes "
                            "local folders only)")
        if not safe_serialization:
            logger.warning("safe_serialization=False: latentdiff writes safetensors anyway (pickled weights can run "
                           "code when loaded)")
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
            elif name in ("tokenizer", "scheduler", "feature_extractor"):
                model_folder.write_component(target / name, component.save_pretrained)
            elif name == "clip":
                model_folder.write_component(
                    target / name, lambda folder: save_clip_folder(self.clip, self.tokenizer, folder, max_shard_size,
                                                                   variant))
            else:
                model_folder.write_component(
                    target / name, lambda folder, c=component: c.save_pretrained(folder, max_shard_size=max_shard_size,
                                                                                 variant=variant))
        if components is None or "unet" in components:  # few-step weights belong to the U-Net written with them
            if self.few_step is not None:
                unet_dtype = self.unet.dtype
                self.few_step.copy_to(target, dtype=unet_dtype if unet_dtype != torch.float32 else None)
            else:
                model_folder.write_component(target / FEW_STEP_FOLDER, None)
        model_folder.write_model_index(target, self.scheduler)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was built for: the U-Net's sample size × the VAE's factor."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    # Per-call state -------------------------------------------------------------------------------------------------
    # What diffusers keeps on the pipeline during a call (`pipe.guidance_scale`, `pipe.num_timesteps`, and what a step
    # callback sets: `pipe._guidance_scale`, `pipe._interrupt`) is kept per thread, so threads sharing one pipeline
    # do not see each other's calls; a thread reads its own last call's values after it returns.

    def _call_state(self) -> SimpleNamespace:
        states = self.__dict__.setdefault("_call_states", {})
        state = states.get(threading.get_ident())
        if state is None:
            state = states[threading.get_ident()] = SimpleNamespace(
                guidance=ClassifierFreeGuidance(), clip_skip=None, cross_attention_kwargs=None, interrupt=False,
                num_timesteps=0, added_cond_kwargs=None, unet=None)
        return state

    guidance_scale = property(lambda self: self._call_state().guidance.scale)
    guidance_rescale = property(lambda self: self._call_state().guidance.rescale)
    clip_skip = property(lambda self: self._call_state().clip_skip)
    cross_attention_kwargs = property(lambda self: self._call_state().cross_attention_kwargs)
    num_timesteps = property(lambda self: self._call_state().num_timesteps)
    interrupt = property(lambda self: self._call_state().interrupt)
    do_classifier_free_guidance = property(lambda self: self._call_state().guidance.passes == 2)
    _guidance_scale = property(lambda self: self._call_state().guidance.scale,
                               lambda self, value: setattr(self._call_state().guidance, "scale", value))
    _interrupt = property(lambda self: self._call_state().interrupt,
                          lambda self, value: setattr(self._call_state(), "interrupt", value))

    # Generation, in stages --------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompt, device, num_images_per_prompt: int = 1, do_classifier_free_guidance: bool = True,
                      negative_prompt=None, prompt_embeds: torch.Tensor | None = None,
                      negative_prompt_embeds: torch.Tensor | None = None, lora_scale: float | None = None,
                      clip_skip: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt_embeds, negative_prompt_embeds), each (B·n, L, D) in the U-Net's dtype, as diffusers'
        StableDiffusionPipeline.encode_prompt returns them: the text encoder's last hidden states (or those
        `clip_skip` layers before the last, through the final layer norm), each prompt's rows repeated
        `num_images_per_prompt` times; the negative ones ("" unless given) only with classifier-free guidance.
        Given embeddings are used as they are. `lora_scale` scales the text encoder's LoRA layers for this call."""
        prompts = None if prompt_embeds is not None else _as_prompt_list("prompt", prompt)
        batch = len(prompt_embeds) if prompts is None else len(prompts)
        negatives = []
        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negatives = [""] * batch if negative_prompt is None else _negative_prompts(negative_prompt, batch)
        texts = negatives + (prompts or [])
        if texts:  # one text-encoder call for the negative and the positive texts
            with _lora_scaled(self.text_encoder, lora_scale):
                states = self._text_states(texts, device, clip_skip)
            if negatives:
                negative_prompt_embeds = states[: len(negatives)]
            if prompts is not None:
                prompt_embeds = states[len(negatives):]
        dtype = self.unet.dtype if self.unet is not None else self.text_encoder.dtype
        prompt_embeds = _per_image(prompt_embeds, num_images_per_prompt, device, dtype)
        negative_prompt_embeds = _per_image(negative_prompt_embeds if do_classifier_free_guidance else None,
                                            num_images_per_prompt, device, dtype)
        return prompt_embeds, negative_prompt_embeds

    def _text_states(self, prompts: list[str], device, clip_skip: int | None = None) -> torch.Tensor:
        ids = self.tokenize(prompts).to(device)
        if clip_skip is None:
            return self._bind(self._traced_text_encoder, self.text_encoder)(ids)
        hidden = self.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        encoder = getattr(self.text_encoder, "text_model", self.text_encoder)  # transformers 5 has no text_model
        return encoder.final_layer_norm(hidden)

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, L) padded to the context L; longer prompts keep their first L − 1 tokens plus end-of-text
        (what the tokenizer's own truncation gives), with a warning."""
        tok, max_length = self.tokenizer, self.tokenizer.model_max_length
        rows = tok(prompts, verbose=False).input_ids  # one tokenization, untruncated
        too_long = [ids for ids in rows if len(ids) > max_length]
        if too_long:  # what was cut: the tokens between the kept L − 1 and the end-of-text token
            logger.warning("%d prompt(s) are longer than the text encoder's context of %d tokens and were truncated; "
                           "the first lost: %r", len(too_long), max_length,
                           tok.decode(too_long[0][max_length - 1: -1]))
        rows = [ids[: max_length - 1] + [tok.eos_token_id] if len(ids) > max_length
                else ids + [tok.pad_token_id] * (max_length - len(ids)) for ids in rows]
        return torch.tensor(rows, dtype=torch.long)

    # IP-Adapter image embeddings, as diffusers computes them: the image encoder's projected embedding (or its
    # penultimate hidden states, for the "plus" adapters), repeated per image; with guidance, the negative rows (zeros,
    # or a black image's states) first. One function for both libraries, so the same images.
    encode_image = StableDiffusionPipeline.encode_image
    prepare_ip_adapter_image_embeds = StableDiffusionPipeline.prepare_ip_adapter_image_embeds

    @property
    def has_ip_adapter(self) -> bool:
        """Whether an IP-Adapter is loaded into the U-Net (`load_ip_adapter`; `unload_ip_adapter` removes it)."""
        return self.unet is not None and getattr(self.unet.config, "encoder_hid_dim_type", None) == "ip_image_proj"

    def get_timesteps(self, scheduler: SchedulerMixin, num_inference_steps: int | None, device,
                      timesteps: list[int] | None = None, sigmas: list[float] | None = None) -> torch.Tensor:
        """Set the (call's own) scheduler's timesteps: n evenly by its spacing, or a custom list of timesteps or
        sigmas (e.g. Align-Your-Steps) where its set_timesteps takes one."""
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass timesteps or sigmas, not both")
        custom = "timesteps" if timesteps is not None else "sigmas" if sigmas is not None else None
        if custom is None:
            scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            if custom not in inspect.signature(scheduler.set_timesteps).parameters:
                raise ValueError(f"{custom} needs a scheduler whose set_timesteps takes custom {custom}; "
                                 f"{type(scheduler).__name__} does not")
            scheduler.set_timesteps(**{custom: timesteps if custom == "timesteps" else sigmas}, device=device)
        return scheduler.timesteps

    def prepare_latents(self, batch_size: int, num_channels_latents: int, height: int, width: int, dtype, device,
                        generator, latents: torch.Tensor | None = None,
                        scheduler: SchedulerMixin | None = None) -> torch.Tensor:
        """Initial noise x_T (B, C, h, w) (or the given latents), scaled by the scheduler's initial σ. The sampler
        works in float32 whatever the networks' dtype, so `dtype` is only the U-Net's (diffusers' signature)."""
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        return latents.to(device=device, dtype=torch.float32) * (scheduler or self.scheduler).init_noise_sigma

    def denoise(self, latents: torch.Tensor, scheduler: SchedulerMixin, guidance, embeds: torch.Tensor,
                step_kwargs: dict, callback_on_step_end=None, callback_tensor_inputs=(),
                prompt_embeds: torch.Tensor | None = None,
                negative_prompt_embeds: torch.Tensor | None = None,
                classifier_guidance: ClassifierGuidance | None = None) -> torch.Tensor:
        """The sampling loop: per step one U-Net call on the passes guidance needs, guidance (then classifier
        guidance, when given), a scheduler step, a check that the latents are finite, and the step callback (which
        may replace tensors of `_callback_tensor_inputs` or set `pipe._interrupt`)."""
        state = self._call_state()
        module = state.unet or self.unet  # the call's U-Net: the model's own, or its few-step student
        timestep_cond = None
        if isinstance(guidance, EmbeddedGuidance):
            timestep_cond = guidance.timestep_cond(len(latents), module.config.time_cond_proj_dim, latents.device,
                                                   module.dtype)
        eager = bool(state.cross_attention_kwargs) or state.added_cond_kwargs is not None
        traced = self._traced_unet if timestep_cond is None else self._traced_guided_unet
        unet = self._bind(traced, module, trace=not eager)
        extra = () if timestep_cond is None else (timestep_cond,)
        unet_dtype, timesteps = module.dtype, scheduler.timesteps
        for i, t in enumerate(self.progress_bar(timesteps)):
            if state.interrupt:
                continue
            model_input = scheduler.scale_model_input(torch.cat([latents] * guidance.passes), t)
            if eager:
                output = module(model_input.to(unet_dtype), t, encoder_hidden_states=embeds,
                                timestep_cond=timestep_cond, cross_attention_kwargs=state.cross_attention_kwargs,
                                added_cond_kwargs=state.added_cond_kwargs, return_dict=False)[0].float()
            else:
                output = unet(model_input.to(unet_dtype), t, embeds, *extra).float()
            guided = guidance(output, i, len(timesteps))
            if classifier_guidance is not None:  # x_t as the U-Net saw it: the scaled input, one row per image
                guided = classifier_guidance(guided, model_input[-len(latents):], t)
            latents = scheduler.step(guided, t, latents, **step_kwargs, return_dict=False)[0]
            latents = self.after_step(latents, i, timesteps, scheduler)
            _check_finite(latents, f"the latents after step {i + 1} of {len(timesteps)}", guidance.scale)
            if callback_on_step_end is not None:
                tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                           "negative_prompt_embeds": negative_prompt_embeds}
                changed = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_tensor_inputs}) or {}
                latents = changed.get("latents", latents)
                if "prompt_embeds" in changed or "negative_prompt_embeds" in changed:
                    prompt_embeds = changed.get("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = changed.get("negative_prompt_embeds", negative_prompt_embeds)
                    embeds = torch.cat([e for e, run in ((negative_prompt_embeds, guidance.uncond),
                                                         (prompt_embeds, guidance.cond)) if run])
        return latents

    def classifier_guidance(self, classifier, label, scale, prompts: int, num_images_per_prompt: int,
                            device) -> ClassifierGuidance:
        """Checked classifier-guidance settings for a call of `prompts` prompts: the classifier (loaded from its
        folder if a path) must read this model's latents and schedule, and every label must be one of its classes."""
        from ..classifier import NoisyLatentClassifier

        if isinstance(classifier, (str, Path)):
            folder = Path(classifier)
            if not (folder / "config.json").is_file():
                raise ValueError(f"classifier must be a classifier folder (training/train_classifier.py writes "
                                 f"RUN/classifier) or module, got {str(classifier)!r}: no config.json there")
            classifier = NoisyLatentClassifier.from_pretrained(folder).to(device).eval()
        if not isinstance(classifier, torch.nn.Module):
            raise ValueError(f"classifier must be a classifier folder or a torch module, got {type(classifier).__name__}")
        config = getattr(classifier, "config", None)
        classes = list(getattr(config, "classes", ()) or ())
        if isinstance(scale, bool) or not isinstance(scale, Real) or not math.isfinite(scale) or scale < 0:
            raise ValueError(f"classifier_scale must be a finite number ≥ 0, got {scale!r}")
        if label is None:
            raise ValueError(f"classifier_label is required with a classifier: one of its classes {classes}")
        labels = list(label) if isinstance(label, (list, tuple)) else [label] * prompts
        if len(labels) != prompts:
            raise ValueError(f"classifier_label must be one label or one per prompt ({prompts}), got {len(labels)}")
        indices = []
        for value in labels:
            if isinstance(value, str) and value in classes:
                indices.append(classes.index(value))
            elif isinstance(value, Integral) and not isinstance(value, bool) and value >= 0 \
                    and (not classes or value < len(classes)):
                indices.append(int(value))
            else:
                raise ValueError(f"classifier_label must name one of the classifier's classes {classes} (or give "
                                 f"its index), got {value!r}")
        channels, steps = getattr(config, "in_channels", None), getattr(config, "num_train_timesteps", None)
        if channels is not None and channels != self.unet.config.in_channels:
            raise ValueError(f"classifier reads {channels}-channel latents; this model's have "
                             f"{self.unet.config.in_channels}")
        alphas_cumprod = getattr(self.scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None:
            raise ValueError(f"classifier guidance needs a scheduler with the training schedule (alphas_cumprod); "
                             f"{type(self.scheduler).__name__} has none")
        if steps is not None and steps != len(alphas_cumprod):
            raise ValueError(f"classifier was trained on a {steps}-step schedule; this model's has "
                             f"{len(alphas_cumprod)} steps")
        labels = torch.tensor(indices).repeat_interleave(num_images_per_prompt)
        return ClassifierGuidance(classifier, labels, float(scale), alphas_cumprod.float(),
                                  self.scheduler.config.get("prediction_type") or "epsilon")

    def after_step(self, latents: torch.Tensor, i: int, timesteps: torch.Tensor,
                   scheduler: SchedulerMixin) -> torch.Tensor:
        """What a pipeline does to the latents after step i (inpainting puts the known region back); nothing here."""
        return latents

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        """z_0 → images of `output_type` ("latent": the latents themselves, in the U-Net's dtype, as diffusers
        returns them, ready for pipe.vae.decode)."""
        if output_type == "latent":
            return latents.to(self.unet.dtype)
        decode = self._bind(self._traced_decoder, self.vae)
        decoded = decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).float()
        _check_finite(decoded, "the decoded images", self.guidance_scale)
        return self.image_processor.postprocess(decoded, output_type=output_type)

    def check_inputs(self, prompt, height, width, num_inference_steps, guidance_scale, negative_prompt=None,
                     prompt_embeds=None, negative_prompt_embeds=None, guidance_rescale=0.0, eta=0.0,
                     num_images_per_prompt=1, output_type="pil", generator=None, latents=None, timesteps=None,
                     sigmas=None, callback_on_step_end_tensor_inputs=None, ip_adapter_image=None,
                     ip_adapter_image_embeds=None, guidance_interval=(0.0, 1.0)) -> int:
        """Validate the arguments of __call__, naming the argument, the rule and the value; return the number of
        prompts."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass prompt or prompt_embeds (one of them, not both)")
        if prompt_embeds is not None:
            _check_embeds("prompt_embeds", prompt_embeds, self.unet.config.cross_attention_dim)
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass negative_prompt or negative_prompt_embeds, not both")
        if negative_prompt_embeds is not None:
            _check_embeds("negative_prompt_embeds", negative_prompt_embeds, self.unet.config.cross_attention_dim)
            if prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds must have the shape of prompt_embeds "
                                 f"{tuple(prompt_embeds.shape)}, got {tuple(negative_prompt_embeds.shape)}")
        prompts = len(prompt_embeds) if prompt is None else len(_as_prompt_list("prompt", prompt))
        if negative_prompt is not None:
            _negative_prompts(negative_prompt, prompts)
        for name, value, native in (("height", height, self.native_size[0]), ("width", width, self.native_size[1])):
            if isinstance(value, bool) or not isinstance(value, Integral) or value <= 0 or value % self.vae_scale_factor:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_scale_factor} (the VAE's "
                                 f"downsampling factor), got {value!r}")
            if value > MAX_SIZE_FACTOR * native:
                raise ValueError(f"{name} must be at most {MAX_SIZE_FACTOR * native} ({MAX_SIZE_FACTOR} × the "
                                 f"model's native {native} px; the U-Net's attention memory grows with the fourth "
                                 f"power of the side), got {value!r}")
        if timesteps is None and sigmas is None:
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
        _check_interval(guidance_interval)
        if isinstance(eta, bool) or not isinstance(eta, Real) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(callback_on_step_end_tensor_inputs or ()) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be some of {self._callback_tensor_inputs}, "
                             f"got {sorted(unknown)}")
        total = prompts * num_images_per_prompt
        generators = generator if isinstance(generator, list) else [generator]
        bad = next((g for g in generators if g is not None and not isinstance(g, torch.Generator)), None)
        if bad is not None or not generators:
            got = f"{type(bad).__name__}: {bad!r}" if generators else "an empty list"
            raise TypeError(f"generator must be a torch.Generator or a list of them (e.g. "
                            f"torch.Generator().manual_seed(5)), got {got}")
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(f"generator list must have one generator per image ({prompts} prompts × "
                             f"{num_images_per_prompt} images = {total}), got {len(generator)}")
        shape = (total, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor (torch.from_numpy(array) for a numpy array), "
                            f"got {type(latents).__name__}")
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} for these prompts, height and width, "
                             f"got {tuple(latents.shape)}")
        self._check_ip_adapter_inputs(ip_adapter_image, ip_adapter_image_embeds)
        if (height, width) != self.native_size:
            logger.warning("%dx%d is not the model's native %dx%d: a model trained at one size tends to repeat or "
                           "stretch objects at another", width, height, *self.native_size[::-1])
        return prompts

    def _check_ip_adapter_inputs(self, image, embeds) -> None:
        given = "ip_adapter_image" if image is not None else "ip_adapter_image_embeds" if embeds is not None else None
        if given is None:
            if self.has_ip_adapter:
                raise ValueError("an IP-Adapter is loaded: pass ip_adapter_image or ip_adapter_image_embeds, or "
                                 "remove it with pipe.unload_ip_adapter()")
            return
        if image is not None and embeds is not None:
            raise ValueError("pass ip_adapter_image or ip_adapter_image_embeds, not both")
        if not self.has_ip_adapter:
            raise ValueError(f"{given} needs an IP-Adapter: load one with pipe.load_ip_adapter(folder, subfolder, "
                             "weight_name)")
        adapters = len(self.unet.encoder_hid_proj.image_projection_layers)
        if embeds is not None:
            if not isinstance(embeds, list) or not all(isinstance(e, torch.Tensor) and e.ndim in (3, 4)
                                                       for e in embeds):
                got = type(embeds).__name__ if not isinstance(embeds, list) else \
                    f"a list holding {[getattr(e, 'ndim', type(e).__name__) for e in embeds]}"
                raise TypeError(f"ip_adapter_image_embeds must be a list of 3-D or 4-D tensors (one per IP-Adapter), "
                                f"got {got}")
            if len(embeds) != adapters:
                raise ValueError(f"ip_adapter_image_embeds must hold one tensor per IP-Adapter loaded ({adapters}), "
                                 f"got {len(embeds)}")
        elif self.image_encoder is None:
            raise ValueError("ip_adapter_image needs an image encoder, and pipe.image_encoder is None: load the "
                             "IP-Adapter with its image_encoder_folder, or pass ip_adapter_image_embeds")

    def few_step_for(self, num_inference_steps: int | None, timesteps=None, sigmas=None, cross_attention_kwargs=None,
                     image_prompt: bool = False) -> FewStep | None:
        """The model's few-step weights when this call should sample with them: at most their `max_steps` steps by
        num_inference_steps (not a custom schedule), `pipe.use_few_step` on, and a U-Net they were made for (no
        guidance embedding of its own, no LoRA or IP-Adapter loaded into it)."""
        few_step = self.few_step
        if (few_step is None or not self.use_few_step or timesteps is not None or sigmas is not None
                or num_inference_steps is None or num_inference_steps > few_step.max_steps):
            return None
        unet = self.unet
        if (unet.config.time_cond_proj_dim is not None or getattr(unet, "_hf_peft_config_loaded", False)
                or unet.config.encoder_hid_dim_type is not None or cross_attention_kwargs or image_prompt):
            return None
        return few_step

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        ip_adapter_image=None,
        ip_adapter_image_embeds: list[torch.Tensor] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        clip_skip: int | None = None,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        classifier: torch.nn.Module | str | Path | None = None,
        classifier_label: str | int | list[str | int] | None = None,
        classifier_scale: float = 1.0,
    ) -> StableDiffusionPipelineOutput | tuple:
        """Generate images for `prompt` (or for `prompt_embeds`); the arguments are diffusers'
        StableDiffusionPipeline's.

        guidance_scale: s in ε̂ = ε_u + s (ε_c − ε_u) — the w + 1 of Ho & Salimans' (1 + w) ε_c − w ε_u. s = 1 is
            plain conditional sampling (no unconditional pass), s = 0 unconditional sampling (no conditional pass);
            otherwise both run as one batched U-Net call per step. Unlike diffusers' StableDiffusionPipeline, which
            samples conditionally whenever s ≤ 1, 0 ≤ s < 1 here means the formula above (s = 0: unconditional).
            A U-Net with guidance distilled in (LCM: `time_cond_proj_dim`) gets s as an embedding instead.
        negative_prompt / negative_prompt_embeds: replace "" as the unconditional text.
        ip_adapter_image / ip_adapter_image_embeds: the image prompt of the IP-Adapter(s) loaded (one image, or
            embedding tensor, per adapter); embeddings hold the negative rows then the positive ones whenever the
            call has an unconditional pass (guidance_scale ≠ 1), as diffusers' do with guidance.
        timesteps / sigmas: a custom schedule instead of num_inference_steps (schedulers that take one).
        eta: DDIM's η (used by schedulers whose `step` takes it).
        generator / latents: the seed (one generator, or one per image) or the initial noise itself.
        output_type: "pil" (list of PIL images), "np" (B, H, W, 3) in [0, 1], "pt" (B, 3, H, W) in [0, 1], or
            "latent" (the final latents, not decoded).
        cross_attention_kwargs: passed to the U-Net's attention processors ({"scale": s} scales LoRA layers).
        guidance_rescale: φ of Lin et al. 2024 (0 = off). clip_skip: use the text states that many layers before
            the last.
        guidance_interval: (start, stop), fractions of the sampling steps: guidance applies at the steps i of N with
            int(start·N) ≤ i < int(stop·N) (diffusers' guiders' start/stop) and ε̂ = ε_c at the others; (0.3, 1)
            leaves the first 30 % (the highest noise) unguided (Kynkäänniemi et al. 2024). Not for weights with
            guidance distilled in.
        callback_on_step_end(pipe, i, t, tensors) → tensors: called after each step with the tensors named in
            callback_on_step_end_tensor_inputs (of `pipe._callback_tensor_inputs`); the ones it returns replace
            them; `pipe._interrupt = True` stops sampling there, `pipe._guidance_scale` changes s for later steps.
        classifier / classifier_label / classifier_scale: classifier guidance (Dhariwal & Nichol 2021) with a
            noise-aware latent classifier (a folder training/train_classifier.py wrote, or the module): each step
            adds −s √(1 − ᾱ_t) ∇ log p(y | x_t) to ε̂ after classifier-free guidance, for the label y (a class name
            or index; one, or one per prompt) and s = classifier_scale.
        The progress bar is turned off with `pipe.set_progress_bar_config(disable=True)`.
        """
        height = self.native_size[0] if height is None else height
        width = self.native_size[1] if width is None else width
        prompts = self.check_inputs(prompt, height, width, num_inference_steps, guidance_scale, negative_prompt,
                                    prompt_embeds, negative_prompt_embeds, guidance_rescale, eta,
                                    num_images_per_prompt, output_type, generator, latents, timesteps, sigmas,
                                    callback_on_step_end_tensor_inputs, ip_adapter_image, ip_adapter_image_embeds,
                                    guidance_interval)
        state = self._call_state()
        image_prompt = ip_adapter_image is not None or ip_adapter_image_embeds is not None
        few_step = self.few_step_for(num_inference_steps, timesteps, sigmas, cross_attention_kwargs, image_prompt)
        state.unet = unet = few_step.unet(self.unet) if few_step is not None else self.unet
        embedded = unet.config.time_cond_proj_dim is not None
        if embedded and tuple(guidance_interval) != (0.0, 1.0):
            raise ValueError(f"guidance_interval needs classifier-free guidance; these weights have guidance distilled "
                             f"into one pass (few-step), got {tuple(guidance_interval)}")
        guidance = (EmbeddedGuidance(guidance_scale, guidance_rescale) if embedded
                    else ClassifierFreeGuidance(guidance_scale, guidance_rescale, tuple(guidance_interval)))
        state.guidance, state.clip_skip, state.interrupt = guidance, clip_skip, False
        state.cross_attention_kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs else None
        device = self._execution_device

        # 1. Text conditions (B·n, L, D): the unconditional rows first, then the conditional ones.
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        if guidance.cond:
            prompt_embeds, negative_prompt_embeds = self.encode_prompt(
                prompt, device, num_images_per_prompt, guidance.uncond, negative_prompt, prompt_embeds,
                negative_prompt_embeds, lora_scale, clip_skip)
        else:  # unconditional sampling: only the negative (or empty) text
            negative_prompt_embeds, _ = self.encode_prompt(
                negative_prompt if negative_prompt is not None or negative_prompt_embeds is not None
                else [""] * prompts, device, num_images_per_prompt, False, prompt_embeds=negative_prompt_embeds,
                lora_scale=lora_scale, clip_skip=clip_skip)
            prompt_embeds = None
        embeds = torch.cat([e for e, run in ((negative_prompt_embeds, guidance.uncond), (prompt_embeds, guidance.cond))
                            if run])
        state.added_cond_kwargs = None
        if image_prompt:  # the image prompt, rows as `embeds`
            image_embeds = self.prepare_ip_adapter_image_embeds(ip_adapter_image, ip_adapter_image_embeds, device,
                                                                prompts * num_images_per_prompt, guidance.uncond)
            if not guidance.cond:  # unconditional sampling: the negative rows only
                image_embeds = [e.chunk(2)[0] for e in image_embeds]
            state.added_cond_kwargs = {"image_embeds": [e.to(unet.dtype) for e in image_embeds]}

        # 2. The call's own scheduler (threads sharing the pipeline must not share its timesteps or multistep
        #    history), its timesteps, and the initial noise.
        scheduler = few_step.scheduler(self.scheduler.config) if few_step is not None else copy.deepcopy(self.scheduler)
        timesteps = self.get_timesteps(scheduler, num_inference_steps, device, timesteps, sigmas)
        state.num_timesteps = len(timesteps)
        latents = self.prepare_latents(prompts * num_images_per_prompt, unet.config.in_channels, height, width,
                                       unet.dtype, device, generator, latents, scheduler)
        step_kwargs = _accepted_kwargs(scheduler.step, eta=eta, generator=generator)
        classifier_guidance = None if classifier is None else self.classifier_guidance(
            classifier, classifier_label, classifier_scale, prompts, num_images_per_prompt, device)

        # 3. Denoise, 4. decode.
        latents = self.denoise(latents, scheduler, guidance, embeds, step_kwargs, callback_on_step_end,
                               callback_on_step_end_tensor_inputs, prompt_embeds, negative_prompt_embeds,
                               classifier_guidance)
        images = self.decode(latents, output_type)
        self.maybe_free_model_hooks()
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None) if return_dict else (images,)


def _unet_forward(unet, sample, timestep, hidden_states):
    return unet(sample, timestep, encoder_hidden_states=hidden_states, return_dict=False)[0]


def _guided_unet_forward(unet, sample, timestep, hidden_states, timestep_cond):
    return unet(sample, timestep, encoder_hidden_states=hidden_states, timestep_cond=timestep_cond,
                return_dict=False)[0]


def _text_encode(text_encoder, ids):
    return text_encoder(ids)[0]


def _vae_decode(vae, latents):
    return vae.decode(latents, return_dict=False)[0]


@contextlib.contextmanager
def _lora_scaled(text_encoder, scale: float | None):
    """The text encoder's LoRA layers scaled by `scale` for the block (nothing to do without LoRA layers)."""
    if scale is None or not any("lora" in name for name, _ in text_encoder.named_modules()):
        yield
        return
    from diffusers.utils import scale_lora_layers, unscale_lora_layers

    scale_lora_layers(text_encoder, scale)
    try:
        yield
    finally:
        unscale_lora_layers(text_encoder, scale)


def _per_image(embeds: torch.Tensor | None, n: int, device, dtype) -> torch.Tensor | None:
    """Each prompt's rows repeated n times, in order (prompt 0's n rows first)."""
    return None if embeds is None else embeds.to(device=device, dtype=dtype).repeat_interleave(n, dim=0)


def _check_interval(interval) -> None:
    if not valid_interval(interval):
        raise ValueError(f"guidance_interval must be (start, stop) with 0 ≤ start < stop ≤ 1, got {interval!r}")


def _check_finite(tensor: torch.Tensor, what: str, guidance_scale: float) -> None:
    """Sampling that overflows raises here, instead of writing a black or noisy image."""
    if torch.isfinite(tensor).all():
        return
    cause = (f"guidance_scale={guidance_scale:g} amplifies the guidance difference past float range"
             if guidance_scale > 100 else "the weights or the given latents give NaN/inf (a damaged weights file?)")
    raise FloatingPointError(f"sampling failed: {what} hold NaN or infinite values; {cause}")


def _negative_prompts(negative_prompt, batch: int) -> list[str]:
    """One negative prompt per prompt: one string for all, or a list of `batch`."""
    negatives = _as_prompt_list("negative_prompt", negative_prompt)
    if isinstance(negative_prompt, str):
        return negatives * batch
    if len(negatives) != batch:
        raise ValueError(f"negative_prompt must be one string or one per prompt ({batch}), got {len(negatives)}")
    return negatives


def _as_prompt_list(name: str, value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return list(value)
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{name} must be a str or a non-empty list of str, got an empty list")
    bad = value if not isinstance(value, (list, tuple)) else next(v for v in value if not isinstance(v, str))
    raise TypeError(f"{name} must be a str or a non-empty list of str, got {type(bad).__name__}: {bad!r}")


def _check_embeds(name: str, embeds, width: int) -> None:
    if not isinstance(embeds, torch.Tensor) or embeds.ndim != 3 or embeds.shape[-1] != width:
        got = tuple(embeds.shape) if isinstance(embeds, torch.Tensor) else type(embeds).__name__
        raise ValueError(f"{name} must be a tensor (batch, tokens, {width}) (the U-Net's cross_attention_dim), "
                         f"got {got}")


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer ≥ 1, got {value!r}")


def _accepted_kwargs(fn, **kwargs) -> dict:
    """The subset of kwargs that `fn` takes (schedulers differ: DDIM takes eta, Euler takes no eta …)."""
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kwargs.items() if k in params}
