"""The `latentdiff` command: `latentdiff generate "a tiger"`, `latentdiff new-model --preset small --out DIR`."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from . import __version__, argparsing
from .argparsing import SCHEDULER_NAMES, guidance, port, positive_float, positive_int, seed
from .data.build import add_data_commands, make_data

PROVENANCE_FILES = ("recipe.json",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.parser("latentdiff", __doc__)
    parser.add_argument("--version", action="version", version=f"latentdiff {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on "
                        "the command line)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=argparsing.ArgumentParser)
    sub = lambda name, **kw: commands.add_parser(name, formatter_class=argparsing.HelpFormatter, **kw)  # noqa: E731

    gen = sub("generate", help="generate an image (a grid when --num-images > 1) from a prompt")
    gen.add_argument("prompt", nargs="?", default=None, help="what the image should show (or --from-png)")
    gen.add_argument("--from-png", default=None, metavar="PNG",
                     help="make the image a PNG written by latentdiff again, with the parameters it carries (flags "
                          "given as well replace them; default: none)")
    gen.add_argument("--model", default=None, help="model folder, or a shipped model's name: emoji (the default) "
                                                  "or shapes")
    gen.add_argument("--out", default="image.png", help="image file to write; its extension picks the format")
    gen.add_argument("--steps", type=positive_int, default=None, help="sampling steps (default: 25)")
    gen.add_argument("--guidance-scale", type=guidance, default=None, help="classifier-free guidance s (default: 7.5)")
    gen.add_argument("--guidance-rescale", type=float, default=None, metavar="PHI",
                     help="φ of Lin et al. 2024: rescale the guided ε toward the conditional one's standard "
                          "deviation, in [0, 1] (A1111/Forge's Rescale CFG; default: 0, off)")
    gen.add_argument("--guidance-interval", type=float, nargs=2, default=None, metavar=("START", "STOP"),
                     help="guide only the steps in this fraction of the sampling, e.g. 0.3 1 leaves the first 30 %% "
                          "(the highest noise) unguided (Kynkäänniemi et al. 2024; diffusers' guider start/stop; "
                          "default: 0 1, every step)")
    gen.add_argument("--seed", type=seed, default=None, help="seed of the initial noise; image k of --num-images "
                                                             "gets seed + k, as in AUTOMATIC1111 (default: 0)")
    gen.add_argument("--num-images", type=positive_int, default=None,
                     help="images of the prompt: each written as OUT-k.png, and all as one grid in OUT (default: 1)")
    gen.add_argument("--negative-prompt", default=None, help="text to steer away from (default: none, the empty prompt)")
    gen.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                     help="default: the model's own; with --steps at most 8 on a model with few-step weights (the "
                          "shipped emoji model), those weights and LCMScheduler. A scheduler named here always "
                          "samples the model itself")
    gen.add_argument("--init-image", default=None, metavar="PATH",
                     help="start from this image (img2img; default: none, from noise)")
    gen.add_argument("--strength", type=float, default=None,
                     help="how much of the schedule --init-image goes through: 1 ignores it, 0 returns it "
                          "(default: 0.8; 1 with --mask)")
    gen.add_argument("--mask", default=None, metavar="PATH",
                     help="inpaint: white is generated, black kept from --init-image (default: none)")
    gen.add_argument("--classifier", default=None, metavar="DIR",
                     help="classifier guidance with this noise-aware latent classifier (the RUN/classifier folder "
                          "training/train_classifier.py writes; default: none)")
    gen.add_argument("--classifier-label", default=None,
                     help="the class --classifier steers toward: one of its class names (or an index); "
                          "required with --classifier (default: none)")
    gen.add_argument("--classifier-scale", type=float, default=None,
                     help="s in ε̂ − s √(1 − ᾱ_t) ∇ log p(y | x_t), after classifier-free guidance (default: 1)")
    gen.add_argument("--height", type=positive_int, default=None, help="image height in pixels (default: the model's native size)")
    gen.add_argument("--width", type=positive_int, default=None, help="image width in pixels (default: the model's native size)")

    info = sub("info", help="print the parameters a PNG written by latentdiff carries")
    info.add_argument("image", help="a PNG written by `latentdiff generate`")

    data = sub("data", help="write a built-in data set as a `datasets` imagefolder")
    add_data_commands(data)

    sub("eval", help="evaluate a model (CLIP score, FD, oracle accuracy) over guidance scales",
                        add_help=False)

    recipe = sub("run-recipe", help="run (or finish) a training recipe from pipelines/")
    recipe.add_argument("recipe", help="a recipe TOML file, e.g. pipelines/emoji64.toml")
    recipe.add_argument("--out", required=True, help="run folder (data, model, checkpoints, stage records)")
    recipe.add_argument("--stages", default=None, help="comma-separated subset of data,clip,text,vae,unet,decoder,distill,eval (default: every stage of the "
                        "recipe)")
    recipe.add_argument("--time-limit", type=positive_float, default=None, metavar="MINUTES",
                        help="end each training stage of this sitting at its first step after MINUTES, with a "
                        "checkpoint (overrides the recipe's; the stage is recorded as partial and trains on when run "
                        "again; default: none)")

    export = sub("export", help="copy a model folder with its weights stored in another precision")
    export.add_argument("model", help="model folder to copy")
    export.add_argument("--out", required=True, help="folder to write (e.g. latentdiff/assets/default-model)")
    export.add_argument("--scheduler", choices=SCHEDULER_NAMES, default=None,
                        help="store this sampler instead of the model's own (same noise schedule and prediction type; default: the model's own)")
    export.add_argument("--dtype", choices=tuple(argparsing.DTYPE_NAMES), default="fp16",
                        help="precision of the stored weights (default: fp16, half the size; they load as fp32)")
    export.add_argument("--no-clip", action="store_true",
                        help="leave out clip/ (the judge for CLIP score and retrieval; generation does not use it)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace the model in an existing --out folder (its other files are kept)")

    compile_ = sub("compile", help="build a model's runtime for `generate` (OpenVINO networks, no torch at start-up); "
                   "the first `generate` of a model also builds it, in the background")
    compile_.add_argument("--model", default=None, help="model folder, or a shipped model's name (default: emoji)")

    serve = sub("serve", help="a web page and AUTOMATIC1111's HTTP API (/sdapi/v1/txt2img, img2img, progress, …) on "
                "one model")
    serve.add_argument("--model", default=None, help="model folder, or a shipped model's name (default: emoji)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine "
                       "only; any other needs --allow-remote)")
    serve.add_argument("--port", type=port, default=7860, help="port to listen on (default: 7860, A1111's)")
    serve.add_argument("--allow-remote", action="store_true",
                       help="let --host be an address other machines can reach (then use --token)")
    serve.add_argument("--token", default=None, help="require this token (Authorization: Bearer TOKEN, or HTTP Basic "
                       "with it as the password; default: $LATENTDIFF_TOKEN, else none)")
    serve.add_argument("--queue-size", type=positive_int, default=16,
                       help="requests that may wait while one generates; more are answered 429 (default: 16)")
    serve.add_argument("--max-upload-mb", type=positive_float, default=32,
                       help="largest request body, uploads included, in MiB; larger ones are answered 413 "
                            "(default: 32)")

    new = sub("new-model", help="write an untrained model folder from a preset")
    new.add_argument("--preset", default="small", help="tiny, small, base, or a preset JSON file (default: small)")
    new.add_argument("--out", required=True, help="folder to write")
    new.add_argument("--seed", type=seed, default=0, help="seed of the initial weights")
    new.add_argument("--overwrite", action="store_true",
                     help="replace the model in an existing --out folder (its other files are kept)")
    return parser


GENERATE_DEFAULTS = {"steps": 25, "guidance_scale": 7.5, "guidance_rescale": 0.0, "guidance_interval": (0.0, 1.0),
                     "seed": 0, "num_images": 1}


def generation_args(args) -> None:
    """Fill the generate flags left unset: from --from-png's parameters, else the defaults."""
    from .images import read_parameters

    made, args.pick = {}, None
    if args.from_png is not None:
        made = read_parameters(args.from_png)
        if args.seed is None and args.num_images is None and made.get("num_images", 1) > 1:
            # an image of a batch: the batch again, and that image of it (a batch's images can differ from the
            # same seeds run one by one in the last bit of float32)
            args.seed, args.num_images = made["seed"] - made["index"], made["num_images"]
            args.pick = made["index"]
        for key in ("prompt", "negative_prompt", "model", "height", "width", "init_image", "strength", "mask",
                    "classifier", "classifier_label", "classifier_scale"):
            if getattr(args, key) is None:
                setattr(args, key, made.get(key))
        if args.scheduler is None:
            args.scheduler = made.get("scheduler_choice")
    elif args.prompt is None:
        raise ValueError("give a prompt (or --from-png IMAGE.png)")
    for key, default in GENERATE_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, made.get(key, default))
    if args.mask is not None and args.init_image is None:
        raise ValueError("--mask needs --init-image, the picture to fill in")
    if args.strength is not None and args.init_image is None:
        raise ValueError("--strength needs --init-image, the picture to start from")
    for flag in ("init_image", "mask"):
        if getattr(args, flag) is not None and not Path(getattr(args, flag)).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} must be an image file, got {getattr(args, flag)!r}")
    if not 0 <= args.guidance_rescale <= 1:
        raise ValueError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    args.guidance_interval = argparsing.check_interval("--guidance-interval", args.guidance_interval)
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise ValueError(f"--strength must be in [0, 1], got {args.strength}")
    if args.classifier is None and (args.classifier_label is not None or args.classifier_scale is not None):
        raise ValueError("--classifier-label and --classifier-scale need --classifier, the classifier folder")
    if args.classifier is not None:
        if not (Path(args.classifier) / "config.json").is_file():
            raise ValueError(f"--classifier must be a classifier folder (training/train_classifier.py writes "
                             f"RUN/classifier), got {args.classifier!r}: no config.json there")
        classes = json.loads((Path(args.classifier) / "config.json").read_text()).get("classes", [])
        if args.classifier_label is None:
            raise ValueError(f"--classifier needs --classifier-label, the class to steer toward: one of {classes}")
        if args.classifier_label not in classes and not (args.classifier_label.isdigit()
                                                         and int(args.classifier_label) < len(classes)):
            raise ValueError(f"--classifier-label must be one of the classifier's classes {classes} (or an index), "
                             f"got {args.classifier_label!r}")
        if args.classifier_scale is None:
            args.classifier_scale = 1.0
        if not (math.isfinite(args.classifier_scale) and args.classifier_scale >= 0):
            raise ValueError(f"--classifier-scale must be a finite number ≥ 0, got {args.classifier_scale}")
    if args.seed + args.num_images - 1 > argparsing.MAX_SEED:
        raise ValueError(f"--seed + --num-images − 1 must be at most 2**64 − 1, got {args.seed + args.num_images - 1}")


