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
