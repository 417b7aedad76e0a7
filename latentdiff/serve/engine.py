"""What the server generates with: one model, its pipelines per task and sampler, and the checks a request passes
before it is queued.

Every request runs alone, in one worker thread, with one torch generator per image and a pipeline whose compiled
networks are made at a shape's first call (`compile_first_call`): so a request's images are the same bytes whether
it ran alone, after others, or while others waited, and whether its shape was seen before."""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from .samplers import LCM, Choice, RequestError, make_scheduler, resolve

MAX_PIXELS = 4096 * 4096  # an upload larger than this is refused before it is decoded (decompression bombs)
UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass
class Job:
    """One request: what to make (checked), and where it stands while the worker makes it."""
    kind: str  # "txt2img", "img2img" or "inpaint"
    request: dict
    choice: Choice
    seeds: list[int]
    init_image: object = None
    mask: object = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    iteration: int = 0
    step: int = 0
    steps: int = 0  # the sampler's steps per iteration (img2img runs fewer than requested: strength)
    interrupted: bool = False
    skipped: bool = False


class Engine:
    """The model and its pipelines: `check` turns a request into a Job or raises RequestError; `run` makes it."""

    def __init__(self, model: str | None = None):
        from ..model_folder import resolve_model_dir
        from ..pipelines.text_to_image import LatentDiffusionPipeline

        self.model_dir = resolve_model_dir(model)
        self.model_name = model_name(model, self.model_dir)
        self.hash = weights_hash(self.model_dir)
        pipe = LatentDiffusionPipeline.from_pretrained(self.model_dir)
        pipe.set_progress_bar_config(disable=True)
        pipe.compile_first_call = True  # same bytes for a request whether its shape was seen before or not
        self.pipe = pipe
        self.native_height, self.native_width = pipe.native_size
        self.factor = pipe.vae_scale_factor
        self.train_steps = pipe.scheduler.config.num_train_timesteps
        self.max_few_steps = pipe.few_step.max_steps if pipe.few_step is not None else 0
        self._pipes: dict = {}

    @property
    def title(self) -> str:
        """A1111's checkpoint title: name [short hash]."""
        return f"{self.model_name} [{self.hash[:10]}]"

    @property
    def own_sampler(self) -> str:
        from ..images import A1111_SAMPLERS

        name = type(self.pipe.scheduler).__name__
        return A1111_SAMPLERS.get(name, name)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 4)) -> None:
        """Calls at the native size with the model's own sampler (and its few-step weights), one per batch size
        (the API's default and the page's), so that the first requests do not wait for their networks to compile
        (OpenVINO keeps them on disk: the next start is faster)."""
        pipe = self.pipe
        for batch in batch_sizes:
            pipe.use_few_step = False
            try:
                pipe("", num_inference_steps=2, guidance_scale=7.5, num_images_per_prompt=batch)
            finally:
                pipe.use_few_step = True
            if self.max_few_steps:
                pipe("", num_inference_steps=1, guidance_scale=7.5, num_images_per_prompt=batch)

    # Requests -> jobs -------------------------------------------------------------------------------------------

    def check(self, kind: str, request: dict, init_image: str | None = None, mask: str | None = None) -> Job:
        """The job of a request whose fields passed pydantic, after the checks that need the model."""
        from ..pipelines import MAX_SIZE_FACTOR

        for flag, unsupported in (("enable_hr", True), ("tiling", True), ("restore_faces", True)):
            if request.get(flag) == unsupported:
                raise RequestError(flag, f"{flag} is not supported by this server (latentdiff); send false")
        if request.get("subseed_strength"):
            raise RequestError("subseed_strength", "variation seeds are not supported by this server; send 0")
        if request.get("script_name"):
            raise RequestError("script_name", f"scripts are not supported by this server, got "
                                              f"{request['script_name']!r}")
        name = request.get("sampler_name") or request.get("sampler_index")
        choice = resolve(name, request.get("scheduler"))
        steps = request["steps"]
        if steps > self.train_steps:
            raise RequestError("steps", f"steps must be at most {self.train_steps} (the model's training timesteps), "
                                        f"got {steps}")
        if choice.sampler is not None and choice.sampler.name == LCM:
            if not self.max_few_steps:
                raise RequestError("sampler_name", f"sampler_name 'LCM' needs few-step weights, which the model "
                                                   f"{self.model_name!r} does not have")
            if steps > self.max_few_steps:
                raise RequestError("steps", f"steps must be at most {self.max_few_steps} with sampler_name 'LCM' "
                                            f"(the model's few-step weights), got {steps}")
        for name, native in (("width", self.native_width), ("height", self.native_height)):
            value, limit = request.get(name), MAX_SIZE_FACTOR * native
            if value is None:
                request[name] = native
            elif value % self.factor or not 0 < value <= limit:
                raise RequestError(name, f"{name} must be a positive multiple of {self.factor} and at most {limit} "
                                         f"({MAX_SIZE_FACTOR} × the model's native {native} px), got {value}")
        count = request["batch_size"] * request["n_iter"]
        seed = request["seed"]
        if seed == -1:
            seed = request["seed"] = random.randrange(2**32)
        if seed + count - 1 > MAX_SEED:
            raise RequestError("seed", f"seed + batch_size × n_iter − 1 must be at most 2**64 − 1, got "
                                       f"{seed + count - 1}")
        job = Job(kind, request, choice, [seed + k for k in range(count)])
        if init_image is not None:
            job.init_image = decode_image(init_image, "init_images[0]").convert("RGB")
        if mask is not None:
            from PIL import ImageFilter, ImageOps

            job.mask = decode_image(mask, "mask").convert("L")
            if request.get("inpainting_mask_invert"):
                job.mask = ImageOps.invert(job.mask)
            if request.get("mask_blur"):
                job.mask = job.mask.filter(ImageFilter.GaussianBlur(request["mask_blur"]))
            job.kind = "inpaint"
        return job

    # Generation -------------------------------------------------------------------------------------------------

    def pipeline(self, kind: str, choice: Choice):
        """The pipeline of a task and sampler, made once: it shares the model's modules and compiled networks."""
        key = (kind, choice)
        if key not in self._pipes:
            from ..pipelines.image_to_image import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline

            cls = {"txt2img": type(self.pipe), "img2img": LatentDiffusionImg2ImgPipeline,
                   "inpaint": LatentDiffusionInpaintPipeline}[kind]
            if choice.sampler is None or choice.sampler.name == LCM:  # the model's own, or its few-step weights
                pipe = self.pipe if cls is type(self.pipe) else cls.from_pipe(self.pipe)
            else:
                pipe = cls.from_pipe(self.pipe, scheduler=make_scheduler(choice, self.pipe.scheduler.config))
                pipe.use_few_step = False  # a sampler named samples the model itself, as in `latentdiff generate`
            pipe.set_progress_bar_config(disable=True)
            self._pipes[key] = pipe
        return self._pipes[key]

    def run(self, job: Job) -> dict:
        """Make a job's images (batch_size per iteration, n_iter iterations, image k with seed + k); an interrupt
        ends it after the current step with what was made, a skip ends the current iteration there."""
        import torch

        r, pipe = job.request, self.pipeline(job.kind, job.choice)
        job.started = time.time()
        few_step = pipe.few_step_for(r["steps"]) is not None
        label = LCM if few_step else job.choice.label or self.own_sampler
        extra = {}
        if job.kind != "txt2img":
            extra = {"image": job.init_image, "strength": r["denoising_strength"]}
        if job.kind == "inpaint":
            extra["mask_image"] = job.mask

        def on_step(p, i, t, tensors):
            job.step, job.steps = i + 1, p.num_timesteps
            if job.interrupted or job.skipped:
                p._interrupt = True
            return {}

        images, batch = [], r["batch_size"]
        for j in range(r["n_iter"]):
            if job.interrupted:
                break
            job.iteration, job.step, job.skipped = j, 0, False
            job.steps = r["steps"]  # until the first step tells how many the sampler runs (img2img: fewer)
            seeds = job.seeds[j * batch:(j + 1) * batch]
            images += pipe(r["prompt"], num_inference_steps=r["steps"], guidance_scale=r["cfg_scale"],
                           negative_prompt=r["negative_prompt"] or None, num_images_per_prompt=batch,
                           height=r["height"], width=r["width"], eta=r.get("eta") or 0.0,
                           generator=[torch.Generator().manual_seed(s) for s in seeds],
                           callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=[], **extra).images
        return self.result(job, images, label)

    def result(self, job: Job, images: list, label: str) -> dict:
        """A1111's response: base64 PNGs (a grid first when there are several and return_grid is on) carrying their
        parameters, the request with its defaults filled in, and the info JSON."""
        from ..images import image_grid, parameters_text, png_info

        r = job.request
        params = [{"prompt": r["prompt"], "negative_prompt": r["negative_prompt"] or None, "steps": r["steps"],
                   "guidance_scale": r["cfg_scale"], "seed": seed, "width": r["width"], "height": r["height"],
                   "scheduler": label, "model": self.model_name, "version": f"latentdiff {__version__}",
                   **({"strength": r["denoising_strength"]} if job.kind != "txt2img" else {})}
                  for seed in job.seeds[:len(images)]]
        encoded = [png_base64(image, p) for image, p in zip(images, params)]
        grid = len(images) > 1 and r.get("return_grid", True)
        if grid:
            encoded.insert(0, png_base64(image_grid(images), None))
        info = {"prompt": r["prompt"], "all_prompts": [r["prompt"]] * len(images),
                "negative_prompt": r["negative_prompt"], "all_negative_prompts": [r["negative_prompt"]] * len(images),
                "seed": job.seeds[0], "all_seeds": job.seeds[:len(images)], "subseed": job.seeds[0],
                "all_subseeds": job.seeds[:len(images)], "subseed_strength": 0, "width": r["width"],
                "height": r["height"], "sampler_name": label, "scheduler": (job.choice.schedule or "automatic").title(),
                "cfg_scale": r["cfg_scale"], "steps": r["steps"], "batch_size": r["batch_size"],
                "denoising_strength": r.get("denoising_strength") if job.kind != "txt2img" else None,
                "sd_model_name": self.model_name, "sd_model_hash": self.hash[:10], "seed_resize_from_w": -1,
                "seed_resize_from_h": -1, "index_of_first_image": int(grid),
                "infotexts": [parameters_text(p) for p in params], "interrupted": job.interrupted,
                "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created)),
                "version": f"latentdiff {__version__}"}
        return {"images": encoded if r.get("send_images", True) else [], "parameters": r,
                "info": json.dumps(info, ensure_ascii=False)}


