"""Reliability (issue 14): shared pipelines, refusals before work, damaged files, and nothing replaced unasked."""

import threading

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from conftest import seeded
from latentdiff.schedulers import DDIMScheduler


# One pipeline, many threads -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler_cls", [DPMSolverMultistepScheduler, DDIMScheduler])
def test_threads_sharing_a_pipeline_get_the_images_they_get_one_after_another(tiny_pipe, scheduler_cls):
    """Each call samples with its own scheduler state: multistep history and timesteps are not shared (on main, two
    threads on DPM-Solver++ raised IndexError and DDIM with other step counts gave wrong images)."""
    tiny_pipe.scheduler = scheduler_cls.from_config(tiny_pipe.scheduler.config)
    jobs = [(seed, 3 + seed) for seed in range(4)]  # different step counts: different timesteps per call
    run = lambda seed, steps: tiny_pipe("a red circle", num_inference_steps=steps, generator=seeded(seed),  # noqa: E731
                                        output_type="np").images
    alone = [run(*job) for job in jobs]
    results, errors = {}, []

    def work(i):
        try:
            for round_ in range(3):
                results[i, round_] = run(*jobs[i])
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for (i, _), images in results.items():
        np.testing.assert_array_equal(images, alone[i])
    assert tiny_pipe.scheduler.num_inference_steps is None  # the pipeline's own scheduler is never stepped


# Nothing replaced without asking -------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["new-model", "export"])
def test_writing_a_model_over_an_existing_folder_needs_overwrite(command, tiny_dir, tmp_path, capsys):
    from latentdiff.cli import main

    out = tmp_path / "trained"
    assert main(["new-model", "--preset", "tiny", "--out", str(out), "--seed", "1"]) == 0
    (out / "notes.txt").write_text("mine")
    weights = {p: p.read_bytes() for p in out.rglob("*.safetensors")}
    args = ["new-model", "--preset", "tiny"] if command == "new-model" else ["export", str(tiny_dir)]
    assert main([*args, "--out", str(out)]) == 2
    assert "already holds a model; pass --overwrite" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*.safetensors")} == weights
    assert main([*args, "--out", str(out), "--overwrite"]) == 0
    assert {p: p.read_bytes() for p in out.rglob("*.safetensors")} != weights
    assert (out / "notes.txt").read_text() == "mine"  # --overwrite replaces the model, not the user's files
    assert main([*args, "--out", str(out / "notes.txt")]) == 2
    assert "--out must be a folder" in capsys.readouterr().err


