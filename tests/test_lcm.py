"""Latent consistency distillation: the equations against diffusers' LCMScheduler, a student that starts as its
teacher, and a run that lowers the consistency loss and writes a pipeline that samples in 4 steps."""

import argparse

import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from latentdiff import LatentDiffusionPipeline
from latentdiff.data.imagefolder import write_imagefolder
from latentdiff.data.shapes import shapes_rows
from latentdiff.pipelines import few_step
from latentdiff.pipelines.guidance import guidance_embedding
from latentdiff.schedulers import DDPMScheduler
from latentdiff.training import lcm
from latentdiff.training.unet import CachedLatents, sample_cached_latents

from conftest import seeded

QUIET = ["--report-to", "none"]


def test_boundary_scalings_are_lcm_schedulers_and_make_f_the_identity_at_zero():
    scheduler = LCMScheduler()
    for t in (0, 19, 259, 999):
        ours = lcm.boundary_scalings(torch.tensor([t]))
        theirs = scheduler.get_scalings_for_boundary_condition_discrete(t)
        np.testing.assert_allclose([float(ours[0]), float(ours[1])], [float(v) for v in theirs], rtol=1e-6)
    assert lcm.boundary_scalings(torch.tensor([0])) == (torch.tensor([1.0]), torch.tensor([0.0]))
    np.testing.assert_array_equal(lcm.solver_timesteps(1000, 50)[:3], [19, 39, 59])


def test_the_student_starts_as_its_teacher(tiny_pipe):
    teacher = tiny_pipe.unet
    student = few_step.with_guidance_embedding(teacher, 32)
    x, text = torch.randn(2, teacher.config.in_channels, 8, 8), torch.randn(2, 5, teacher.config.cross_attention_dim)
    with torch.no_grad():
        expected = teacher(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample
        got = student(x, torch.tensor([10, 500]), encoder_hidden_states=text,
                      timestep_cond=guidance_embedding(torch.tensor([2.0, 9.0]), 32)).sample
    torch.testing.assert_close(got, expected)


def test_distillation_lowers_the_consistency_loss_and_samples_in_four_steps(tiny_dir, tmp_path):
    data = tmp_path / "data"
    write_imagefolder(data, shapes_rows(16, 32, seed=0))
    args = ["--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"), "--batch-size", "16",
            "--holdout", "0", "--learning-rate", "2e-3", "--lr-warmup-steps", "2", "--lr-scheduler", "constant",
            "--num-ddim-timesteps", "20", "--time-cond-proj-dim", "32", "--target-decay", "0.5",
            "--checkpointing-steps", "1000", "--cache-dir", str(tmp_path / "cache"), *QUIET]
    lcm.main([*args, "--max-steps", "40"])
    teacher = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    distilled = LatentDiffusionPipeline.from_pretrained(tmp_path / "run" / "model")
    assert isinstance(distilled.scheduler, LCMScheduler) and distilled.unet.config.time_cond_proj_dim == 32

    # the consistency loss on the training latents (the data's first caption), averaged over 8 draws of t, w, noise
    cached = CachedLatents(next((tmp_path / "cache").glob("*.safetensors")))
    torch.manual_seed(0)
    latents = sample_cached_latents({"mean": cached.tensors["mean"], "std": cached.tensors["std"]},
                                    teacher.vae.config.scaling_factor)
    text, uncond = cached.text[1:2].expand(len(latents), -1, -1), cached.text[:1]
    parsed = argparse.Namespace(num_ddim_timesteps=20, w_min=2.0, w_max=14.0, huber_c=0.001)
    schedule = DDPMScheduler.from_config(teacher.scheduler.config).schedule

    def loss(unet):
        values = []
        for seed in range(8):
            torch.manual_seed(seed)
            with torch.no_grad():
                values.append(float(lcm.consistency_loss(unet, unet, teacher.unet, schedule, latents, text, uncond,
                                                         parsed, "epsilon")))
        return sum(values) / len(values)

    before, after = loss(few_step.with_guidance_embedding(teacher.unet, 32)), loss(distilled.unet)
    assert after < 0.8 * before, (before, after)  # measured: 0.50 → 0.35
    distilled.set_progress_bar_config(disable=True)
    rows = []
    hook = distilled.unet.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    image = distilled("a red circle", num_inference_steps=4, guidance_scale=7.5, generator=seeded(),
                      output_type="np").images
    hook.remove()
    assert rows == [1] * 4 and np.isfinite(image).all()  # 4 steps, one conditional pass each: guidance distilled in


def _random_lora_student(base, rank=4, dim=32):
    """A student of `base` carrying a LoRA and a guidance embedding with random (non-zero) weights."""
    student = few_step.with_guidance_embedding(base, dim)
    few_step.add_lora(student, rank)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name or "cond_proj" in name:
                p.normal_(0, 0.05)
    return student


def test_the_few_step_folder_gives_the_student_that_was_saved(tiny_pipe, tmp_path):
    base = tiny_pipe.unet
    student = _random_lora_student(base)
    few_step.save(student, tmp_path / "few_step", rank=4, original_inference_steps=20)
    built = few_step.FewStep(tmp_path / "few_step").unet(base)
    assert set(built.state_dict()) == set(few_step.with_guidance_embedding(base, 32).state_dict())  # LoRA merged
    x, text = torch.randn(2, base.config.in_channels, 8, 8), torch.randn(2, 5, base.config.cross_attention_dim)
    cond = guidance_embedding(torch.tensor([2.0, 9.0]), 32)
    with torch.no_grad():
        expected = student(x, torch.tensor([10, 500]), encoder_hidden_states=text, timestep_cond=cond).sample
        got = built(x, torch.tensor([10, 500]), encoder_hidden_states=text, timestep_cond=cond).sample
        plain = base(x, torch.tensor([10, 500]), encoder_hidden_states=text).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # the adapter changed something
    with pytest.raises(ValueError, match="not a few-step folder"):
        few_step.FewStep(tmp_path)


