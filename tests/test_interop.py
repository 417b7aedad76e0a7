"""Model folders move between LatentDiffusionPipeline and diffusers' StableDiffusionPipeline, in both directions,
and give the same image for the same prompt, seed, scheduler and steps (max abs pixel difference ≤ 1/255, fp32)."""

import logging

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from conftest import seeded
from latentdiff import LatentDiffusionPipeline, new_pipeline
from latentdiff.schedulers import scheduler_from_name

PROMPTS = ["a tiger", "a red apple on a blue background"]


def _images(pipe, **kw):
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": 8, "guidance_scale": 7.5, "output_type": "np", **kw}
    return pipe(PROMPTS, generator=seeded(0), **kw).images


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    """The `small` preset at its real size, so the comparison runs over 3 resolutions of U-Net and VAE."""
    path = tmp_path_factory.mktemp("interop") / "small"
    new_pipeline("small", seed=1).save_pretrained(path)
    return path


@pytest.mark.parametrize("scheduler", [None, "ddpm", "dpm++", "EulerDiscreteScheduler"])
def test_our_folder_gives_the_same_images_in_diffusers(small_dir, scheduler, caplog):
    ours = LatentDiffusionPipeline.from_pretrained(small_dir)
    with caplog.at_level(logging.WARNING):
        theirs = StableDiffusionPipeline.from_pretrained(small_dir)
    assert "not expected" not in caplog.text and "safety checker" not in caplog.text.lower()
    if scheduler:
        ours.scheduler = scheduler_from_name(scheduler, ours.scheduler.config)
        theirs.scheduler = getattr(diffusers, type(ours.scheduler).__name__).from_config(theirs.scheduler.config)
    assert type(theirs.scheduler).__module__.startswith("diffusers.")
    a, b = _images(ours), _images(theirs)
    assert a.std() > 0.01, "the untrained model should still draw something other than a flat image"
    assert np.abs(a - b).max() <= 1 / 255


def test_negative_prompt_and_several_images_match_diffusers(small_dir):
    ours, theirs = LatentDiffusionPipeline.from_pretrained(small_dir), StableDiffusionPipeline.from_pretrained(small_dir)
    kw = dict(num_images_per_prompt=2, guidance_scale=4.0)
    a = _images(ours, negative_prompt=["blurry", "dark"], **kw)
    b = _images(theirs, negative_prompt=["blurry", "dark"], **kw)
    assert a.shape == (4, 64, 64, 3) and np.abs(a - b).max() <= 1 / 255


def _diffusers_folder(path, scheduler):
    """A folder written by diffusers' own StableDiffusionPipeline from transformers/diffusers components."""
    template = new_pipeline("tiny", seed=2)
    pipe = StableDiffusionPipeline(vae=template.vae, text_encoder=template.text_encoder, tokenizer=template.tokenizer,
                                   unet=template.unet, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return pipe


@pytest.mark.parametrize("scheduler", [
    diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                            clip_sample=False, set_alpha_to_one=False),
    diffusers.PNDMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                            skip_prk_steps=True),
    diffusers.DDPMScheduler(beta_schedule="linear", prediction_type="v_prediction", clip_sample=False, steps_offset=1),
], ids=["ddim", "pndm", "ddpm-v"])
def test_a_diffusers_folder_gives_the_same_images_in_latentdiff(tmp_path, scheduler):
    theirs = _diffusers_folder(tmp_path / "sd", scheduler)
    ours = LatentDiffusionPipeline.from_pretrained(tmp_path / "sd")
    assert ours.clip is None and type(ours.scheduler).__name__ == type(scheduler).__name__
    a, b = _images(ours), _images(theirs)
    assert a.std() > 0.01 and np.abs(a - b).max() <= 1 / 255


def test_save_and_load_round_trip_is_exact(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "copy")
    again = LatentDiffusionPipeline.from_pretrained(tmp_path / "copy")
    np.testing.assert_array_equal(_images(tiny_pipe), _images(again))
    for name in ("unet", "vae", "text_encoder", "clip"):
        for (k, v), (_, w) in zip(getattr(tiny_pipe, name).state_dict().items(), getattr(again, name).state_dict().items()):
            assert torch.equal(v, w), f"{name}.{k} changed in the round trip"
    assert not list((tmp_path / "copy").rglob("*.bin")), "only safetensors are written"


def test_text_encoder_is_the_clip_text_tower(tiny_pipe):
    ids = tiny_pipe.tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        ours = tiny_pipe.text_encoder(ids).last_hidden_state
        clip = tiny_pipe.clip.text_model(ids).last_hidden_state
    torch.testing.assert_close(ours, clip)


def test_save_replaces_components_and_leaves_other_files_alone(tiny_pipe, tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    tiny_pipe.save_pretrained(target)
    tiny_pipe.clip = None  # a later save without a CLIP must not leave the old, now stale, clip/ behind
    tiny_pipe.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in target.iterdir()) == ["model_index.json", "notes.txt", "scheduler", "text_encoder",
                                                        "tokenizer", "unet", "vae"]
    monkeypatch.chdir(target)
    tiny_pipe.save_pretrained(".")
    assert (target / "notes.txt").exists() and LatentDiffusionPipeline.from_pretrained(".").clip is None


def test_an_interrupted_save_keeps_the_previous_model(tiny_pipe, tmp_path, monkeypatch):
    target = tmp_path / "model"
    tiny_pipe.save_pretrained(target)
    before = _images(LatentDiffusionPipeline.from_pretrained(target))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    with torch.no_grad():
        tiny_pipe.unet.conv_out.weight.add_(1.0)  # a changed model, whose save will be interrupted
    monkeypatch.setattr(tiny_pipe.vae, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        tiny_pipe.save_pretrained(target)
    np.testing.assert_array_equal(_images(LatentDiffusionPipeline.from_pretrained(target)), before)
    assert not [p for p in target.iterdir() if p.name.startswith(".")], "no staging folder is left behind"


def test_save_writes_safetensors_even_when_asked_for_pickles_and_refuses_files(tiny_pipe, tmp_path, caplog):
    tiny_pipe.save_pretrained(tmp_path / "m", safe_serialization=False)
    assert "safe_serialization=False: latentdiff writes safetensors anyway" in caplog.text
    files = [p.name for p in (tmp_path / "m").rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files) and not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="save_directory must be a folder, got the file"):
        tiny_pipe.save_pretrained(tmp_path / "file")


def test_a_tokenizer_folder_in_the_original_clip_layout_loads(tiny_dir, tmp_path):
    """Stable Diffusion 1.x folders carry vocab.json + merges.txt and no tokenizer.json."""
    import json
    import shutil

    folder = tmp_path / "sd1"
    shutil.copytree(tiny_dir, folder)
    tokenizer_dir = folder / "tokenizer"
    backend = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]
    (tokenizer_dir / "vocab.json").write_text(json.dumps(backend["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["merges"]]
    (tokenizer_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (tokenizer_dir / "tokenizer.json").unlink()
    original = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    loaded = LatentDiffusionPipeline.from_pretrained(folder)
    assert loaded.tokenizer(PROMPTS).input_ids == original.tokenizer(PROMPTS).input_ids
    np.testing.assert_array_equal(_images(loaded), _images(original))