def png_base64(image, params: dict | None) -> str:
    from ..images import png_info

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(params) if params is not None else None)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, field_name: str):
    """A base64 image (optionally a data: URL) of an allowed format and size, decoded; RequestError otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(data, str) or not data:
        raise RequestError(field_name, f"{field_name} must be a base64-encoded image, got {type(data).__name__}")
    if data.startswith("data:"):
        data = data.partition(",")[2]
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(field_name, f"{field_name} must be base64 (optionally a data: URL); it is not") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=UPLOAD_FORMATS)
        if image.width * image.height > MAX_PIXELS:
            raise RequestError(field_name, f"{field_name} must have at most {MAX_PIXELS} pixels, got "
                                           f"{image.width}×{image.height}")
        image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        if isinstance(error, RequestError):
            raise
        raise RequestError(field_name, f"{field_name} must be a {', '.join(UPLOAD_FORMATS)} image: "
                                       f"{' '.join(str(error).split()) or type(error).__name__}") from None
    return image


def model_name(model: str | None, folder: Path) -> str:
    """How the model is named to clients: a shipped model by its name, a folder by its folder name."""
    from ..model_folder import SHIPPED_MODELS

    for name, path in SHIPPED_MODELS.items():
        if Path(path).resolve() == folder.resolve():
            return name
    return folder.name


def weights_hash(folder: Path) -> str:
    """sha256 over the model's weight files in name order (A1111 shows the first 10 hex digits)."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()
