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
