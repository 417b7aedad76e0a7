"""Model folders: a diffusers Stable Diffusion pipeline folder plus, optionally, `clip/` (the full CLIP, for judging).

    DIR/model_index.json   {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"], …}
    DIR/unet/  DIR/vae/  DIR/text_encoder/   config.json + *.safetensors (sharded: *.safetensors.index.json)
    DIR/tokenizer/   tokenizer.json or vocab.json + merges.txt
    DIR/scheduler/scheduler_config.json
    DIR/clip/        config.json + *.safetensors (optional; kept out of model_index.json so diffusers ignores it)

Weights are read from safetensors only: a folder whose weights exist only as pickles (*.bin, *.ckpt, *.pt …) is
refused, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .files import write_atomically

if TYPE_CHECKING:  # imported where used: resolving a model folder must not load torch (the CLI's cold start)
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPModel, CLIPTokenizer

SHIPPED_MODEL_DIR = Path(__file__).parent / "assets" / "default-model"
SHIPPED_MODELS = {  # names that load a model shipped inside the package; "emoji" is the default
    "emoji": SHIPPED_MODEL_DIR,
    "shapes": Path(__file__).parent / "assets" / "shapes-model",
}
WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
COMPONENTS = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
IMAGE_PROMPT_COMPONENTS = ("image_encoder", "feature_extractor")  # optional: what IP-Adapters encode images with
COMPONENT_FOLDERS = COMPONENTS + ("clip",) + IMAGE_PROMPT_COMPONENTS
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
MODEL_INDEX_ENTRIES = {
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
IMAGE_PROMPT_ENTRIES = {  # written to model_index.json when the folder holds them (what load_components reads)
    "image_encoder": (["transformers", "CLIPVisionModelWithProjection"], "config.json"),
    "feature_extractor": (["transformers", "CLIPImageProcessor"], "preprocessor_config.json"),
}


class ModelFolderError(ValueError, FileNotFoundError):
    """A model folder that is missing, incomplete, or holds weights in a form latentdiff will not load."""


NO_MODEL_HINT = (
    "no model ships with this installation yet. Make one with\n"
    "  latentdiff new-model --preset small --out my-model    (untrained: images are noise until it is trained)\n"
    "and pass it with --model my-model (or LatentDiffusionPipeline.from_pretrained('my-model')); README's "
    "'Training' section trains one from scratch."
)


def resolve_model_dir(path: str | Path | None) -> Path:
    """The local folder for `path`: the shipped emoji model when None, a shipped model by name ("emoji",
    "shapes"; a local model folder of that name wins), a local folder, or (online) a hub repository."""
    if path is None:
        if not (SHIPPED_MODEL_DIR / "model_index.json").is_file():
            raise ModelFolderError(NO_MODEL_HINT)
        return SHIPPED_MODEL_DIR
    local = Path(path).expanduser()
    if str(path) in SHIPPED_MODELS and not (local / "model_index.json").is_file():
        shipped = SHIPPED_MODELS[str(path)] if path != "emoji" else SHIPPED_MODEL_DIR  # tests may move the default
        if not (shipped / "model_index.json").is_file():
            raise ModelFolderError(f"the shipped model {str(path)!r} is not in this installation ({shipped} is "
                                   "missing); " + NO_MODEL_HINT)
        return shipped
    if local.exists():
        if not local.is_dir():
            raise ModelFolderError(f"model must be a folder (a diffusers pipeline folder), got the file {str(path)!r}")
        return local
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(path)):
        return _download(str(path))
    raise ModelFolderError(f"model folder {str(path)!r} does not exist")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    folders = WEIGHT_FOLDERS + ("clip",)
    patterns = ["model_index.json", "recipe.json", "tokenizer/*", "scheduler/*"]
    patterns += [f"{f}/*.json" for f in folders] + [f"{f}/*.safetensors" for f in folders]
    try:  # weight variants (fp16, ema …) are other files of the same folders; load only the plain weights
        return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=["*.*.safetensors"]))
    except Exception as error:  # offline, unknown repo, gated repo … all end the same way for the user
        raise ModelFolderError(f"model {repo_id!r} is not a local folder and could not be downloaded from the hub "
                               f"({type(error).__name__}: {error})") from error


def check_model_folder(root: Path, require_model_index: bool = True) -> None:
    """Raise ModelFolderError naming the first missing or refused file; return quietly when the folder is usable."""
    if require_model_index and not (root / "model_index.json").is_file():
        raise ModelFolderError(f"{root} is not a model folder: {root / 'model_index.json'} is missing")
    for name in WEIGHT_FOLDERS:
        check_weights(root / name)
    tokenizer = root / "tokenizer"
    if not ((tokenizer / "tokenizer.json").is_file() or (tokenizer / "vocab.json").is_file()
            and (tokenizer / "merges.txt").is_file()):
        raise ModelFolderError(f"incomplete model folder: {tokenizer} needs tokenizer.json or vocab.json + merges.txt")
    if not (root / "scheduler" / "scheduler_config.json").is_file():
        raise ModelFolderError(f"incomplete model folder: {root / 'scheduler' / 'scheduler_config.json'} is missing")


def check_weights(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelFolderError(f"incomplete model folder: {folder / 'config.json'} is missing")
    files = [p for p in folder.iterdir() if p.is_file()]
    if any(p.name.endswith((".safetensors", ".safetensors.index.json")) for p in files):
        check_safetensors(folder)
        return
    pickles = [p for p in files if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelFolderError(
            f"refusing {pickles[0]}: latentdiff loads safetensors only, and this folder has only pickle weights "
            "(unpickling can run arbitrary code). Convert it once where you trust the file, e.g. "
            "`Model.from_pretrained(folder).save_pretrained(folder)` with diffusers/transformers, which writes safetensors."
        )
    raise ModelFolderError(f"incomplete model folder: {folder} has no *.safetensors weights")


def check_safetensors(folder: Path) -> None:
    """Every *.safetensors file of the folder has a whole header and the data it declares (a truncated, empty or
    foreign file is named here, not in a loader's traceback), and every shard an index names is there."""
    from safetensors import SafetensorError, safe_open

    for index in sorted(folder.glob("*.safetensors.index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise ModelFolderError(f"damaged weights index {index}: {error}") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelFolderError(f"incomplete model folder: {index} names {folder / missing[0]}, which is missing")
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise ModelFolderError(f"damaged weights file {path} ({path.stat().st_size} bytes): {error}. It is "
                                   "truncated or not a safetensors file; write it again (training's --model-dir, "
                                   "`latentdiff export`) or copy it again") from None


def check_finite(module, folder: Path) -> None:
    """Raise ModelFolderError naming the weights file that holds a NaN or infinite value (damaged bytes inside a
    well-formed file load without complaint, and would sample black images)."""
    import torch

    bad = next((name for name, t in module.state_dict().items()
                if t.is_floating_point() and not torch.isfinite(t).all()), None)
    if bad is None:
        return
    from safetensors import safe_open

    where = [p for p in sorted(folder.glob("*.safetensors")) if any(
        k == bad or bad.endswith("." + k) or k.endswith("." + bad) for k in safe_open(str(p), "pt").keys())]
    raise ModelFolderError(f"damaged weights file {where[0] if where else folder}: tensor {bad!r} holds NaN or "
                           "infinite values; write the file again or copy it again")


def load_components(root: Path, dtype=None, variant: str | None = None) -> dict:
    """Every component of the folder (plus `clip` when `clip/` is there), loaded from safetensors, each checked
    for damaged files and non-finite weights."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

    dtypes = dtype if isinstance(dtype, dict) else {"default": dtype}
    unknown = set(dtypes) - set(COMPONENT_FOLDERS) - {"default"}
    if unknown:
        raise ValueError(f"torch_dtype names components this pipeline does not have: {sorted(unknown)} (it has "
                         f"{list(COMPONENT_FOLDERS)} and 'default')")
    of = lambda name: dtypes.get(name, dtypes.get("default")) or torch.float32  # noqa: E731
    kw = dict(use_safetensors=True, variant=variant)
    has_clip = (root / "clip" / "config.json").is_file()
    has_encoder = (root / "image_encoder" / "config.json").is_file()
    for name, present in (("clip", has_clip), ("image_encoder", has_encoder)):
        if present:
            check_weights(root / name)
    if variant is not None:
        for name in WEIGHT_FOLDERS + (("clip",) if has_clip else ()) + (("image_encoder",) if has_encoder else ()):
            if not any(f".{variant}." in p.name or f".{variant}-" in p.name for p in (root / name).iterdir()):
                raise ModelFolderError(f"You are trying to load the model files of the `variant={variant}`, but "
                                       f"{root / name} has none (its files: "
                                       f"{sorted(p.name for p in (root / name).iterdir())})")
    loaders = {
        "tokenizer": lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(root / "text_encoder", dtype=of("text_encoder"), **kw),
        "vae": lambda: AutoencoderKL.from_pretrained(root / "vae", torch_dtype=of("vae"), **kw),
        "unet": lambda: UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=of("unet"), **kw),
        "scheduler": lambda: load_scheduler(root / "scheduler"),
    }
    if has_clip:
        loaders["clip"] = lambda: CLIPModel.from_pretrained(root / "clip", dtype=of("clip"), **kw)
    if has_encoder:
        from transformers import CLIPVisionModelWithProjection

        loaders["image_encoder"] = lambda: CLIPVisionModelWithProjection.from_pretrained(
            root / "image_encoder", dtype=of("image_encoder"), **kw)
    if (root / "feature_extractor" / "preprocessor_config.json").is_file():
        from transformers import CLIPImageProcessor

        loaders["feature_extractor"] = lambda: CLIPImageProcessor.from_pretrained(root / "feature_extractor")
    components = {"clip": None, "image_encoder": None, "feature_extractor": None}
    for name, load in loaders.items():
        try:
            components[name] = load()
        except ModelFolderError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as error:  # configs and tokenizer files read by others
            raise ModelFolderError(f"cannot load {root / name}: {type(error).__name__}: {error}") from error
        if isinstance(components[name], torch.nn.Module):
            check_finite(components[name], root / name)
    return components


def load_scheduler(folder: Path) -> SchedulerMixin:
    """Our DDPM/DDIM for those class names (same configs, same results as diffusers'), else diffusers' own class."""
    from .schedulers import scheduler_class

    try:
        config = json.loads((folder / "scheduler_config.json").read_text())
        name = config.get("_class_name", "DDIMScheduler")
    except (ValueError, AttributeError) as error:
        raise ModelFolderError(f"damaged {folder / 'scheduler_config.json'}: not a JSON object ({error})") from None
    try:
        cls = scheduler_class(name)
    except ValueError:
        raise ModelFolderError(f"{folder / 'scheduler_config.json'} names an unknown scheduler class {name!r}") from None
    return cls.from_pretrained(folder)


def with_config(cls, config, **changes):
    """A new `cls` from a diffusers config with `changes` applied. The private keys go first: `from_config` would
    put back the defaults of every key that `_use_default_values` lists, the changed ones among them."""
    return cls.from_config({**{k: v for k, v in config.items() if not k.startswith("_")}, **changes})


def vae_scale_factor(vae_config) -> int:
    """How much the VAE shrinks each side: one factor 2 per down block after the first (a dict or a config)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def save_clip_folder(clip: CLIPModel, tokenizer: CLIPTokenizer, folder, max_shard_size: str | int = "15MB",
                     variant: str | None = None) -> None:
    """The whole CLIP with its tokenizer and image-processor config, so any transformers CLIP tool can load it.
    Our CLIP takes images in [−1, 1]: the processor maps [0, 1] there (mean = std = 0.5)."""
    from transformers import CLIPImageProcessor

    size = clip.config.vision_config.image_size
    clip.save_pretrained(folder, max_shard_size=max_shard_size, variant=variant)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def write_model_index(root: Path, scheduler: SchedulerMixin) -> None:
    """A model_index.json that diffusers' StableDiffusionPipeline loads as it is (no safety checker; the image
    encoder and feature extractor when their folders are there), written to a temporary file and renamed, so a
    reader never sees half of it."""
    import diffusers

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        **MODEL_INDEX_ENTRIES,
        # our DDPM/DDIM share diffusers' class names and configs, so diffusers loads its own class from the folder
        "scheduler": ["diffusers", type(scheduler).__name__],
        "safety_checker": [None, None],
        **{name: entry if (root / name / marker).is_file() else [None, None]
           for name, (entry, marker) in IMAGE_PROMPT_ENTRIES.items()},
        "requires_safety_checker": False,
    }
    write_atomically(root / "model_index.json", json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_component(folder: str | Path, save: Callable[[Path], None] | None) -> None:
    """Write one component folder through `save(staging_folder)`, then swap it in for the old one: a run killed
    while saving leaves the previous component whole (training stages write into folders other runs read), and an
    exception between the two renames puts the old one back. `save=None` removes the component.

    A hard kill in the instant between the renames leaves the old folder in `.NAME-*/old`; the next write of NAME
    puts it back before it starts."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    if not folder.exists():
        for leftover in sorted(folder.parent.glob(f".{folder.name}-*/old")):
            leftover.rename(folder)
            break
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    new, old = staging / folder.name, staging / "old"
    try:
        if save is not None:
            save(new)
            if not new.is_dir():
                raise RuntimeError(f"writing {folder} produced no folder")
        try:
            if folder.exists():
                folder.rename(old)
            if save is not None:
                new.rename(folder)
        except BaseException:
            if old.is_dir() and not folder.exists():
                old.rename(folder)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
