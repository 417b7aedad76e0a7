"""Build a model's runtime bundle (see the package docstring), with torch: `python -m latentdiff.runtime.bundle MODEL`
or `latentdiff compile --model MODEL`.

    KEY/bundle.json         what the runtime needs besides the networks (sizes, scaling, token ids, schedules)
    KEY/tokenizer.json      the model's tokenizer (the `tokenizers` library reads it)
    KEY/text_encoder.xml    ids (B, L) → last hidden states (B, L, D)
    KEY/unet.xml            (x (B, C, h, w), t, text (B, L, D)) → ε̂
    KEY/student.xml         the few-step student, with the guidance embedding (B, dim) as a fourth input
    KEY/decoder.xml         z / scaling (B, C, h, w) → image in [−1, 1]

Batch and size are free in the IR (the runtime fixes them before compiling). The bundle is written to a staging
folder and renamed into place, so a reader never sees half of one; a lock file keeps two builders apart.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import MAX_STEPS, bundle_dir
from .samplers import LCM, DPMSolverPP

LOCK_STALE_SECONDS = 600
MAX_BUNDLES = 8


def build(model_dir: str | Path) -> Path:
    """The bundle of the model folder (built unless it is there); returns its folder."""
    from ..model_folder import resolve_model_dir

    root = resolve_model_dir(model_dir)
    target = bundle_dir(root)
    if (target / "bundle.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".lock")
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        if time.time() - lock.stat().st_mtime < LOCK_STALE_SECONDS:
            raise RuntimeError(f"another process is building {target} (lock {lock})") from None
        lock.unlink(missing_ok=True)  # left by a builder that died
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        try:
            _write(root, staging)
        except ValueError as error:  # a model the runtime cannot run: recorded, so nobody tries again
            target.with_name(target.name + ".unsupported").write_text(f"{error}\n")
            raise
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.unlink(missing_ok=True)
    kept = sorted((p for p in target.parent.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: p.stat().st_mtime, reverse=True)
    for old in kept[MAX_BUNDLES:]:  # the least recently built go (the shipped model's is about 60 MB)
        shutil.rmtree(old, ignore_errors=True)
    return target


def _write(root: Path, out: Path) -> None:
    import openvino as ov
    from diffusers import DPMSolverMultistepScheduler

    from ..pipelines.text_to_image import (LatentDiffusionPipeline, _guided_unet_forward, _text_encode, _unet_forward,
                                           _vae_decode)

    pipe = LatentDiffusionPipeline.from_pretrained(root, torch_dtype=torch.float32)
    if not isinstance(pipe.scheduler, DPMSolverMultistepScheduler):
        raise ValueError(f"the runtime samples with DPM-Solver++ only; {root} uses {type(pipe.scheduler).__name__}")
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    length, width = tokenizer.model_max_length, text_encoder.config.hidden_size
    channels, size = unet.config.in_channels, unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else size
    ids = torch.zeros(2, length, dtype=torch.long)
    x, t = torch.zeros(2, channels, h, w), torch.tensor(999)
    text = torch.zeros(2, length, width)
    free = [-1, channels, -1, -1]
    _convert(ov, text_encoder, _text_encode, (ids,), [[-1, length]], out / "text_encoder.xml")
    _convert(ov, unet, _unet_forward, (x, t, text), [free, [], [-1, length, width]], out / "unet.xml")
    _convert(ov, vae, _vae_decode, (x[:1],), [free], out / "decoder.xml")
    few_step = pipe.few_step
    if few_step is not None:
        student = few_step.unet(unet)
        dim = student.config.time_cond_proj_dim
        _convert(ov, student, _guided_unet_forward, (x, t, text, torch.zeros(2, dim)),
                 [free, [], [-1, length, width], [-1, dim]], out / "student.xml")
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))

    scheduler = pipe.scheduler
    dpm = {str(n): _schedule(scheduler, n) for n in range(1, MAX_STEPS + 1)}
    config = {
        "model": str(root),
        "context": length, "bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "pad": tokenizer.pad_token_id,
        "latent_channels": channels, "sample_size": [h, w], "vae_scale_factor": pipe.vae_scale_factor,
        "scaling_factor": vae.config.scaling_factor,
        "dpm": {"config": {k: scheduler.config[k] for k in ("solver_order", "lower_order_final", "euler_at_final",
                                                           "final_sigmas_type")},
                "init_noise_sigma": float(scheduler.init_noise_sigma), "schedules": dpm},
    }
    if few_step is not None:
        lcm = few_step.scheduler(scheduler.config)
        config["lcm"] = {"max_steps": few_step.max_steps, "dim": dim,
                         "alphas_cumprod": lcm.alphas_cumprod.tolist(),
                         "final_alpha_cumprod": float(lcm.final_alpha_cumprod),
                         "timestep_scaling": lcm.config.timestep_scaling,
                         "timesteps": {str(n): _schedule(lcm, n)["timesteps"]
                                       for n in range(1, few_step.max_steps + 1)}}
    check_samplers(config, pipe)
    (out / "bundle.json").write_text(json.dumps(config) + "\n")


def _convert(ov, module, fn, example, shapes, path: Path) -> None:
    from ..pipelines.recording import Forward

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings: branches fixed by the example's shapes
        trace = torch.jit.trace(Forward(module.eval(), fn), example, check_trace=False)
        model = ov.convert_model(trace, example_input=example, input=shapes)
    ov.save_model(model, path, compress_to_fp16=False)


def _schedule(scheduler, steps: int) -> dict:
    scheduler.set_timesteps(steps)
    schedule = {"timesteps": [int(t) for t in scheduler.timesteps]}
    if getattr(scheduler, "sigmas", None) is not None:
        schedule["sigmas"] = [float(s) for s in scheduler.sigmas]
    return schedule


def check_samplers(config: dict, pipe) -> None:
    """The numpy samplers against the pipeline's own schedulers on random model outputs (1, 2, 4, 8 and 25 steps):
    a configuration they do not reproduce is refused here, not sampled wrongly later."""
    import copy

    from .noise import TorchGenerator

    rng = np.random.default_rng(0)
    shape = (2, config["latent_channels"], 8, 8)
    cases = [("dpm", pipe.scheduler, n) for n in (1, 2, 4, 8, 25)]
    if "lcm" in config:
        lcm = pipe.few_step.scheduler(pipe.scheduler.config)
        cases += [("lcm", lcm, n) for n in range(1, config["lcm"]["max_steps"] + 1)]
    for kind, scheduler, steps in cases:
        theirs = copy.deepcopy(scheduler)
        theirs.set_timesteps(steps)
        if kind == "dpm":
            schedule = config["dpm"]["schedules"][str(steps)]
            ours = DPMSolverPP(schedule["timesteps"], schedule["sigmas"], config["dpm"]["config"])
        else:
            lc = config["lcm"]
            ours = LCM(lc["timesteps"][str(steps)], lc["alphas_cumprod"], lc["final_alpha_cumprod"],
                       lc["timestep_scaling"])
        sample = rng.standard_normal(shape).astype(np.float32)
        expected = torch.from_numpy(sample.copy())
        generators = [torch.Generator().manual_seed(s) for s in (3, 4)]
        numpy_generators = [TorchGenerator(s) for s in (3, 4)]
        for t in theirs.timesteps:
            eps = rng.standard_normal(shape).astype(np.float32)
            expected = theirs.step(torch.from_numpy(eps), t, expected, generator=generators, return_dict=False)[0]
            sample = ours.step(eps, sample) if kind == "dpm" else ours.step(eps, sample, numpy_generators)
        error = float(np.abs(sample - expected.numpy()).max())
        if not error <= 1e-4 * max(1.0, float(np.abs(expected.numpy()).max())):
            raise ValueError(f"the runtime's {kind} sampler differs from {type(scheduler).__name__} at {steps} "
                             f"steps by {error:.3g}: this model's scheduler configuration is not supported")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m latentdiff.runtime.bundle", description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="model folder or shipped model name (default: emoji)")
    args = parser.parse_args(argv)
    try:
        print(build(args.model))
    except Exception as error:  # the background build after a `generate`: recorded, so later calls do not retry it
        from ..model_folder import resolve_model_dir

        folder = bundle_dir(resolve_model_dir(args.model))
        marker = folder.with_name(folder.name + ".unsupported")
        if not marker.exists() and not isinstance(error, RuntimeError):  # RuntimeError: another builder is at it
            marker.write_text(f"{type(error).__name__}: {error}\n")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
