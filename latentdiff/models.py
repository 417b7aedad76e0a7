"""Presets and builders for the three parts: a CLIP (whose text tower conditions the U-Net), a KL VAE, a U-Net.

A preset is a JSON file naming the architecture of all parts (`latentdiff/presets/{tiny,small,base}.json`,
or a path to your own). Run settings (learning rates, steps …) never live here; they are command-line flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPTokenizer

from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .model_folder import vae_scale_factor
from .schedulers import scheduler_class

PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_KEYS = ("resolution", "tokenizer", "clip", "vae", "unet", "scheduler")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(preset: str | Path | dict) -> dict:
    """A preset by name (`tiny`, `small`, `base`), by path to a JSON file, or as a dict; checked for consistency."""
    if isinstance(preset, dict):
        config = preset
    else:
        path = Path(preset)
        if not path.suffix and (PRESETS_DIR / f"{preset}.json").is_file():
            path = PRESETS_DIR / f"{preset}.json"
        if not path.is_file():
            raise ValueError(f"preset must be one of {preset_names()} or a path to a preset JSON file, got {str(preset)!r}")
        config = json.loads(path.read_text())
    missing = [k for k in PRESET_KEYS if k not in config]
    if missing:
        raise ValueError(f"preset {preset if not isinstance(preset, dict) else '(dict)'} lacks the sections {missing}")
    _check_preset(config)
    return config


def _check_preset(config: dict) -> None:
    text, unet, vae = config["clip"]["text_config"], config["unet"], config["vae"]
    if unet["cross_attention_dim"] != text["hidden_size"]:
        raise ValueError(f"preset: unet.cross_attention_dim must equal clip.text_config.hidden_size "
                         f"({text['hidden_size']}), got {unet['cross_attention_dim']}")
    factor = vae_scale_factor(vae)
    if unet["sample_size"] * factor != config["resolution"]:
        raise ValueError(f"preset: unet.sample_size × the VAE's downsampling factor ({factor}) must equal resolution "
                         f"({config['resolution']}), got {unet['sample_size']}")
    if config["tokenizer"]["model_max_length"] > text["max_position_embeddings"]:
        raise ValueError("preset: tokenizer.model_max_length must not exceed clip.text_config.max_position_embeddings")


def build_clip(preset: dict, tokenizer: CLIPTokenizer) -> CLIPModel:
    """A randomly initialised CLIPModel (text and image towers) whose vocabulary and special ids are the tokenizer's."""
    clip = preset["clip"]
    special = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = CLIPConfig(
        text_config={**clip["text_config"], **special, "projection_dim": clip["projection_dim"]},
        vision_config={**clip["vision_config"], "projection_dim": clip["projection_dim"]},
        projection_dim=clip["projection_dim"],
    )
    return CLIPModel(config)


def pooled(output) -> torch.Tensor:
    """The embeddings a CLIP's get_image_features / get_text_features return (a tensor in transformers 4, an output
    with pooler_output in 5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The CLIP's text tower as a standalone CLIPTextModel with the same weights (what the U-Net is conditioned on)."""
    text_encoder = CLIPTextModel(clip.config.text_config)
    text_encoder.load_state_dict(clip.text_model.state_dict())
    return text_encoder.to(clip.dtype)


def build_vae(preset: dict) -> AutoencoderKL:
    return AutoencoderKL(**preset["vae"])


def build_unet(preset: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel(**preset["unet"])


def build_scheduler(preset: dict) -> SchedulerMixin:
    config = dict(preset["scheduler"])
    return scheduler_class(config.pop("_class_name", "DDIMScheduler"))(**config)


def new_pipeline(preset: str | Path | dict = "tiny", seed: int = 0, tokenizer: CLIPTokenizer | None = None):
    """An untrained LatentDiffusionPipeline (with its full CLIP) from a preset; the tokenizer is trained on the
    built-in caption list unless one is given."""
    from .pipelines.text_to_image import LatentDiffusionPipeline
    from .tokenizer import builtin_captions, train_tokenizer

    config = load_preset(preset)
    if tokenizer is None:
        tokenizer = train_tokenizer(builtin_captions(), **config["tokenizer"])
    torch.manual_seed(seed)
    clip = build_clip(config, tokenizer)
    return LatentDiffusionPipeline(
        vae=build_vae(config),
        text_encoder=text_encoder_from_clip(clip),
        tokenizer=tokenizer,
        unet=build_unet(config),
        scheduler=build_scheduler(config),
        clip=clip,
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
