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
    from latentdiff.recipes import load_recipe

    (tmp_path / "recipes" / "pictures").mkdir(parents=True)
    recipe = tmp_path / "recipes" / "r.toml"
    recipe.write_text('[data]\nkind = "folder"\npath = "pictures"\n')
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    assert load_recipe(recipe)["data"]["path"] == str((tmp_path / "recipes" / "pictures").resolve())


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
