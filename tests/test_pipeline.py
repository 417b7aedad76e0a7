"""LatentDiffusionPipeline: the call options a user relies on, and clear errors for bad input."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from PIL import Image

from conftest import seeded
from latentdiff import LatentDiffusionPipeline, ModelFolderError

STEPS = 4


def test_one_prompt_gives_one_pil_image_of_the_default_size(tiny_pipe):
    out = tiny_pipe("a tiger", guidance_scale=7.5, num_inference_steps=STEPS, generator=seeded())
    assert len(out.images) == 1 and isinstance(out.images[0], Image.Image)
    assert out.images[0].size == (32, 32)  # tiny preset: 16x16 latents, VAE factor 2


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    run = lambda seed: tiny_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(seed), output_type="np").images  # noqa: E731
    assert np.array_equal(run(0), run(0))
    assert not np.allclose(run(0), run(1))


def test_output_types_shapes_and_ranges(tiny_pipe):
    kw = dict(num_inference_steps=STEPS, num_images_per_prompt=2, height=16, width=24)
    np_images = tiny_pipe(["a", "b"], output_type="np", generator=seeded(), **kw).images
    pt_images = tiny_pipe(["a", "b"], output_type="pt", generator=seeded(), **kw).images
    latents = tiny_pipe(["a", "b"], output_type="latent", generator=seeded(), **kw).images
    assert np_images.shape == (4, 16, 24, 3) and pt_images.shape == (4, 3, 16, 24) and latents.shape == (4, 4, 8, 12)
    assert np_images.min() >= 0 and np_images.max() <= 1
    np.testing.assert_allclose(pt_images.permute(0, 2, 3, 1).numpy(), np_images, atol=1e-6)
    pil = tiny_pipe(["a", "b"], output_type="pil", generator=seeded(), **kw).images
    assert len(pil) == 4 and np.array_equal(np.asarray(pil[3]), (np_images[3] * 255).round().astype(np.uint8))


def test_images_per_prompt_stay_grouped_by_prompt(tiny_pipe):
    """Image k of prompt p in a batch is the image a per-image generator list gives at index p·n + k."""
    gens = [seeded(i) for i in range(4)]
    batch = tiny_pipe(["a cat", "a dog"], num_images_per_prompt=2, num_inference_steps=STEPS, generator=gens,
                      output_type="np").images
    alone = tiny_pipe("a dog", num_images_per_prompt=1, num_inference_steps=STEPS, generator=[seeded(3)],
                      output_type="np").images
    np.testing.assert_allclose(batch[3], alone[0], atol=2e-6)


def test_given_latents_replace_the_seed(tiny_pipe):
    latents = torch.randn(1, 4, 16, 16, generator=seeded(5))
    a = tiny_pipe("a", latents=latents, num_inference_steps=STEPS, output_type="np").images
    b = tiny_pipe("a", num_inference_steps=STEPS, generator=seeded(5), output_type="np").images
    np.testing.assert_array_equal(a, b)


def _count_unet_rows(pipe):
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    return rows, hook


@pytest.mark.parametrize("scale,rows_per_step", [(1.0, 1), (0.0, 1), (7.5, 2)])
def test_guidance_runs_one_batched_unet_call_per_step(tiny_pipe, scale, rows_per_step):
    rows, hook = _count_unet_rows(tiny_pipe)
    try:
        tiny_pipe("a tiger", guidance_scale=scale, num_inference_steps=STEPS, generator=seeded())
    finally:
        hook.remove()
    assert rows == [rows_per_step] * STEPS


def test_guidance_scale_one_and_zero_are_the_conditional_and_unconditional_models(tiny_pipe):
    run = lambda **kw: tiny_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="np", **kw).images  # noqa: E731
    np.testing.assert_allclose(run(guidance_scale=1.0), run(guidance_scale=1.0 + 1e-7, ), atol=1e-4)
    np.testing.assert_allclose(run(guidance_scale=0.0), run(guidance_scale=1e-7), atol=1e-4)
    assert not np.allclose(run(guidance_scale=1.0), run(guidance_scale=0.0), atol=1e-4)
    # a negative prompt is the unconditional text: with s = 0 the image is the negative prompt's s = 1 image
    np.testing.assert_allclose(run(guidance_scale=0.0, negative_prompt="a red car"),
                               tiny_pipe("a red car", guidance_scale=1.0, num_inference_steps=STEPS, generator=seeded(),
                                         output_type="np").images, atol=1e-6)


def test_a_guidance_interval_guides_only_its_steps(tiny_pipe):
    """guidance_interval=(0, 0.5) over 4 steps guides steps 0 and 1 (int(start·N) ≤ i < int(stop·N), diffusers'
    guiders' count) and samples with ε_c after: the image a step callback gives by setting s = 1 after step 1."""
    run = lambda **kw: tiny_pipe("a tiger", num_inference_steps=4, generator=seeded(), output_type="np", **kw).images  # noqa: E731

    def scale_one_after_step_1(pipe, i, t, tensors):
        if i == 1:
            pipe._guidance_scale = 1.0
        return tensors

    halved = run(guidance_interval=(0.0, 0.5))
    np.testing.assert_allclose(halved, run(callback_on_step_end=scale_one_after_step_1), atol=1e-5)
    np.testing.assert_array_equal(run(guidance_interval=(0, 1)), run())
    for other in (run(), run(guidance_scale=1.0), run(guidance_interval=(0.5, 1.0))):
        assert np.abs(halved - other).max() > 1e-3


@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, EulerDiscreteScheduler])
def test_any_diffusers_scheduler_drops_in(tiny_pipe, scheduler_cls):
    tiny_pipe.scheduler = scheduler_cls.from_config(tiny_pipe.scheduler.config)
    images = tiny_pipe("a tiger", num_inference_steps=STEPS, generator=seeded(), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_progress_bar_can_be_turned_off(tiny_pipe, capsys):
    tiny_pipe.set_progress_bar_config(disable=False)
    tiny_pipe("a", num_inference_steps=STEPS)
    assert f"{STEPS}/{STEPS}" in capsys.readouterr().err
    tiny_pipe.set_progress_bar_config(disable=True)
    tiny_pipe("a", num_inference_steps=STEPS)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("prompt", ["", "🐯🍎 a tiger", "東京の虎", "Ünïcödé façade — ½", "   "])
def test_unusual_prompts_work(tiny_pipe, prompt):
    images = tiny_pipe([prompt, "a tiger"], num_inference_steps=2, output_type="np").images
    assert np.isfinite(images).all()


def test_long_prompt_is_truncated_with_a_warning_keeping_end_of_text(tiny_pipe, caplog):
    long_prompt = " ".join(["tiger"] * 100)
    fed = []
    hook = tiny_pipe.text_encoder.register_forward_pre_hook(lambda m, args: fed.append(args[0]))
    try:
        with caplog.at_level("WARNING", logger="latentdiff"):
            tiny_pipe([long_prompt, "a cat"], num_inference_steps=2)
    finally:
        hook.remove()
    assert "1 prompt(s) are longer than the text encoder's context of 16 tokens" in caplog.text
    ids = fed[0]  # what the text encoder really received: ["", ""] unconditional rows, then the prompts
    tok = tiny_pipe.tokenizer
    assert ids.shape == (4, 16) and ids[2, -1] == tok.eos_token_id and (ids[2, 1:-1] == ids[2, 1]).all()
    # the same ids as the tokenizer's own truncation and padding, for long and short prompts alike
    expected = tok(["", "", long_prompt, "a cat"], padding="max_length", max_length=16, truncation=True).input_ids
    assert ids.tolist() == expected


BAD_CALLS = [
    (dict(prompt=3), TypeError, "prompt must be a str or a non-empty list of str, got int"),
    (dict(prompt=["a", None]), TypeError, "prompt must be .* got NoneType"),
    (dict(prompt=[]), ValueError, "prompt must be .* got an empty list"),
    (dict(height=31), ValueError, r"height must be a positive multiple of 2 \(the VAE's downsampling factor\), got 31"),
    (dict(width=0), ValueError, "width must be a positive multiple of 2.*got 0"),
    (dict(width=16.0), ValueError, "width must be .* got 16.0"),
    (dict(num_inference_steps=0), ValueError, "num_inference_steps must be an integer ≥ 1, got 0"),
    (dict(num_inference_steps=2000), ValueError, r"num_inference_steps must be at most 1000"),
    (dict(guidance_scale=math.nan), ValueError, "guidance_scale must be a finite number ≥ 0, got nan"),
    (dict(guidance_scale=math.inf), ValueError, "guidance_scale must be a finite number ≥ 0, got inf"),
    (dict(guidance_scale=-1.0), ValueError, "guidance_scale must be a finite number ≥ 0, got -1.0"),
    (dict(guidance_rescale=2.0), ValueError, r"guidance_rescale must be in \[0, 1\], got 2.0"),
    (dict(guidance_interval=(0.5, 0.5)), ValueError,
     r"guidance_interval must be \(start, stop\) with 0 ≤ start < stop ≤ 1, got \(0.5, 0.5\)"),
    (dict(guidance_interval=0.3), ValueError, r"guidance_interval must be \(start, stop\).*got 0.3"),
    (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), ValueError,
     r"negative_prompt must be one string or one per prompt \(2\), got 3"),
    (dict(generator=[torch.Generator()] * 3), ValueError,
     r"generator list must have one generator per image \(1 prompts × 1 images = 1\), got 3"),
    (dict(output_type="jpeg"), ValueError, r"output_type must be one of \('pil', 'np', 'pt', 'latent'\), got 'jpeg'"),
    (dict(num_images_per_prompt=0), ValueError, "num_images_per_prompt must be an integer ≥ 1, got 0"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, r"latents must have shape \(1, 4, 16, 16\).*got \(1, 4, 8, 8\)"),
    (dict(eta=1.5), ValueError, r"eta must be in \[0, 1\].*got 1.5"),
    (dict(eta="0.5"), ValueError, r"eta must be in \[0, 1\].*got '0.5'"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_CALLS, ids=[m[:40] for _, _, m in BAD_CALLS])
def test_bad_arguments_are_named(tiny_pipe, kwargs, error, message):
    kwargs = {"prompt": "a tiger", "num_inference_steps": 2, **kwargs}
    with pytest.raises(error, match=message):
        tiny_pipe(**kwargs)


def test_numpy_integers_are_integers(tiny_pipe):
    images = tiny_pipe("a", num_inference_steps=np.int64(2), height=np.int32(16), output_type="np").images
    assert images.shape == (1, 16, 32, 3)


def test_bfloat16_pipeline_gives_finite_images_close_to_float32(tiny_dir):
    fp32 = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    bf16 = LatentDiffusionPipeline.from_pretrained(tiny_dir, torch_dtype=torch.bfloat16)
    assert bf16.unet.dtype == torch.bfloat16 and bf16.text_encoder.dtype == torch.bfloat16
    for pipe in (fp32, bf16):
        pipe.set_progress_bar_config(disable=True)
    for scheduler in ("ddim", "ddpm"):
        from latentdiff.schedulers import scheduler_from_name

        for pipe in (fp32, bf16):
            pipe.scheduler = scheduler_from_name(scheduler, pipe.scheduler.config)
        a = fp32("a tiger", num_inference_steps=10, generator=seeded(), output_type="np").images
        b = bf16("a tiger", num_inference_steps=10, generator=seeded(), output_type="np").images
        assert np.isfinite(b).all() and np.abs(a - b).mean() < 0.05


def test_missing_and_incomplete_folders_name_the_file(tiny_dir, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "nothing-here")
    with pytest.raises(ModelFolderError, match="model_index.json is missing"):
        LatentDiffusionPipeline.from_pretrained(tmp_path)
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(ModelFolderError, match="scheduler_config.json is missing"):
        LatentDiffusionPipeline.from_pretrained(broken)
    for f in (broken / "unet").glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(ModelFolderError, match=r"unet has no \*.safetensors weights"):
        LatentDiffusionPipeline.from_pretrained(broken)


def test_saving_some_components_needs_a_folder_that_holds_the_rest(tiny_pipe, tmp_path):
    with pytest.raises(ValueError, match=r"does not hold the rest: \['vae', 'text_encoder', 'tokenizer'\]"):
        tiny_pipe.save_pretrained(tmp_path / "new", components=("unet", "scheduler"))
    with pytest.raises(ValueError, match="components must name some of"):
        tiny_pipe.save_pretrained(tmp_path / "new", components=("unet", "decoder"))
    with pytest.raises(ValueError, match="the scheduler among them"):
        tiny_pipe.save_pretrained(tmp_path / "new", components=("unet",))
    tiny_pipe.save_pretrained(tmp_path / "whole")
    kept = (tmp_path / "whole" / "vae").stat().st_ino
    tiny_pipe.save_pretrained(tmp_path / "whole", components=("unet", "scheduler"))
    assert (tmp_path / "whole" / "vae").stat().st_ino == kept
    LatentDiffusionPipeline.from_pretrained(tmp_path / "whole")


def test_an_interrupted_component_write_keeps_the_old_component(tmp_path, monkeypatch):
    from pathlib import Path

    from latentdiff.model_folder import write_component

    folder = tmp_path / "vae"
    write_component(folder, lambda f: (f.mkdir(), (f / "w").write_text("old")))

    def half_written(f):
        f.mkdir()
        (f / "w").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_component(folder, half_written)
    assert (folder / "w").read_text() == "old"
    real_rename = Path.rename

    def interrupted_swap(self, target):  # killed right after the old folder was moved aside
        result = real_rename(self, target)
        if self == folder:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(Path, "rename", interrupted_swap)
    with pytest.raises(KeyboardInterrupt):
        write_component(folder, lambda f: (f.mkdir(), (f / "w").write_text("new")))
    monkeypatch.undo()
    assert (folder / "w").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["vae"]
    # a hard kill between the two renames leaves the old folder in the staging folder; the next write restores it
    (tmp_path / ".vae-killed").mkdir()
    folder.rename(tmp_path / ".vae-killed" / "old")
    with pytest.raises(RuntimeError, match="produced no folder"):
        write_component(folder, lambda f: None)
    assert (folder / "w").read_text() == "old"
    write_component(folder, lambda f: (f.mkdir(), (f / "w").write_text("new")))
    assert (folder / "w").read_text() == "new"


def test_pickle_only_weights_are_refused_by_name(tiny_dir, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_dir, folder)
    for f in (folder / "vae").glob("*.safetensors"):
        f.unlink()
    (folder / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded: refused before any unpickling")
    with pytest.raises(ModelFolderError, match=r"refusing .*vae/diffusion_pytorch_model.bin.*safetensors only"):
        LatentDiffusionPipeline.from_pretrained(folder)


def test_error_types_are_catchable_as_value_and_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        LatentDiffusionPipeline.from_pretrained(tmp_path / "missing")


def test_no_shipped_model_says_how_to_get_one(monkeypatch, tmp_path):
    from latentdiff import model_folder

    monkeypatch.setattr(model_folder, "SHIPPED_MODEL_DIR", tmp_path / "absent")
    with pytest.raises(ModelFolderError, match="latentdiff new-model --preset small --out"):
        LatentDiffusionPipeline.from_pretrained()


def test_shipped_models_load_by_name_and_a_local_model_folder_of_that_name_wins(tmp_path, monkeypatch):
    from latentdiff import model_folder

    assert model_folder.resolve_model_dir("emoji") == model_folder.SHIPPED_MODEL_DIR
    monkeypatch.setitem(model_folder.SHIPPED_MODELS, "shapes", tmp_path / "absent")
    with pytest.raises(model_folder.ModelFolderError, match="the shipped model 'shapes' is not in this installation"):
        model_folder.resolve_model_dir("shapes")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shapes").mkdir()
    (tmp_path / "shapes" / "model_index.json").write_text("{}")
    assert model_folder.resolve_model_dir("shapes") == Path("shapes")
