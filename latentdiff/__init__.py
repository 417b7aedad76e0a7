"""latentdiff: Stable-Diffusion-style latent text-to-image models, trained from scratch (CLIP, VAE, U-Net)."""

from .model_folder import ModelFolderError
from .models import load_preset, new_pipeline
from .image_to_image import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline
from .pipeline import LatentDiffusionPipeline
from .schedulers import DDIMScheduler, DDPMScheduler
from .tokenizer import train_tokenizer

__version__ = "0.1.0"
__all__ = ["LatentDiffusionPipeline", "LatentDiffusionImg2ImgPipeline", "LatentDiffusionInpaintPipeline", "DDPMScheduler", "DDIMScheduler", "ModelFolderError", "new_pipeline",
           "load_preset", "train_tokenizer", "__version__"]