def generate(args) -> list[Path]:
    """The images of the prompt, each with its own seed (seed + k) and its parameters in its PNG; with several,
    OUT-k.png each and the grid in OUT. Returns the paths written.

    Text to image with the model's own sampler runs from the model's runtime bundle (`latentdiff.runtime`: no torch,
    about a second to start) once that is built; everything else, and the first call of a model, runs the torch
    pipeline, after which the bundle is built in the background for the next call."""
    from .images import image_grid, save_image

    generation_args(args)
    out = Path(args.out)
    check_image_out(out)
    check_generate_bounds(args)
    seeds = [args.seed + k for k in range(args.num_images)]
    runtime = _runtime(args)
    if runtime is not None:
        from PIL import Image

        argparsing.check_guidance_options_apply(args.guidance_rescale, runtime.uses_few_step(args.steps), args.steps,
                                         args.guidance_interval)
        images = [Image.fromarray(a) for a in runtime(args.prompt, seeds, args.steps, args.guidance_scale,
                                                      args.negative_prompt, args.height, args.width,
                                                      args.guidance_rescale, args.guidance_interval)]
        few_step = runtime.uses_few_step(args.steps)
        sampler = "LCMScheduler" if few_step else "DPMSolverMultistepScheduler"
        strength = None
    else:
        images, sampler, few_step, strength = _generate_with_torch(args, seeds)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = {"prompt": args.prompt, "negative_prompt": args.negative_prompt, "steps": args.steps,
              "guidance_scale": args.guidance_scale,
              **({"guidance_rescale": args.guidance_rescale} if args.guidance_rescale else {}),
              **({"guidance_interval": list(args.guidance_interval)} if args.guidance_interval != (0.0, 1.0) else {}),
              "height": images[0].height, "width": images[0].width,
              "scheduler": sampler, "scheduler_choice": args.scheduler, **({"few_step": True} if few_step else {}),
              "model": args.model or "emoji", "version": f"latentdiff {__version__}"}
    if args.init_image is not None:  # where the image came from (paths as given), for --from-png
        params.update(init_image=args.init_image, mask=args.mask, strength=strength)
    if args.classifier is not None:
        params.update(classifier=args.classifier, classifier_label=args.classifier_label,
                      classifier_scale=args.classifier_scale)
    per_image = [{**params, "seed": s, "num_images": len(images), "index": k} for k, s in enumerate(seeds)]
    if args.pick is not None:  # --from-png of one image of a batch
        images, per_image = [images[args.pick]], [per_image[args.pick]]
    if len(images) == 1:
        save_image(images[0], out, per_image[0])
        return [out]
    paths = [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(images))]
    for path, image, image_params in zip(paths, images, per_image):
        save_image(image, path, image_params)
    save_image(image_grid(images), out)
    return [*paths, out]


