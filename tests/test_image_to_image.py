"""img2img and inpainting: the same images as diffusers' StableDiffusionImg2ImgPipeline and (4-channel U-Net)
StableDiffusionInpaintPipeline on the same folder and inputs, what strength and the mask mean, and the CLI."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
from PIL import Image

from conftest import seeded
from latentdiff import LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline, LatentDiffusionPipeline
from latentdiff.schedulers import scheduler_from_name


@pytest.fixture(scope="module")
def picture():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def mask():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    return mask


def _pair(tiny_dir, ours_cls, theirs_cls, scheduler):
    ours = ours_cls.from_pretrained(tiny_dir)
    if scheduler:
        ours.scheduler = scheduler_from_name(scheduler, ours.scheduler.config)
    theirs = theirs_cls.from_pretrained(tiny_dir, safety_checker=None, requires_safety_checker=False)
    theirs.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    return ours, theirs


@pytest.mark.parametrize("scheduler", [None, "ddim", "ddpm"])  # the shipped DPM-Solver++, and an ancestral sampler
def test_img2img_gives_diffusers_image(tiny_dir, picture, scheduler):
    ours, theirs = _pair(tiny_dir, LatentDiffusionImg2ImgPipeline, StableDiffusionImg2ImgPipeline, scheduler)
    kw = dict(image=picture, strength=0.6, num_inference_steps=5, output_type="np", negative_prompt="blurry")
    a = ours("a tiger", generator=seeded(), **kw).images
    b = theirs("a tiger", generator=seeded(), **kw).images
    assert np.abs(a - b).max() <= 1 / 255
    assert ours.num_timesteps == 3  # 60 % of 5 steps


@pytest.mark.parametrize("scheduler,strength", [(None, 1.0), ("ddim", 0.7), ("ddpm", 1.0), ("ddpm", 0.5)])
def test_inpainting_gives_diffusers_image(tiny_dir, picture, mask, scheduler, strength):
    ours, theirs = _pair(tiny_dir, LatentDiffusionInpaintPipeline, StableDiffusionInpaintPipeline, scheduler)
    kw = dict(image=picture, mask_image=mask, strength=strength, num_inference_steps=5, output_type="np")
    a = ours("a tiger", generator=seeded(), **kw).images
    b = theirs("a tiger", generator=seeded(), **kw).images
    assert np.abs(a - b).max() <= 1 / 255


def test_inpainting_keeps_the_unmasked_latents(tiny_pipe, picture, mask):
    pipe = LatentDiffusionInpaintPipeline.from_pipe(tiny_pipe)
    latents = pipe("a tiger", image=picture, mask_image=mask, num_inference_steps=4, generator=seeded(),
                   output_type="latent").images
    pixels = LatentDiffusionImg2ImgPipeline.preprocess(pipe, picture, None, None)
    known = pipe.encode_vae_image(pixels, seeded())  # the image's latents, drawn first from the same seed
    pipe2 = LatentDiffusionInpaintPipeline.from_pipe(tiny_pipe)
    state_mask = pipe2.mask_processor.preprocess(mask, height=32, width=32)
    small = torch.nn.functional.interpolate(state_mask, size=latents.shape[-2:])[0, 0] == 0
    torch.testing.assert_close(latents[0][:, small], known[0][:, small], atol=1e-5, rtol=0)
    assert not torch.allclose(latents[0][:, ~small], known[0][:, ~small], atol=1e-3)


def test_strength_zero_returns_the_image_strength_one_ignores_it(tiny_pipe, picture):
    pipe = LatentDiffusionImg2ImgPipeline.from_pipe(tiny_pipe)
    with pytest.raises(ValueError, match="leaves no step to run"):
        pipe("a", image=picture, strength=0.0, num_inference_steps=4)
    full = pipe("a", image=picture, strength=1.0, num_inference_steps=4, generator=seeded(), output_type="np").images
    other = pipe("a", image=Image.new("RGB", (32, 32)), strength=1.0, num_inference_steps=4, generator=seeded(),
                 output_type="np").images
    assert np.abs(full - other).max() < 0.05  # at t = T the image has next to no weight left (ᾱ_T ≈ 0.005)
    assert pipe("a", image=picture, num_inference_steps=4, output_type="np").images.shape == (1, 32, 32, 3)


@pytest.mark.parametrize("kwargs,message", [
    ({"strength": 1.5}, r"strength must be in \[0, 1\]"),
    ({"image": None}, "needs image="),
])
def test_bad_img2img_arguments_are_named(tiny_pipe, picture, kwargs, message):
    pipe = LatentDiffusionImg2ImgPipeline.from_pipe(tiny_pipe)
    with pytest.raises(ValueError, match=message):
        pipe("a", **{"image": picture, **kwargs})
    with pytest.raises(ValueError, match="needs mask_image="):
        LatentDiffusionInpaintPipeline.from_pipe(tiny_pipe)("a", image=picture)


def test_the_image_pipelines_come_from_the_package_and_from_pipe(tiny_pipe):
    for cls in (LatentDiffusionImg2ImgPipeline, LatentDiffusionInpaintPipeline):
        pipe = cls.from_pipe(tiny_pipe)
        assert isinstance(pipe, LatentDiffusionPipeline) and pipe.unet is tiny_pipe.unet
        assert LatentDiffusionPipeline.from_pipe(pipe).unet is tiny_pipe.unet


def test_cli_img2img_and_inpainting_and_their_pngs(tiny_dir, picture, mask, tmp_path, capsys):
    from latentdiff.cli import main
    from latentdiff.images import read_parameters

    picture.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    common = ["--model", str(tiny_dir), "--steps", "4", "--init-image", str(tmp_path / "in.png")]
    assert main(["generate", "a tiger", *common, "--strength", "0.5", "--out", str(tmp_path / "a.png")]) == 0
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "a.png").text["parameters"]
    assert main(["generate", "a tiger", *common, "--mask", str(tmp_path / "mask.png"),
                 "--out", str(tmp_path / "b.png")]) == 0
    assert read_parameters(tmp_path / "b.png")["strength"] == 1.0
    assert main(["generate", "--from-png", str(tmp_path / "b.png"), "--out", str(tmp_path / "c.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b.png")), np.asarray(Image.open(tmp_path / "c.png")))
    assert main(["generate", "a", "--model", str(tiny_dir), "--mask", str(tmp_path / "mask.png")]) == 2
    assert "--mask needs --init-image" in capsys.readouterr().err
