"""The `latentdiff` command, run in-process as a user would run it."""

import pytest
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from latentdiff.cli import main


def test_new_model_then_generate_a_grid(tmp_path, capsys):
    model = tmp_path / "model"
    assert main(["new-model", "--preset", "tiny", "--out", str(model)]) == 0
    assert LatentDiffusionPipeline.from_pretrained(model).clip is not None
    out = tmp_path / "out" / "grid.png"
    assert main(["generate", "a tiger", "--model", str(model), "--out", str(out), "--steps", "3", "--num-images", "4",
                 "--scheduler", "dpm++", "--negative-prompt", "blurry", "--guidance-scale", "5", "--seed", "3"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert Image.open(out).size == (2 * 32 + 2, 2 * 32 + 2)  # 2x2 grid of 32x32 images, 2 px apart


def test_export_stores_half_precision_weights_that_load_as_float32(tiny_dir, tmp_path, capsys):
    import shutil

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    source = tmp_path / "full"
    shutil.copytree(tiny_dir, source)
    (source / "recipe.json").write_text("{}")
    assert main(["export", str(source), "--out", str(tmp_path / "half")]) == 0
    assert "MiB of fp16 weights" in capsys.readouterr().out and (tmp_path / "half" / "recipe.json").is_file()
    for path in (tmp_path / "half").rglob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}, path
    full, half = (LatentDiffusionPipeline.from_pretrained(d) for d in (source, tmp_path / "half"))
    modules = (half.unet, half.vae, half.text_encoder, half.clip)
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.float32}
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "half", safety_checker=None,
                                                     requires_safety_checker=False)
    theirs.scheduler = type(half.scheduler).from_config(half.scheduler.config)
    a, b, c = (p("a tiger", num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
               for p in (full, half, theirs))
    assert 0 < np.abs(a - b).max() < 0.02  # the weights' fp16 round-off, nothing else
    assert np.abs(b - c).max() <= 1 / 255  # and diffusers loads the exported folder as it is, in float32
    (source / "recipe.json").unlink()
    assert main(["export", str(source), "--out", str(tmp_path / "half"), "--overwrite"]) == 0
    assert not (tmp_path / "half" / "recipe.json").exists(), "a stale record of another model stays behind"
    assert main(["export", str(source), "--out", str(source)]) == 2
    assert "--out must differ from the model folder" in capsys.readouterr().err
    assert main(["export", str(source), "--out", str(tmp_path / "dpm"), "--scheduler", "dpm++"]) == 0
    scheduler = LatentDiffusionPipeline.from_pretrained(tmp_path / "dpm").scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.timestep_spacing == full.scheduler.config.timestep_spacing
    assert type(StableDiffusionPipeline.from_pretrained(tmp_path / "dpm").scheduler) is type(scheduler)


def test_generate_single_image_is_seeded(tiny_dir, tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, (7, 7, 8)):
        assert main(["generate", "a tiger", "--model", str(tiny_dir), "--out", str(path), "--steps", "3",
                     "--scheduler", "ddpm", "--seed", str(seed)]) == 0
    a, b, c = (Image.open(p).tobytes() for p in paths)
    assert a == b and a != c


def test_errors_are_one_line_messages_not_tracebacks(tiny_dir, tmp_path, capsys):
    assert main(["generate", "x", "--model", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "x", "--model", str(tiny_dir), "--height", "31", "--out", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "--height must be a multiple of 2 and at most 256" in err and "Traceback" not in err



@pytest.mark.parametrize("flag,value,message", [("--steps", "0", "argument --steps: must be an integer ≥ 1, got '0'"),
                                                ("--num-images", "x", "argument --num-images: must be an integer ≥ 1"),
                                                ("--guidance-scale", "nan", "argument --guidance-scale: must be a finite")])
def test_bad_flags_are_named_by_their_flag(tiny_dir, flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "x", "--model", str(tiny_dir), flag, value])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_guidance_rescale_changes_the_image_is_carried_in_the_png_and_is_checked(tiny_dir, tmp_path, capsys):
    import numpy as np

    from latentdiff.images import read_parameters

    common = ["a red circle", "--model", str(tiny_dir), "--steps", "3", "--scheduler", "ddim", "--seed", "3"]
    plain, rescaled, again = tmp_path / "plain.png", tmp_path / "rescaled.png", tmp_path / "again.png"
    assert main(["generate", *common, "--out", str(plain)]) == 0
    assert main(["generate", *common, "--out", str(rescaled), "--guidance-rescale", "0.7"]) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(rescaled)))
    assert "guidance_rescale" not in read_parameters(plain)
    assert "Rescale CFG" not in Image.open(plain).text["parameters"]
    assert read_parameters(rescaled)["guidance_rescale"] == 0.7
    assert "CFG scale: 7.5, Rescale CFG: 0.7, Seed: 3" in Image.open(rescaled).text["parameters"]
    assert main(["generate", "--from-png", str(rescaled), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(rescaled)))
    capsys.readouterr()
    for value in ("1.5", "-0.1", "nan"):
        assert main(["generate", *common, "--out", str(tmp_path / "x.png"), "--guidance-rescale", value]) == 2
        assert f"--guidance-rescale must be in [0, 1], got {float(value)}" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    # the shipped model's few-step weights at --steps 4 have no classifier-free guidance to rescale
    assert main(["generate", "a tiger", "--steps", "4", "--out", str(tmp_path / "x.png"),
                 "--guidance-rescale", "0.7"]) == 2
    assert "--guidance-rescale needs classifier-free guidance, which the few-step weights used at --steps 4 do not " \
           "run (give --scheduler to sample the model itself), got 0.7" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_guidance_interval_is_carried_in_the_png_and_is_checked(tiny_dir, tmp_path, capsys):
    import numpy as np

    from latentdiff.images import read_parameters

    common = ["a red circle", "--model", str(tiny_dir), "--steps", "4", "--scheduler", "ddim", "--seed", "3"]
    plain, late, again = tmp_path / "plain.png", tmp_path / "late.png", tmp_path / "again.png"
    assert main(["generate", *common, "--out", str(plain)]) == 0
    assert main(["generate", *common, "--out", str(late), "--guidance-interval", "0.5", "1"]) == 0
    assert not np.array_equal(np.asarray(Image.open(plain)), np.asarray(Image.open(late)))
    assert "guidance_interval" not in read_parameters(plain)
    assert read_parameters(late)["guidance_interval"] == [0.5, 1.0]
    assert "CFG scale: 7.5, Guidance interval: 0.5-1, Seed: 3" in Image.open(late).text["parameters"]
    assert main(["generate", "--from-png", str(late), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(late)))
    capsys.readouterr()
    for start, stop in (("0.5", "0.5"), ("-0.1", "1"), ("0", "1.5")):
        assert main(["generate", *common, "--out", str(tmp_path / "x.png"), "--guidance-interval", start, stop]) == 2
        assert (f"--guidance-interval must be START STOP with 0 ≤ START < STOP ≤ 1, got {float(start):g} "
                f"{float(stop):g}") in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["generate", "a tiger", "--steps", "4", "--out", str(tmp_path / "x.png"),
                 "--guidance-interval", "0.3", "1"]) == 2
    assert "--guidance-interval needs classifier-free guidance, which the few-step weights used at --steps 4 do " \
           "not run (give --scheduler to sample the model itself), got (0.3, 1.0)" in capsys.readouterr().err