def _generate_with_torch(args, seeds: list[int]) -> tuple[list, str, bool, float | None]:
    """(images, the sampler's class name, whether the few-step weights sampled, img2img's strength)."""
    quiet_libraries()
    import torch

    from PIL import Image

    from .pipelines.image_to_image import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline
    from .pipelines.text_to_image import LatentDiffusionPipeline
    from .schedulers import scheduler_from_name

    extra = {}
    if args.init_image is not None:
        extra = {"image": Image.open(args.init_image).convert("RGB"), "strength": args.strength}
    if args.mask is not None:
        extra["mask_image"] = Image.open(args.mask)
    if args.classifier is not None:
        classes = json.loads((Path(args.classifier) / "config.json").read_text())["classes"]
        label = args.classifier_label if args.classifier_label in classes else int(args.classifier_label)
        extra.update(classifier=args.classifier, classifier_label=label, classifier_scale=args.classifier_scale)
    pipeline_class = (LatentDiffusionInpaintPipeline if args.mask else LatentDiffusionImg2ImgPipeline
                      if args.init_image else LatentDiffusionPipeline)
    pipe = pipeline_class.from_pretrained(args.model)
    if args.scheduler:  # a sampler chosen for the model itself: its few-step weights stay unused
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
        pipe.use_few_step = False
    few_step = pipe.few_step_for(args.steps) is not None
    argparsing.check_guidance_options_apply(args.guidance_rescale, few_step, args.steps, args.guidance_interval)
    images = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                  guidance_rescale=args.guidance_rescale, guidance_interval=args.guidance_interval,
                  negative_prompt=args.negative_prompt,
                  num_images_per_prompt=args.num_images,
                  height=args.height, width=args.width,
                  generator=[torch.Generator().manual_seed(s) for s in seeds], **extra).images
    if _runtime_wanted(args):
        _build_runtime_in_background(args.model)
    strength = None
    if args.init_image is not None:
        strength = args.strength if args.strength is not None else pipe.default_strength
    return images, "LCMScheduler" if few_step else type(pipe.scheduler).__name__, few_step, strength


