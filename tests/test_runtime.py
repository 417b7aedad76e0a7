"""The torch-free runtime of `latentdiff generate`: torch's seeded noise in numpy, the numpy samplers against
diffusers' schedulers, a bundle's images against the torch pipeline's, and a CLI call that never imports torch."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from latentdiff.pipelines import few_step
from latentdiff.runtime import bundle, bundle_dir
from latentdiff.runtime.generate import Runtime
from latentdiff.runtime.noise import TorchGenerator

pytest.importorskip("openvino")


@pytest.mark.parametrize("seed", [0, 7, 2**40 + 3])
@pytest.mark.parametrize("shape", [(1, 4, 16, 16), (1, 4, 8, 8), (3, 17)])
def test_the_noise_is_torchs_for_the_same_seed(seed, shape):
    theirs, ours = torch.Generator().manual_seed(seed), TorchGenerator(seed)
    for _ in range(3):  # successive draws continue the same stream
        expected = torch.randn(shape, generator=theirs).numpy()
        np.testing.assert_allclose(ours.randn(shape), expected, rtol=0, atol=1e-6)


@pytest.fixture
def dpm_dir(tiny_dir, tmp_path):
    """The tiny model with DPM-Solver++ (the runtime's sampler) and few-step weights of a random student."""
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    student = few_step.with_guidance_embedding(pipe.unet, 32)
    few_step.add_lora(student, 4)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name or "cond_proj" in name:
                p.normal_(0, 0.05)
    folder = tmp_path / "model"
    pipe.save_pretrained(folder)
    few_step.save(student, folder / few_step.FOLDER, rank=4, original_inference_steps=20, max_steps=4)
    return folder


@pytest.fixture
def runtime_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LATENTDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_bundle_makes_the_torch_pipelines_images(dpm_dir, runtime_env):
    folder = bundle.build(dpm_dir)
    assert folder == bundle_dir(dpm_dir) and bundle.build(dpm_dir) == folder  # built once
    runtime = Runtime(folder)
    pipe = LatentDiffusionPipeline.from_pretrained(dpm_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.use_tracing = False
    for steps, scale, negative, rescale, interval in (
            (5, 7.5, None, 0, (0, 1)), (3, 4.0, "blue", 0, (0, 1)), (2, 1.0, None, 0, (0, 1)),
            (20, 3.0, None, 0, (0, 1)), (5, 7.5, None, 0.7, (0, 1)), (5, 7.5, None, 0, (0.4, 1))):
        ours = runtime("a red circle", [0, 5], steps, scale, negative, guidance_rescale=rescale,
                       guidance_interval=interval)
        theirs = pipe("a red circle", num_inference_steps=steps, guidance_scale=scale, negative_prompt=negative,
                      guidance_rescale=rescale, guidance_interval=interval, num_images_per_prompt=2,
                      generator=[torch.Generator().manual_seed(s) for s in (0, 5)],
                      output_type="np").images
        assert runtime.uses_few_step(steps) == (pipe.few_step_for(steps) is not None)
        difference = np.abs(ours.astype(int) - (theirs * 255).round().astype(int))
        assert difference.max() <= 1, (steps, scale, rescale, difference.max())
        if rescale or interval != (0, 1):  # and they do change the images
            plain = runtime("a red circle", [0, 5], steps, scale, negative)
            assert np.abs(ours.astype(int) - plain.astype(int)).max() > 1
    ids = runtime.tokenize(["a red circle", "word " * 100])
    np.testing.assert_array_equal(ids, pipe.tokenize(["a red circle", "word " * 100]).numpy())


def test_a_scheduler_the_runtime_does_not_reproduce_is_refused_and_remembered(tiny_dir, tmp_path, runtime_env):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    pipe.save_pretrained(tmp_path / "sde")
    with pytest.raises(ValueError, match="runtime's dpm sampler differs"):
        bundle.build(tmp_path / "sde")
    folder = bundle_dir(tmp_path / "sde")
    assert folder.with_name(folder.name + ".unsupported").is_file() and not folder.exists()
    with pytest.raises(ValueError, match="DPM-Solver"):  # the tiny model's own DDIM
        bundle.build(tiny_dir)


def _cli(args, env):
    code = ("import sys; from latentdiff.cli import main; code = main(sys.argv[1:]); "
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH'); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def test_generate_runs_without_torch_once_the_runtime_is_built(dpm_dir, runtime_env, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "LATENTDIFF_BACKEND"}
    env["LATENTDIFF_CACHE"] = str(runtime_env)
    common = ["generate", "a red circle", "--model", str(dpm_dir), "--num-images", "2", "--seed", "3"]
    first = _cli([*common, "--out", str(tmp_path / "first.png")], env)
    assert first.stdout.splitlines()[-1] == "TORCH" and "building this model's runtime in the background" in first.stderr
    folder = bundle_dir(dpm_dir)
    deadline = time.time() + 240
    while not (folder / "bundle.json").is_file() and time.time() < deadline:  # the background build
        time.sleep(1)
    assert (folder / "bundle.json").is_file(), (folder.parent / (folder.name + ".log")).read_text()
    second = _cli([*common, "--out", str(tmp_path / "second.png")], env)
    assert second.stdout.splitlines()[-1] == "NO TORCH" and "building" not in second.stderr
    for k in (0, 1):
        a, b = (Image.open(tmp_path / f"{name}-{k}.png") for name in ("first", "second"))
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 1
        assert a.text == b.text  # the same parameters
    few = _cli([*common, "--steps", "4", "--out", str(tmp_path / "few.png")], env)
    assert few.stdout.splitlines()[-1] == "NO TORCH"
    assert json.loads(Image.open(tmp_path / "few-0.png").text["latentdiff"])["scheduler"] == "LCMScheduler"
    # what the runtime does not make runs in torch: another sampler
    other = _cli([*common, "--scheduler", "ddim", "--out", str(tmp_path / "ddim.png")], env)
    assert other.stdout.splitlines()[-1] == "TORCH"


def test_one_runtime_serves_a_few_step_call_then_a_guided_one_of_the_same_batch(dpm_dir, runtime_env):
    """The text encoder meets [1, 77] ids first alone (few steps: no unconditional text), then as one half of a
    guided pair; each needs its own compiled requests (this order once raised an IndexError in the benchmark)."""
    runtime = Runtime(bundle.build(dpm_dir))
    pipe = LatentDiffusionPipeline.from_pretrained(dpm_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.use_tracing = False
    for steps in (2, 5):
        ours = runtime("a red circle", [3], steps, 7.5)
        theirs = pipe("a red circle", num_inference_steps=steps, guidance_scale=7.5, output_type="np",
                      generator=torch.Generator().manual_seed(3)).images
        assert np.abs(ours.astype(int) - (theirs * 255).round().astype(int)).max() <= 1, steps