def test_every_png_carries_how_it_was_made_and_can_be_made_again(tiny_dir, tmp_path, capsys):
    import numpy as np

    from latentdiff.images import read_parameters

    grid = tmp_path / "grid.png"
    assert main(["generate", "a red circle", "--model", str(tiny_dir), "--out", str(grid), "--steps", "3",
                 "--num-images", "2", "--seed", "7", "--negative-prompt", "blurry", "--scheduler", "ddim"]) == 0
    assert "and 2 images beside it" in capsys.readouterr().out
    first, second = tmp_path / "grid-0.png", tmp_path / "grid-1.png"
    text = Image.open(second).text["parameters"]
    assert text.splitlines()[:2] == ["a red circle", "Negative prompt: blurry"]
    assert text.splitlines()[2].startswith("Steps: 3, Sampler: DDIM, CFG scale: 7.5, Seed: 8, Size: 32x32, Model: ")
    assert read_parameters(second)["seed"] == 8
    assert main(["info", str(second)]) == 0 and capsys.readouterr().out.strip() == text
    again = tmp_path / "again.png"  # the second image, from its PNG: the same pixels (its batch is made again)
    assert main(["generate", "--from-png", str(second), "--out", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(second)))
    assert read_parameters(again) == read_parameters(second)
    alone = tmp_path / "alone.png"  # and from its seed alone, as AUTOMATIC1111 numbers a batch's seeds: the same
    assert main(["generate", "a red circle", "--model", str(tiny_dir), "--out", str(alone), "--steps", "3",  # image,
                 "--seed", "8", "--negative-prompt", "blurry", "--scheduler", "ddim"]) == 0  # up to round-off of
    diff = np.abs(np.asarray(Image.open(alone), np.int16) - np.asarray(Image.open(second), np.int16))  # batch shapes
    assert diff.max() <= 1
    assert not np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(second)))
    assert main(["info", str(grid)]) == 2  # the grid is not one generation
    assert "carries no latentdiff parameters" in capsys.readouterr().err
    assert main(["generate", "--out", str(tmp_path / "x.png")]) == 2
    assert "give a prompt (or --from-png IMAGE.png)" in capsys.readouterr().err