def _runtime_wanted(args) -> bool:
    """Whether this call is one the torch-free runtime makes (text to image, the model's own sampler, OpenVINO on)."""
    import importlib.util
    import os

    return (args.init_image is None and args.mask is None and args.scheduler is None and args.classifier is None
            and os.environ.get("LATENTDIFF_BACKEND", "openvino") == "openvino"
            and importlib.util.find_spec("openvino") is not None)


def _runtime(args):
    """The model's runtime (`latentdiff.runtime`) when it is built and makes this call, else None."""
    if not _runtime_wanted(args):
        return None
    from .model_folder import resolve_model_dir
    from .runtime import bundle_dir
    from .runtime.generate import Runtime

    folder = bundle_dir(resolve_model_dir(args.model))
    if not (folder / "bundle.json").is_file():
        return None
    runtime = Runtime(folder)
    return runtime if runtime.supports(args.steps, args.height or 0, args.width or 0) else None


def _build_runtime_in_background(model) -> None:
    """Start building the model's runtime in a detached process (unless it is built, being built, or the model is
    one the runtime cannot run), so that the next `generate` starts without torch."""
    import subprocess

    from .model_folder import resolve_model_dir
    from .runtime import bundle_dir

    folder = bundle_dir(resolve_model_dir(model))
    marks = [folder / "bundle.json", folder.with_name(folder.name + ".lock"),
             folder.with_name(folder.name + ".unsupported")]
    if any(p.exists() for p in marks):
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".log"), "w") as log:
        subprocess.Popen([sys.executable, "-m", "latentdiff.runtime.bundle", str(resolve_model_dir(model))],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"building this model's runtime in the background ({folder}): the next `latentdiff generate` of it "
          "starts without torch", file=sys.stderr)


