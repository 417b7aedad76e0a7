"""latentdiff: Stable-Diffusion-style latent text-to-image models, trained from scratch (CLIP, VAE, U-Net).

Layout: `pipelines/` (text-to-image, img2img, inpainting, guidance, few-step weights, traced and OpenVINO inference),
`runtime/` (the torch-free runtime of `latentdiff generate`), `training/` (the trainer, the CLIP, VAE and U-Net
stages, distillation, recipes), `evaluation/` (metrics, the eval job), `data/` (data sets, oracle, loader), and
at the top the parts they share: `diffusion` (the math), `schedulers`, `models` (presets), `model_folder`,
`tokenizer`, `images`, `files`, `argparsing`, `cli`.
"""

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
# The public names, imported when first used (PEP 562): `import latentdiff` and the CLI's cold start load neither
# torch nor diffusers until something needs them.
_PUBLIC = {
    "LatentDiffusionPipeline": "pipelines.text_to_image",
    "LatentDiffusionImg2ImgPipeline": "pipelines.image_to_image",
    "LatentDiffusionInpaintPipeline": "pipelines.image_to_image",
    "DDPMScheduler": "schedulers",
    "DDIMScheduler": "schedulers",
    "ModelFolderError": "model_folder",
    "new_pipeline": "models",
    "load_preset": "models",
    "train_tokenizer": "tokenizer",
}
__all__ = [*_PUBLIC, "__version__"]


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
    """The public names, and `latentdiff.pipeline` and the other old names as attributes too (`from latentdiff
    import clip_training`)."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"latentdiff.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    if f"latentdiff.{name}" in MOVED:
        return importlib.import_module(f"latentdiff.{name}")
    raise AttributeError(f"module 'latentdiff' has no attribute {name!r}")