def test_a_lora_distillation_gives_few_step_weights_the_pipeline_uses_for_few_steps(tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    data = tmp_path / "data"
    write_imagefolder(data, shapes_rows(16, 32, seed=0))
    summary = lcm.main(["--model", str(tiny_dir), "--data", str(data), "--output-dir", str(tmp_path / "run"),
                        "--batch-size", "16", "--holdout", "0", "--max-steps", "4", "--lora-rank", "4",
                        "--time-cond-proj-dim", "32", "--num-ddim-timesteps", "20", "--few-step-max-steps", "6",
                        "--cache-dir", str(tmp_path / "cache"), *QUIET])
    model = tmp_path / "run" / "model"
    assert summary["few_step"] == str(model / "few_step")
    pipe = LatentDiffusionPipeline.from_pretrained(model)
    teacher = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    assert type(pipe.scheduler) is type(teacher.scheduler) and pipe.few_step.max_steps == 6
    torch.testing.assert_close(pipe.unet.state_dict(), teacher.unet.state_dict())  # the teacher's own U-Net
    StableDiffusionPipeline.from_pretrained(model, safety_checker=None)  # diffusers loads the folder, few_step/ aside
    pipe.set_progress_bar_config(disable=True)
    student = pipe.few_step.unet(pipe.unet)
    assert student is pipe.few_step.unet(pipe.unet)  # built once

    def passes(call, **kwargs):
        rows = {"base": [], "student": []}
        hooks = [m.register_forward_pre_hook(lambda m, a, k=k: rows[k].append(a[0].shape[0]))
                 for k, m in (("base", pipe.unet), ("student", student))]
        image = call("a red circle", generator=seeded(), output_type="np", **kwargs).images
        for h in hooks:
            h.remove()
        return image, rows

    # at most --few-step-max-steps steps: the student, one pass a step, with LCMScheduler
    image, rows = passes(pipe, num_inference_steps=4, guidance_scale=7.5)
    assert rows == {"base": [], "student": [1] * 4}
    by_hand = LatentDiffusionPipeline(**{**pipe.components, "unet": student,
                                         "scheduler": pipe.few_step.scheduler(pipe.scheduler.config)})
    by_hand.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(image, by_hand("a red circle", num_inference_steps=4, guidance_scale=7.5,
                                                 generator=seeded(), output_type="np").images)
    # more steps, a custom schedule, or use_few_step off: the model itself, with classifier-free guidance
    assert passes(pipe, num_inference_steps=7)[1] == {"base": [2] * 7, "student": []}
    from diffusers import DPMSolverMultistepScheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    assert passes(pipe, timesteps=[999, 500], guidance_scale=1.0)[1] == {"base": [1, 1], "student": []}
    pipe.use_few_step = False
    assert passes(pipe, num_inference_steps=4)[1] == {"base": [2] * 4, "student": []}


def test_few_step_weights_travel_with_the_unet_they_belong_to(tiny_pipe, tmp_path):
    student = _random_lora_student(tiny_pipe.unet)
    few_step.save(student, tmp_path / "source" / "few_step", rank=4, original_inference_steps=20)
    tiny_pipe.few_step = few_step.FewStep(tmp_path / "source" / "few_step")
    tiny_pipe.save_pretrained(tmp_path / "copy")
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "copy").few_step.config == tiny_pipe.few_step.config
    tiny_pipe.to(dtype=torch.float16).save_pretrained(tmp_path / "half")
    half = few_step.FewStep(tmp_path / "half" / "few_step")
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(half.folder / "adapter.safetensors").values()} == {torch.float16}
    # a U-Net written without them (a new U-Net) takes the old ones away; a save of other parts keeps them
    bare = LatentDiffusionPipeline.from_pretrained(tmp_path / "copy")
    bare.few_step = None
    bare.save_pretrained(tmp_path / "copy", components=("vae", "scheduler"))
    assert (tmp_path / "copy" / "few_step").is_dir()
    bare.save_pretrained(tmp_path / "copy", components=("unet", "scheduler"))
    assert LatentDiffusionPipeline.from_pretrained(tmp_path / "copy").few_step is None


def test_a_unet_with_guidance_distilled_in_is_traced_from_the_second_call_with_the_same_images(tiny_pipe):
    student = few_step.with_guidance_embedding(tiny_pipe.unet, 32)
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.normal_(0, 0.05)
    pipe = LatentDiffusionPipeline(**{**tiny_pipe.components, "unet": student,
                                      "scheduler": LCMScheduler.from_config(tiny_pipe.scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    pipe.compile_backend = "torch"
    call = lambda: pipe("a red circle", num_inference_steps=3, generator=seeded(), output_type="np").images  # noqa: E731
    images = [call() for _ in range(3)]
    assert len(pipe._traced_guided_unet._graphs) == 1
    pipe.use_tracing = False
    for image in images:
        np.testing.assert_array_equal(image, call())