RECIPE_CASES = [
    ('[data]\nkind = "shapes"\n[vae]\narg = ["--max-steps", "3"]\n', r"\[vae\] unknown keys \['arg'\]; its keys are"),
    ('vae = 3\n[data]\nkind = "shapes"\n', r"vae must be a \[vae\] table, got 3"),
    ('[data]\nkind = "shapes"\n[vae]\nargs = "--max-steps 3"\n', r"\[vae\] args must be a list of strings"),
    ('[data]\nkind = "shapes"\n[vae]\nargs = ["--max-steps", 3]\n', r"\[vae\] args must be a list of strings"),
    ('[data]\nkind = "folder"\n', r'\[data\] kind = "folder" needs path'),
    ('[data]\nkind = "folder"\npath = "nowhere"\n', r"\[data\] path 'nowhere' is not a folder"),
    ('[data]\nkind = "pictures"\n', r"\[data\] kind must be one of"),
    ('[vae]\nargs = []\n', r"a \[data\] section is required"),
    ('name = 3\n[data]\nkind = "shapes"\n', r"name must be a string"),
    ('[data]\nkind = "shapes"\nargs = ["--n", "4", "--out", "../../elsewhere"]\n', r"\[data\] args may not set --out"),
    ('[data]\nkind = "shapes"\nargs = ["--overwrite"]\n', r"\[data\] args may not set --overwrite"),
    ('[data]\nkind = "shapes"\n[clip]\nargs = ["--output=/tmp/x"]\n', r"\[clip\] args may not set --output-dir"),
    ('[data]\nkind = "shapes"\n[unet]\nargs = ["--model-dir", "/tmp/x"]\n', r"\[unet\] args may not set --model-dir"),
    ('[data]\nkind = "shapes"\n[eval]\nargs = ["--out", "/tmp/x"]\n', r"\[eval\] args may not set --out"),
    ('[data]\nkind = "shapes"\n[vae]\nargs = ["--max-stepz", "3"]\n', r"\[vae\] args: unrecognized arguments: --max-stepz"),
    ('[data]\nkind = "shapes"\nargs = ["--n", "-4"]\n', r"\[data\] args: argument --n: must be an integer ≥ 1"),
    ('[data\nkind = "shapes"\n', r"not valid TOML"),
    ('[data]\nkind = "shapes"\nargs = ["--size", "8"]\n', r"\[data\] args: --size must be from 16 to 512, got 8"),
    ('[data]\nkind = "shapes"\nargs = ["--holdout", "red blob"]\n', r"\[data\] args: --holdout must be"),
    ('[data]\nkind = "shapes"\n[vae]\nargs = ["--max-steps", "0"]\n', r"\[vae\] args: --max-steps must be ≥ 1"),
    ('[data]\nkind = "shapes"\n[unet]\nargs = ["--uncond-prob", "2"]\n', r"\[unet\] args: --uncond-prob must be in"),
    ('[data]\nkind = "shapes"\n[clip]\nargs = ["--hard-negatives", "2", "--random-flip"]\n',
     r"\[clip\] args: --hard-negatives cannot go with --random-flip"),
    ('[data]\nkind = "shapes"\n[eval]\nargs = ["--guidance-scales", "x"]\n', r"\[eval\] args: --guidance-scales must"),
    ('[data]\nkind = "shapes"\n[eval]\nargs = ["--hard-negatives", "8"]\n',
     r"\[eval\] args: --hard-negatives needs the recipe's data set to be shapes with held-out pairs"),
    ('[data]\nkind = "shapes"\nargs = ["--task-weights", "1,1"]\n', r"\[data\] args: --task-weights must be 3"),
    ('[data]\nkind = "shapes"\n[clip]\nargs = ["--seed", "4294967296"]\n', r"\[clip\] args: argument --seed: must be an "
                                                                        r"integer in \[0, 2\*\*31 - 1\]"),
]


