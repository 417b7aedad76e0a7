"""latentdiff: Stable-Diffusion-style latent text-to-image models, trained from scratch (CLIP, VAE, U-Net).

Layout: `pipelines/` (text-to-image, img2img, inpainting, guidance, traced inference), `training/` (the trainer, the
CLIP, VAE and U-Net stages, recipes), `evaluation/` (metrics, the eval job), `data/` (data sets, oracle, loader), and
at the top the parts they share: `diffusion` (the math), `schedulers`, `models` (presets), `model_folder`,
`tokenizer`, `images`, `files`, `argparsing`, `cli`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

from .model_folder import ModelFolderError
from .models import load_preset, new_pipeline
from .pipelines.image_to_image import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline
from .pipelines.text_to_image import LatentDiffusionPipeline
from .schedulers import DDIMScheduler, DDPMScheduler
from .tokenizer import train_tokenizer

__version__ = "0.1.0"
__all__ = ["LatentDiffusionPipeline", "LatentDiffusionImg2ImgPipeline", "LatentDiffusionInpaintPipeline",
           "DDPMScheduler", "DDIMScheduler", "ModelFolderError", "new_pipeline", "load_preset", "train_tokenizer",
           "__version__"]


# Modules that moved into the subpackages still import by their old names (the same module objects).
MOVED = {
    "latentdiff.pipeline": "latentdiff.pipelines.text_to_image",
    "latentdiff.image_to_image": "latentdiff.pipelines.image_to_image",
    "latentdiff.guidance": "latentdiff.pipelines.guidance",
    "latentdiff.tracing": "latentdiff.pipelines.tracing",
    "latentdiff.attention": "latentdiff.pipelines.attention",
    "latentdiff.trainer": "latentdiff.training.trainer",
    "latentdiff.clip_training": "latentdiff.training.clip",
    "latentdiff.vae_training": "latentdiff.training.vae",
    "latentdiff.unet_training": "latentdiff.training.unet",
    "latentdiff.recipes": "latentdiff.training.recipes",
    "latentdiff.eval_job": "latentdiff.evaluation.job",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass  # already imported under its new name; the old name now points at it


sys.meta_path.append(_MovedModules())


def __getattr__(name: str):
    """`latentdiff.pipeline` and the other old names as attributes too (`from latentdiff import clip_training`)."""
    if f"latentdiff.{name}" in MOVED:
        return importlib.import_module(f"latentdiff.{name}")
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")