MAX_IMAGES = 64  # --num-images: the images of one command are one batch


def check_generate_bounds(args) -> None:
    """--steps, --height, --width and --num-images against the model's configs, before any weights load."""
    import json

    from .model_folder import resolve_model_dir, vae_scale_factor
    from .pipelines import MAX_SIZE_FACTOR

    if args.num_images > MAX_IMAGES:
        raise ValueError(f"--num-images must be at most {MAX_IMAGES} (one batch), got {args.num_images}")
    root = resolve_model_dir(args.model)
    try:
        train_steps = json.loads((root / "scheduler" / "scheduler_config.json").read_text())["num_train_timesteps"]
        size = json.loads((root / "unet" / "config.json").read_text())["sample_size"]
        factor = vae_scale_factor(json.loads((root / "vae" / "config.json").read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return  # loading the model names what is wrong with it
    if args.steps > train_steps:
        raise ValueError(f"--steps must be at most {train_steps} (the model's training timesteps), got {args.steps}")
    native = dict(zip(("height", "width"), (size, size) if isinstance(size, int) else size))
    for name in ("height", "width"):
        value, limit = getattr(args, name), MAX_SIZE_FACTOR * native[name] * factor
        if value is not None and (value % factor or value > limit):
            raise ValueError(f"--{name} must be a multiple of {factor} and at most {limit} ({MAX_SIZE_FACTOR} × the "
                             f"model's native {native[name] * factor} px), got {value}")


def check_image_out(out: Path) -> None:
    """Refuse an --out that cannot take an image before any work is done."""
    from PIL import Image

    if out.is_dir():
        raise ValueError(f"--out must be an image file, got the folder {str(out)!r}")
    extensions = Image.registered_extensions()
    if extensions.get(out.suffix.lower()) not in Image.SAVE:
        writable = sorted(e for e, f in extensions.items() if f in ("PNG", "JPEG", "WEBP"))
        raise ValueError(f"--out must end in an image extension PIL can write, e.g. {', '.join(writable)}; got "
                         f"{str(out)!r}")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"--out {str(out)!r} lies under {str(parent)!r}, which is a file")
            break


def export_model(args) -> tuple[Path, int]:
    """The model folder again, weights cast to --dtype (safetensors, shards ≤ 15 MB), with its provenance files.
    Every component loads back as float32 by default, in latentdiff and in diffusers' StableDiffusionPipeline."""
    import json
    import shutil

    import torch

    from .model_folder import resolve_model_dir
    from .pipelines.text_to_image import LatentDiffusionPipeline

    source, out = resolve_model_dir(args.model), Path(args.out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out must differ from the model folder, got {args.out!r} for both")
    _check_model_out(args.out, args.overwrite)
    pipe = LatentDiffusionPipeline.from_pretrained(source)
    if args.scheduler:
        from .schedulers import scheduler_from_name

        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    if args.no_clip:
        pipe.clip = None
    pipe.to(dtype=argparsing.torch_dtype(args.dtype))
    for component in ("unet", "vae", "text_encoder", "clip"):
        module = getattr(pipe, component)
        for name, tensor in (module.state_dict().items() if module is not None else ()):
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"--dtype {args.dtype} cannot hold {component}.{name}: it overflows (max |x| = "
                                 f"{tensor.float().abs().max():.3g} before the cast); use a wider --dtype")
    pipe.save_pretrained(out)
    for folder in ("text_encoder", "clip"):  # transformers loads a model in the dtype its config names
        config = out / folder / "config.json"
        if config.is_file():
            config.write_text(json.dumps({**json.loads(config.read_text()), "dtype": "float32"}, indent=2) + "\n")
    for name in PROVENANCE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
        elif (out / name).is_file():
            (out / name).unlink()  # a stale record of another model
    size = sum(f.stat().st_size for f in out.rglob("*.safetensors"))
    return out, size


def _check_model_out(out: str, overwrite: bool) -> None:
    """A model is written into a new or empty folder; over anything else only with --overwrite."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out must be a folder, got the file {out!r}")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        what = "a model" if (path / "model_index.json").is_file() else "files"
        raise ValueError(f"--out {out!r} already holds {what}; pass --overwrite to replace the model in it "
                         "(component folders and model_index.json are replaced, other files are kept)")


def new_model(args) -> Path:
    from .models import new_pipeline

    _check_model_out(args.out, args.overwrite)
    new_pipeline(args.preset, seed=args.seed).save_pretrained(args.out)
    return Path(args.out)


def main(argv: list[str] | None = None) -> int:
    """Run one command; an error is one line on stderr naming what was wrong (exit 2; 3: a recipe gate missed;
    130: interrupted), with the traceback only under --debug."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    return argparsing.run_guarded(f"latentdiff {command}".strip(), _run, argv)


def _run(argv: list[str]) -> None:
    if argv[:1] == ["eval"]:  # its flags belong to latentdiff.evaluation.job, which training/evaluate.py runs too
        from .evaluation.job import main as eval_main

        quiet_libraries()
        report = eval_main(argv[1:], prog="latentdiff eval")
        if report is not None:
            print(f"wrote report.json, report.csv, sweep.png and grids to {report['out']}")
        return
    args = build_parser().parse_args(argv)
    if args.command != "generate":  # generate quiets them only if it loads them (the runtime needs none)
        quiet_libraries()
    if args.command == "generate":
        paths = generate(args)
        print(f"wrote {paths[-1]}" + (f" and {len(paths) - 1} images beside it" if len(paths) > 1 else ""))
    elif args.command == "info":
        from .images import parameters_text, read_parameters

        print(parameters_text(read_parameters(args.image)))
    elif args.command == "run-recipe":
        from .training.recipes import run_recipe

        records = run_recipe(args.recipe, args.out, args.stages.split(",") if args.stages else None,
                             time_limit=args.time_limit)
        print(f"finished {', '.join(records)}; the model is in {Path(args.out) / 'model'}")
    elif args.command == "data":
        print(make_data(args))
    elif args.command == "export":
        out, size = export_model(args)
        print(f"wrote {out} ({size / 2**20:.1f} MiB of {args.dtype} weights)")
    elif args.command == "compile":
        from .runtime.bundle import build

        print(f"wrote {build(args.model)}")
    elif args.command == "new-model":
        print(f"wrote an untrained model to {new_model(args)}")
    elif args.command == "serve":
        from .serve import serve

        serve(args.model, args.host, args.port, args.allow_remote, args.token, args.queue_size, args.max_upload_mb)


def quiet_libraries() -> None:
    """What a CLI user should not see: the libraries' per-file loading bars ("Loading weights", "Loading
    checkpoint shards") and datasets' notices and warnings about local folders ("Downloading data"). diffusers'
    and transformers' warnings still show, and so do latentdiff's own progress bars (sampling, evaluation).
    `datasets` is told through its environment variables, read when it is imported: a command that reads no data
    set (`generate`) does not import it (half a second)."""
    import os

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    if "datasets" in sys.modules:
        datasets = sys.modules["datasets"]
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    else:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")


if __name__ == "__main__":
    sys.exit(main())
