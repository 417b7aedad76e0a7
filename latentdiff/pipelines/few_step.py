"""Few-step weights: a latent consistency distillation (LCM-LoRA, Luo et al. 2023) of a model's U-Net, kept beside it
in `few_step/` and used by the pipeline whenever a call asks for few steps.

The folder holds `config.json` (the adapter's rank and target layers, the width of the guidance embedding, the
solver's steps the scheduler needs, and up to how many steps it is used) and `adapter.safetensors`: the LoRA's
matrices (peft's names) and the guidance embedding's weight, which the base U-Net does not have. The student is
the base U-Net with a guidance embedding (`time_cond_proj_dim`) and the LoRA merged in: an ordinary
UNet2DConditionModel, built once per base U-Net, dtype and device. diffusers' own pipeline ignores the folder.
"""

from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from ..model_folder import write_component

FOLDER = "few_step"
GUIDANCE_KEY = "time_embedding.cond_proj.weight"
# LCM-LoRA's layers (diffusers' train_lcm_distill_lora_sd_wds.py): attention, feed-forward, resnets, resamplers.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


def with_guidance_embedding(unet: UNet2DConditionModel, dim: int) -> UNet2DConditionModel:
    """`unet` with a guidance embedding of width `dim` added, initialised to zero: it computes what `unet` does."""
    student = UNet2DConditionModel.from_config({**unet.config, "time_cond_proj_dim": dim})
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {GUIDANCE_KEY}:
        raise ValueError(f"the U-Net does not take a guidance embedding: missing {missing}, unexpected {unexpected}")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return _moved(student.train(unet.training), unet)


def _moved(module, like):
    """`module` on `like`'s device and in its dtype; cast only when the dtype differs (diffusers warns at every cast,
    which `latentdiff generate` would print)."""
    from . import _without_log_records

    module = module.to(device=like.device)
    if module.dtype == like.dtype:
        return module
    with _without_log_records("diffusers.models.modeling_utils", "should be kept in float32: []"):
        return module.to(dtype=like.dtype)


def add_lora(unet: UNet2DConditionModel, rank: int) -> None:
    """A LoRA of `rank` on LORA_TARGETS (B = 0, so the U-Net is unchanged until it trains)."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))


def save(unet: UNet2DConditionModel, folder: str | Path, rank: int, original_inference_steps: int,
         max_steps: int = 8, guidance_range: tuple[float, float] | None = None,
         dtype: torch.dtype | None = None) -> Path:
    """Write the few-step folder of a student that carries a LoRA (`add_lora`) and a guidance embedding."""
    from peft.utils import get_peft_model_state_dict

    tensors = {**get_peft_model_state_dict(unet), GUIDANCE_KEY: unet.time_embedding.cond_proj.weight}
    tensors = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in tensors.items()}
    config = {"kind": "lcm-lora", "rank": rank, "target_modules": LORA_TARGETS,
              "time_cond_proj_dim": unet.config.time_cond_proj_dim,
              "original_inference_steps": original_inference_steps, "max_steps": max_steps,
              "guidance_range": list(guidance_range) if guidance_range else None}
    _write(folder, tensors, config)
    return folder


@dataclass
class FewStep:
    """A model's few-step weights (`few_step/`), loaded when first used."""

    folder: Path
    config: dict = field(init=False)
    _built: tuple | None = field(default=None, init=False, repr=False)  # (weakref to the base, dtype, device, student)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self):
        self.folder = Path(self.folder)
        try:
            self.config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.folder}: not a few-step folder ({error})") from None
        if self.config.get("kind") != "lcm-lora" or not (self.folder / "adapter.safetensors").is_file():
            raise ValueError(f"{self.folder}: config.json must say kind 'lcm-lora' beside adapter.safetensors")

    @classmethod
    def find(cls, model_dir: str | Path) -> "FewStep | None":
        folder = Path(model_dir) / FOLDER
        return cls(folder) if (folder / "config.json").is_file() else None

    @property
    def max_steps(self) -> int:
        return int(self.config["max_steps"])

    def scheduler(self, base_config) -> LCMScheduler:
        """The scheduler the student samples with, on the base model's noise schedule."""
        return LCMScheduler.from_config(base_config, original_inference_steps=self.config["original_inference_steps"])

    def unet(self, base: UNet2DConditionModel) -> UNet2DConditionModel:
        """The student for `base` as it is now (built once per base U-Net, dtype and device)."""
        with self._lock:  # threads sharing a pipeline build it once
            built = self._built
            if built is None or built[0]() is not base or built[1:3] != (base.dtype, base.device):
                self._built = built = (weakref.ref(base), base.dtype, base.device, self._build(base))
            return built[3]

    def clear(self) -> None:
        with self._lock:
            self._built = None

    def _build(self, base: UNet2DConditionModel) -> UNet2DConditionModel:
        from peft.utils import set_peft_model_state_dict

        tensors = load_file(self.folder / "adapter.safetensors")
        student = with_guidance_embedding(base, self.config["time_cond_proj_dim"]).float()
        add_lora(student, self.config["rank"])
        guidance = tensors.pop(GUIDANCE_KEY)
        result = set_peft_model_state_dict(student, tensors)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{self.folder}: adapter.safetensors does not fit the model's U-Net "
                             f"(unexpected {result.unexpected_keys[:3]} …)")
        student.fuse_lora()
        student.unload_lora()
        student.time_embedding.cond_proj.weight.data.copy_(guidance)
        return _moved(student.requires_grad_(False).eval(), base)

    def copy_to(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write this folder into a model folder `folder` (its weights in `dtype` when given)."""
        tensors = load_file(self.folder / "adapter.safetensors")
        _write(Path(folder) / FOLDER, {k: v.to(dtype or v.dtype).contiguous() for k, v in tensors.items()},
               self.config)


def _write(folder: Path, tensors: dict, config: dict) -> None:
    """The folder written whole, or not at all (staged, then swapped in)."""
    def write(staging: Path) -> None:
        staging.mkdir()
        save_file(tensors, staging / "adapter.safetensors")
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    write_component(folder, write)