@pytest.mark.parametrize("text,message", RECIPE_CASES, ids=[m.split(" ")[0] + str(i) for i, (_, m) in enumerate(RECIPE_CASES)])
def test_a_bad_recipe_is_refused_before_any_stage_runs_naming_section_and_key(text, message, tmp_path, capsys):
    from latentdiff.cli import main

    recipe = tmp_path / "r.toml"
    recipe.write_text(text)
    assert main(["run-recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "run" / "data").exists()  # nothing ran


def test_a_recipe_folder_path_is_relative_to_the_recipe_file(tmp_path, monkeypatch):
    from latentdiff.training.recipes import load_recipe

    (tmp_path / "recipes" / "pictures").mkdir(parents=True)
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.write_text('[data]\nkind = "folder"\npath = "pictures"\n[clip]\nargs = ["--tokenizer", "tok", '
                      '"--preset", "presets/p.json"]\n[unet]\nargs = ["--preset=small"]\n'
                      '[eval]\nargs = ["--judge", "open_clip:ViT-B-32:laion", "--reference=real"]\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    loaded, here = load_recipe(recipe), (tmp_path / "recipes").resolve()
    assert loaded["data"]["path"] == str(here / "pictures")
    assert loaded["clip"]["args"] == ["--tokenizer", str(here / "tok"), "--preset", str(here / "presets" / "p.json")]
    assert loaded["unet"]["args"] == ["--preset=small"]  # a preset's name is not a path
    assert loaded["eval"]["args"] == ["--judge", "open_clip:ViT-B-32:laion", f"--reference={here / 'real'}"]


def test_a_recipe_cannot_replace_a_data_set_outside_its_out_folder(tmp_path, capsys):
    from latentdiff.cli import main

    other = tmp_path / "precious"
    assert main(["data", "shapes", "--n", "3", "--size", "16", "--out", str(other)]) == 0
    before = (other / "metadata.jsonl").read_text()
    recipe = tmp_path / "run" / "r.toml"
    recipe.parent.mkdir()
    recipe.write_text(f'[data]\nkind = "shapes"\nargs = ["--n", "5", "--size", "16", "--out", "{other}"]\n')
    assert main(["run-recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert (other / "metadata.jsonl").read_text() == before


# Bounded work, fast refusal ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ["dpm++", "ddim", "ddpm"])
def test_more_steps_than_the_training_timesteps_are_refused_at_once(tiny_pipe, scheduler):
    from latentdiff.schedulers import scheduler_from_name

    tiny_pipe.scheduler = scheduler_from_name(scheduler, tiny_pipe.scheduler.config)
    with pytest.raises(ValueError, match=r"num_inference_steps must be at most 1000 \(the scheduler's "
                                         r"num_train_timesteps\), got 10000000"):
        tiny_pipe("a", num_inference_steps=10_000_000)


@pytest.mark.parametrize("size", [{"height": 100000}, {"width": 100000, "height": 100000}, {"width": 264}])
def test_sizes_beyond_eight_times_the_native_one_are_refused(tiny_pipe, size):
    with pytest.raises(ValueError, match=r"(height|width) must be at most 256 \(8 × the model's native 32 px"):
        tiny_pipe("a", num_inference_steps=2, **size)


def test_another_size_than_the_native_one_warns(tiny_pipe, caplog):
    tiny_pipe("a", num_inference_steps=2, height=64, width=64, output_type="latent")
    assert "64x64 is not the model's native 32x32" in caplog.text
    caplog.clear()
    tiny_pipe("a", num_inference_steps=2, output_type="latent")
    assert "native" not in caplog.text


@pytest.mark.parametrize("kwargs,message", [
    ({"generator": 5}, r"generator must be a torch.Generator or a list of them .*got int: 5"),
    ({"generator": [torch.Generator(), "x"]}, r"generator must be a torch.Generator .*got str: 'x'"),
    ({"generator": []}, r"generator must be a torch.Generator .*got an empty list"),
    ({"latents": np.zeros((1, 4, 16, 16), np.float32)}, r"latents must be a torch.Tensor \(torch.from_numpy"),
])
def test_wrong_generator_and_latents_types_are_named(tiny_pipe, kwargs, message):
    with pytest.raises(TypeError, match=message):
        tiny_pipe("a", num_inference_steps=2, **kwargs)


def test_an_overflowing_guidance_scale_raises_instead_of_a_nan_image(tiny_pipe):
    with pytest.raises(FloatingPointError, match=r"latents after step 1 of 3 hold NaN or infinite values; "
                                                 r"guidance_scale=1e\+308"):
        tiny_pipe("a", num_inference_steps=3, guidance_scale=1e308)


# Damaged files -------------------------------------------------------------------------------------------------------

def _damaged_copy(tiny_dir, tmp_path, damage):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        weights.write_bytes(bytes(range(256)) * 8)
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "nan":  # a well-formed file whose tensor data went bad
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        tensors["conv_in.weight"][0, 0, 0, 0] = float("nan")
        save_file(tensors, weights)
    elif damage == "scheduler":
        (model / "scheduler" / "scheduler_config.json").write_text("{not json")
    elif damage == "shard":  # an index naming a shard that is not there
        (model / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(
            '{"metadata": {}, "weight_map": {"conv_in.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}')
    return model, weights


@pytest.mark.parametrize("damage,message", [
    ("truncated", r"damaged weights file .*unet/diffusion_pytorch_model.safetensors \(\d+ bytes\): .*truncated or not"),
    ("garbage", r"damaged weights file .*unet/diffusion_pytorch_model.safetensors \(2048 bytes\)"),
    ("empty", r"damaged weights file .*unet/diffusion_pytorch_model.safetensors \(0 bytes\)"),
    ("nan", r"damaged weights file .*unet/diffusion_pytorch_model.safetensors: tensor 'conv_in.weight' holds NaN"),
    ("scheduler", r"damaged .*scheduler/scheduler_config.json: not a JSON object"),
    ("shard", r"incomplete model folder: .*index.json names .*diffusion_pytorch_model-00002-of-00002.safetensors, "
              r"which is missing"),
])
def test_a_damaged_model_file_is_named_and_generate_exits_non_zero(damage, message, tiny_dir, tmp_path, capsys):
    from latentdiff import LatentDiffusionPipeline, ModelFolderError
    from latentdiff.cli import main

    model, _ = _damaged_copy(tiny_dir, tmp_path, damage)
    with pytest.raises(ModelFolderError, match=message) as caught:
        LatentDiffusionPipeline.from_pretrained(model)
    assert caught.value.__cause__ is None or "cannot load" not in str(caught.value)
    out = tmp_path / "image.png"
    assert main(["generate", "a", "--model", str(model), "--out", str(out), "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and not out.exists()


def test_non_finite_latents_during_sampling_raise_and_the_cli_writes_nothing(tiny_dir, tmp_path, capsys, monkeypatch):
    """Weights that are finite but overflow (damaged bytes can do that too) are caught while sampling."""
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.cli import main

    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        pipe.unet.conv_out.bias.fill_(3e38)
    with pytest.raises(FloatingPointError, match=r"the latents after step 1 of 2 hold NaN or infinite values; "
                                                 r"the weights or the given latents"):
        pipe("a", num_inference_steps=2)
    monkeypatch.setattr(LatentDiffusionPipeline, "from_pretrained", classmethod(lambda cls, *a, **k: pipe))
    out = tmp_path / "image.png"
    assert main(["generate", "a", "--out", str(out), "--steps", "2"]) != 0
    assert "hold NaN or infinite values" in capsys.readouterr().err and not out.exists()


# Errors and noise ----------------------------------------------------------------------------------------------------

def _every_flag(parser, name):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _every_flag(subparser, f"{name} {sub}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield name, action, parser


def test_every_flag_of_every_command_has_help_with_its_default():
    from latentdiff.training import classifier as classifier_training, clip as clip_training, unet as unet_training
    from latentdiff.training import vae as vae_training
    from latentdiff import cli
    from latentdiff.evaluation import job as eval_job

    parsers = [("latentdiff", cli.build_parser()), ("eval", eval_job.build_parser()),
               ("train_clip", clip_training.build_parser()), ("train_vae", vae_training.build_parser()),
               ("train_unet", unet_training.build_parser()), ("train_classifier", classifier_training.build_parser())]
    flags = [f for name, p in parsers for f in _every_flag(p, name)]
    assert len(flags) > 100
    for name, action, parser in flags:
        assert action.help, f"{name} {action.option_strings or action.dest} has no help"
        if action.option_strings and action.nargs != 0 and not action.required:
            if action.default is None:  # nothing to show automatically: the help must say what happens
                assert "default" in action.help, f"{name} {action.option_strings} does not state its default"
            else:  # the formatter shows it
                shown = " ".join(parser.format_help().split())
                assert " ".join(f"(default: {action.default})".split()) in shown or "default" in action.help, \
                    f"{name} {action.option_strings}"


def test_version_and_eval_help_name_latentdiff(capsys):
    from latentdiff import __version__
    from latentdiff.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"latentdiff {__version__}"
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert capsys.readouterr().out.startswith("usage: latentdiff eval")


@pytest.mark.parametrize("argv,message", [
    (["generate", "a", "--seed", str(10**23)], r"argument --seed: must be an integer in \[0, 2\*\*64 - 1\], got '1"),
    (["generate", "a", "--seed", "-1"], r"argument --seed: must be an integer in \[0, 2\*\*64 - 1\]"),
    (["generate", "a", "--steps", "1000000"], r"--steps must be at most 1000 \(the model's training timesteps\)"),
    (["generate", "a", "--height", "100000"], r"--height must be a multiple of 4 and at most 512 \(8 × the model's "
                                              r"native 64 px\), got 100000"),
    (["generate", "a", "--width", "66"], r"--width must be a multiple of 4"),
    (["generate", "a", "--num-images", "65"], r"--num-images must be at most 64"),
    (["generate", "a", "--out", "{tmp}"], r"--out must be an image file, got the folder"),
    (["generate", "a", "--out", "{tmp}/picture"], r"--out must end in an image extension PIL can write, e.g. .*\.png"),
    (["generate", "a", "--model", "{tmp}/missing"], r"model folder '.*missing' does not exist"),
    (["generate", "a", "--scheduler", "euler"], r"argument --scheduler: invalid choice: 'euler'"),
    (["eval", "--prompts", "{tmp}/none.txt", "--out", "{tmp}/r", "--steps", "0"], r"argument --steps: must be an "
                                                                                  r"integer ≥ 1"),
    (["new-model", "--preset", "huge", "--out", "{tmp}/m"], r"preset"),
    (["run-recipe", "{tmp}/none.toml", "--out", "{tmp}/r"], r"recipe must be a TOML file"),
    (["data", "shapes", "--out", "{tmp}/d", "--size", "0"], r"argument --size: must be an integer ≥ 1"),
])
def test_cli_errors_are_one_line_with_exit_code_2_and_no_traceback(argv, message, tmp_path, capsys):
    import re
    import time

    from latentdiff.cli import main

    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    started = time.perf_counter()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), err
    assert err.startswith(f"latentdiff {argv[0]}")
    assert time.perf_counter() - started < 5  # refused before the weights load


def test_debug_shows_the_traceback(tmp_path):
    from latentdiff.cli import main

    with pytest.raises(ValueError, match="--out must be an image file"):
        main(["generate", "a", "--out", str(tmp_path), "--debug"])


def test_generate_and_eval_are_quiet_about_the_libraries_loading(tmp_path, capsys, caplog):
    """No "Loading weights"/"Loading checkpoint shards" bars (the shipped model's weights are sharded), no
    "kept in float32: []" warning on a dtype cast, no "Downloading data" for a local folder."""
    from latentdiff.cli import main

    assert main(["generate", "a tiger", "--out", str(tmp_path / "a.png"), "--steps", "2"]) == 0
    assert main(["data", "shapes", "--n", "6", "--size", "64", "--out", str(tmp_path / "data")]) == 0
    assert main(["eval", "--prompts", str(tmp_path / "data"), "--out", str(tmp_path / "eval"), "--steps", "2",
                 "--guidance-scales", "7.5", "--images-per-prompt", "1", "--dtype", "bf16", "--bootstrap", "10"]) == 0
    err = capsys.readouterr().err + caplog.text
    for noise in ("Loading weights", "Loading checkpoint shards", "kept in float32", "Downloading data",
                  "Generating train split"):
        assert noise not in err


def test_a_unet_only_lora_loads_without_the_text_encoder_warning(tiny_pipe, tiny_dir, tmp_path, caplog):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from latentdiff import LatentDiffusionPipeline

    tiny_pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"]))
    LatentDiffusionPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(tiny_pipe.unet))
    fresh = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    fresh.load_lora_weights(tmp_path)
    assert "No LoRA keys" not in caplog.text
    assert any("lora" in name for name, _ in fresh.unet.named_parameters())


# Damaged checkpoints -------------------------------------------------------------------------------------------------

def _toy_training(out, steps, resume=False):
    """trainer.train on a one-layer model with EMA, checkpointing every 2 steps."""
    import argparse

    from diffusers.training_utils import EMAModel

    from latentdiff.training import trainer

    parser = argparse.ArgumentParser()
    trainer.add_common_args(parser, lr=0.1, batch_size=2, max_steps=steps)
    args = parser.parse_args(["--data", "unused", "--output-dir", str(out), "--checkpointing-steps", "2",
                              "--lr-warmup-steps", "0", "--lr-scheduler", "constant", "--report-to", "none",
                              "--checkpoints-total-limit", "5",
                              *(["--resume-from-checkpoint", "latest"] if resume else [])])
    accelerator = trainer.make_accelerator(args, "toy")
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    items = [{"x": torch.randn(3, generator=seeded(i)), "skipped": 0} for i in range(8)]
    loader = torch.utils.data.DataLoader(items, batch_size=2, shuffle=True, generator=seeded(0),
                                         collate_fn=lambda b: {"x": torch.stack([r["x"] for r in b]), "skipped": 0})
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader,
                                                              trainer.make_lr_scheduler(optimizer, args))
    ema = EMAModel(model.parameters(), decay=0.9)
    noise = lambda: torch.randn(1).item()  # noqa: E731 - a draw from the global RNG, which a resume restores
    trainer.train(accelerator, args, [model], optimizer, scheduler, loader,
                  lambda batch: ((model(batch["x"]) - noise()).pow(2).mean(), {}), ema=ema)
    return model.weight.detach().clone()


DAMAGES = {
    "empty folder": (lambda c: [f.unlink() for f in c.iterdir()], r"the folder is empty"),
    "truncated weights": (lambda c: (c / "model.safetensors").write_bytes((c / "model.safetensors").read_bytes()[:60]),
                          r"model.safetensors is truncated or not a safetensors file"),
    "missing progress": (lambda c: (c / "progress.json").unlink(), r"progress.json is missing"),
    "bad progress": (lambda c: (c / "progress.json").write_text('{"step": 4}'), r"progress.json is unreadable"),
    "missing ema": (lambda c: (c / "ema.safetensors").unlink(), r"ema.safetensors is missing"),
    "garbage optimizer": (lambda c: (c / "optimizer.bin").write_bytes(b"\x80\x02garbage" * 50),
                          r"optimizer.bin is unreadable"),
    "garbage lr scheduler": (lambda c: (c / "scheduler.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 40),
                             r"scheduler.bin is unreadable"),
    "missing ema config": (lambda c: (c / "ema.json").unlink(), r"ema.json is missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_latest_checkpoint_is_named_with_the_way_back(damage, tmp_path):
    from latentdiff.training.trainer import CheckpointError

    _toy_training(tmp_path, 4)
    latest = tmp_path / "checkpoints" / "checkpoint-4"
    harm, message = DAMAGES[damage]
    harm(latest)
    with pytest.raises(CheckpointError, match=rf"checkpoint .*checkpoint-4 cannot be resumed from: {message}.*"
                                              r"--resume-from-checkpoint .*checkpoint-2"):
        _toy_training(tmp_path, 6, resume=True)


@pytest.mark.parametrize("damage", ["missing", "garbage"])
def test_a_missing_rng_state_resumes_with_a_loud_warning_that_it_is_not_exact(damage, tmp_path, caplog):
    whole = _toy_training(tmp_path / "whole", 6)
    _toy_training(tmp_path / "split", 4)
    rng = tmp_path / "split" / "checkpoints" / "checkpoint-4" / "random_states_0.pkl"
    rng.unlink() if damage == "missing" else rng.write_bytes(b"not a pickle")
    resumed = _toy_training(tmp_path / "split", 6, resume=True)
    assert "RESUME NOT EXACT: random_states_0.pkl" in caplog.text
    assert not torch.equal(whole, resumed)  # which is why it says so


def test_an_intact_checkpoint_resumes_exactly_and_quietly(tmp_path, caplog):
    whole = _toy_training(tmp_path / "whole", 6)
    _toy_training(tmp_path / "split", 4)
    assert torch.equal(_toy_training(tmp_path / "split", 6, resume=True), whole)
    assert "NOT EXACT" not in caplog.text


# Unreadable data -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mostly_corrupt(tmp_path_factory):
    """16 shapes scenes of which 12 are not images: with --seed 1 the first 3 batches of 2 include one with no
    readable image (each test checks that the skip happened)."""
    from latentdiff.data.imagefolder import write_imagefolder
    from latentdiff.data.shapes import shapes_rows

    out = tmp_path_factory.mktemp("corrupt") / "data"
    write_imagefolder(out, shapes_rows(16, 32, seed=0))
    for i in range(12):
        (out / f"{i:06d}.png").write_bytes(b"\x89PNG\r\n\x1a\n and nothing else")
    return out


@pytest.mark.parametrize("stage", ["clip", "vae", "unet"])
def test_a_batch_with_no_readable_image_is_skipped_and_counted(stage, mostly_corrupt, tiny_dir, tmp_path, capsys):
    from latentdiff.training import clip as clip_training, unet as unet_training, vae as vae_training

    common = ["--data", str(mostly_corrupt), "--output-dir", str(tmp_path / stage), "--max-steps", "3",
              "--batch-size", "2", "--holdout", "0", "--report-to", "none", "--seed", "1"]
    if stage == "clip":
        summary = clip_training.main([*common, "--preset", "tiny"])
    elif stage == "vae":
        summary = vae_training.main([*common, "--preset", "tiny"])
    else:
        summary = unet_training.main([*common, "--model", str(tiny_dir), "--validation-prompts", "a"])
    assert "a batch with no readable image, skipped" in capsys.readouterr().out
    assert summary["steps"] == 3 and summary["skipped_images"] >= 2


def test_data_with_no_readable_image_at_all_stops_with_a_message(mostly_corrupt, tmp_path):
    import shutil

    from latentdiff.training import vae as vae_training

    data = tmp_path / "data"
    shutil.copytree(mostly_corrupt, data)
    for path in data.glob("*.png"):
        path.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"no batch of a whole epoch held a readable image \(16 unreadable"):
        vae_training.main(["--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "3",
                           "--batch-size", "2", "--holdout", "0", "--report-to", "none", "--preset", "tiny"])


# The two commands on a fresh machine ---------------------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_ci_runs_readme_test_command_which_installs_the_emoji_font_and_the_browser():
    import subprocess

    extract = subprocess.run(["bash", "-c", "awk '/^## Test/ {found = 1} found && /^```bash/ {getline; print; exit}' "
                              "README.md"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert extract.startswith("bash tools/system-deps.sh && ") and "-m pytest -q" in extract
    ci = (REPO / ".ci" / "run").read_text()
    assert 'eval "$cmd"' in ci and "pip install" not in ci  # CI runs README's command, nothing of its own


def test_system_deps_says_what_to_do_where_it_cannot_install(tmp_path):
    import shutil
    import subprocess

    bin_dir = tmp_path / "bin"  # a PATH with bash and the basics, but no apt-get
    bin_dir.mkdir()
    for tool in ("bash", "id", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    result = subprocess.run(["bash", str(REPO / "tools" / "system-deps.sh")], capture_output=True, text=True,
                            env={"PATH": str(bin_dir), "EMOJI_FONT": str(tmp_path / "none.ttf")})
    assert result.returncode == 0
    assert "no apt-get here; install fonts-noto-color-emoji chromium yourself" in result.stderr


def test_a_resume_without_rng_state_reseeds_each_process_from_the_seed_and_step(tmp_path, monkeypatch):
    from latentdiff.training import trainer

    _toy_training(tmp_path, 4)
    (tmp_path / "checkpoints" / "checkpoint-4" / "random_states_0.pkl").unlink()
    calls = []
    monkeypatch.setattr(trainer, "set_seed", lambda *a, **k: calls.append((a, k)))
    _toy_training(tmp_path, 6, resume=True)
    assert ((4,), {"device_specific": True}) in calls  # --seed 0 + step 4, per process


def test_training_scripts_report_errors_in_one_line(tmp_path):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(REPO / "training" / "train_vae.py"), "--data", str(tmp_path / "none"),
                             "--output-dir", str(tmp_path / "run"), "--report-to", "none"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("train_vae.py: error: ")


def test_an_interrupted_atomic_write_keeps_the_old_file_and_no_temporary_one(tmp_path):
    from latentdiff.files import write_atomically

    target = tmp_path / "record.json"
    write_atomically(target, "old")

    def dies_halfway(path):
        path.write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomically(target, dies_halfway)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["record.json"]
    write_atomically(target, "new")
    assert target.read_text() == "new"


def test_a_recipe_may_ask_its_eval_for_hard_negatives_on_the_data_set_it_will_make(tmp_path):
    # the eval's own check looked for split.json in the placeholder --prompts DATA: "needs a shapes data set with
    # held-out pairs as --prompts (its split.json), got 'DATA'", for a recipe whose data set holds out pairs
    from latentdiff.training.recipes import load_recipe

    recipe = tmp_path / "r.toml"
    recipe.write_text('[data]\nkind = "shapes"\nargs = ["--holdout-fraction", "0.125"]\n'
                      '[eval]\nargs = ["--hard-negatives", "8"]\n')
    assert load_recipe(recipe)["eval"]["args"] == ["--hard-negatives", "8"]
