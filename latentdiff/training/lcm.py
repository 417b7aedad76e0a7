"""Latent consistency distillation (LCM, Luo et al. 2023, after consistency models, Song et al. 2023): a student
U-Net learns to map any point of the teacher's guided probability-flow ODE trajectory straight to its end, so
that 1-4 steps of `LCMScheduler` give what the teacher gives in 25. The guidance scale is distilled in: the
student takes w = s − 1 as an embedding (`time_cond_proj_dim`), which the pipeline passes for it
(`pipelines/guidance.py`, EmbeddedGuidance), so a guided step costs one U-Net pass, not two.

    python training/distill_lcm.py --model TEACHER --data DATA --output-dir runs/lcm --max-steps 2000

--model is a whole pipeline folder (the teacher: its U-Net, text encoder and VAE stay frozen); the student starts as
a copy of its U-Net with a zero-initialised guidance embedding, so before training it computes what the teacher
does. Each step (Algorithm 1 of the LCM paper, with a DDIM solver of --num-ddim-timesteps steps over the training
schedule; k = T / N):
  x_t   = √ᾱ_t x_0 + √(1 − ᾱ_t) ε,  t = t_n of the solver's schedule, n and w ~ U[w_min, w_max] drawn per sample
  x_s   = a DDIM step of the teacher's guided prediction from t to s = t − k (x̂_0 and ε̂ guided as
          c + w (c − u), the paper's form of classifier-free guidance)
  loss  = Huber(f_θ(x_t, t, w),  f_θ⁻(x_s, s, w)),  f(x, t) = c_skip(t) x + c_out(t) x̂_0(x, t)
with θ⁻ an exponential moving average of θ (--target-decay), c_skip and c_out the boundary conditions of LCMScheduler
(σ_data = 0.5, timesteps scaled by 10), so f is the identity at t = 0. Latents and text states come from the same
cache as the U-Net stage (`unet.py`, --cache-latents). The student, with the target's weights, and an
LCMScheduler are written with the teacher's other parts to --model-dir.

With --lora-rank R (LCM-LoRA, Luo et al. 2023b) only a LoRA of rank R and the guidance embedding train, the teacher's
weights frozen inside the student; --model-dir then gets the teacher's pipeline with the student as its few-step
weights (`few_step/`, `pipelines/few_step.py`), which the pipeline uses by itself for calls of at most
--few-step-max-steps steps. That is how the shipped model carries its few-step weights within its size limit.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from diffusers import LCMScheduler
from diffusers.training_utils import EMAModel

from .. import argparsing, diffusion
from . import trainer
from .unet import cached_latents, collate_cached, sample_cached_latents
from ..model_folder import vae_scale_factor
from ..pipelines import few_step
from ..pipelines.guidance import guidance_embedding
from ..pipelines.text_to_image import LatentDiffusionPipeline
from ..schedulers import DDPMScheduler

SIGMA_DATA, TIMESTEP_SCALING = 0.5, 10.0  # LCMScheduler's boundary-condition constants


def boundary_scalings(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip(t), c_out(t)) with c_skip(0) = 1, c_out(0) = 0: the consistency function is the identity at t = 0."""
    scaled = TIMESTEP_SCALING * t.double()
    c_skip = SIGMA_DATA ** 2 / (scaled ** 2 + SIGMA_DATA ** 2)
    c_out = scaled / (scaled ** 2 + SIGMA_DATA ** 2) ** 0.5
    return c_skip.float(), c_out.float()


def solver_timesteps(num_train_timesteps: int, steps: int) -> torch.Tensor:
    """The DDIM solver's timesteps t_n = (n + 1) k − 1, n = 0 … N − 1, k = T / N (LCMScheduler's origin steps)."""
    k = num_train_timesteps // steps
    return torch.arange(1, steps + 1) * k - 1


def consistency_loss(student, target, teacher, schedule: diffusion.NoiseSchedule, latents: torch.Tensor,
                     text: torch.Tensor, uncond: torch.Tensor, args, prediction_type: str) -> torch.Tensor:
    """One LCM distillation loss on latents (B, C, h, w) with text states (B, L, D) and the empty text's (1, L, D)."""
    batch, device = len(latents), latents.device
    timesteps = solver_timesteps(len(schedule), args.num_ddim_timesteps).to(device)
    k = len(schedule) // args.num_ddim_timesteps
    t = timesteps[torch.randint(0, args.num_ddim_timesteps, (batch,), device=device)]
    s = (t - k).clamp(min=0)
    noise = torch.randn(latents.shape, device=device, dtype=latents.dtype)
    alpha_t, alpha_s = schedule.alpha_bar(t, latents), schedule.alpha_bar(s, latents)
    x_t = diffusion.q_sample(latents, noise, alpha_t)
    w = args.w_min + (args.w_max - args.w_min) * torch.rand(batch, device=device)
    w_embedding = guidance_embedding(w.cpu(), target.config.time_cond_proj_dim).to(device, latents.dtype)  # target:
    # never wrapped by accelerate (the student may be a DistributedDataParallel, which has no .config)
    w = diffusion.broadcast_to(w, latents)

    def consistency(unet, x, timestep, alpha_bar):
        output = unet(x, timestep, encoder_hidden_states=text, timestep_cond=w_embedding).sample
        x0, _ = diffusion.split_model_output(output, x, alpha_bar, prediction_type)
        c_skip, c_out = (diffusion.broadcast_to(c, x) for c in boundary_scalings(timestep))
        return c_skip * x + c_out * x0

    prediction = consistency(student, x_t, t, alpha_t)
    with torch.no_grad():
        both = teacher(torch.cat([x_t, x_t]), torch.cat([t, t]),
                       encoder_hidden_states=torch.cat([text, uncond.expand_as(text)])).sample
        (x0_c, eps_c), (x0_u, eps_u) = (diffusion.split_model_output(o, x_t, alpha_t, prediction_type)
                                        for o in both.chunk(2))
        x0, eps = x0_c + w * (x0_c - x0_u), eps_c + w * (eps_c - eps_u)
        x_s = alpha_s.sqrt() * x0 + (1 - alpha_s).sqrt() * eps  # the DDIM step (η = 0) from t to s
        goal = consistency(target, x_s, s, alpha_s)
    difference = (prediction.float() - goal.float()) ** 2
    return torch.mean(torch.sqrt(difference + args.huber_c ** 2) - args.huber_c)


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.parser(None, __doc__)
    parser.add_argument("--model", required=True, help="the teacher: a whole pipeline folder")
    parser.add_argument("--model-dir", default=None, help="where the distilled pipeline goes (default: OUTPUT_DIR/model)")
    parser.add_argument("--num-ddim-timesteps", type=int, default=50, help="the DDIM solver's steps N (default: 50)")
    parser.add_argument("--w-min", type=float, default=2.0, help="smallest guidance weight w = s − 1 distilled (default: 2)")
    parser.add_argument("--w-max", type=float, default=14.0, help="largest guidance weight w = s − 1 distilled (default: 14)")
    parser.add_argument("--huber-c", type=float, default=0.001, help="the Huber loss's c (default: 0.001)")
    parser.add_argument("--target-decay", type=float, default=0.95, help="EMA decay of the target network (default: 0.95)")
    parser.add_argument("--time-cond-proj-dim", type=int, default=256, help="width of the guidance embedding (default: 256)")
    parser.add_argument("--lora-rank", type=int, default=0,
                        help="train a LoRA of this rank (LCM-LoRA) and the guidance embedding instead of the whole "
                             "U-Net, and write them as the model's few_step/ folder too (default: 0, the whole U-Net)")
    parser.add_argument("--few-step-max-steps", type=int, default=8,
                        help="with --lora-rank: the pipeline uses the few-step weights for calls of at most this "
                             "many steps (default: 8)")
    parser.add_argument("--cache-dir", default=None, help="the latent cache (default: ~/.cache/latentdiff)")
    trainer.add_common_args(parser, lr=1e-4, batch_size=32, max_steps=2000)
    return parser


def check_args(args) -> None:
    trainer.check_args(args)
    if args.num_ddim_timesteps < 1:
        raise ValueError(f"--num-ddim-timesteps must be ≥ 1, got {args.num_ddim_timesteps}")
    if not 0 <= args.w_min <= args.w_max:
        raise ValueError(f"--w-min and --w-max must satisfy 0 ≤ w-min ≤ w-max, got {args.w_min} and {args.w_max}")
    if not 0 <= args.target_decay < 1:
        raise ValueError(f"--target-decay must be in [0, 1), got {args.target_decay}")
    if args.lora_rank < 0 or args.few_step_max_steps < 1:
        raise ValueError(f"--lora-rank must be ≥ 0 and --few-step-max-steps ≥ 1, got {args.lora_rank} and "
                         f"{args.few_step_max_steps}")
    if args.huber_c <= 0 or args.time_cond_proj_dim < 1:
        raise ValueError(f"--huber-c must be > 0 and --time-cond-proj-dim ≥ 1, got {args.huber_c} and "
                         f"{args.time_cond_proj_dim}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    if not args.lora_rank and Path(args.model_dir or Path(args.output_dir) / "model").resolve() == \
            Path(args.model).resolve():
        raise ValueError(f"--model-dir must differ from --model {args.model!r}: the whole student would replace its "
                         "teacher (with --lora-rank the student is added to the teacher's folder as few_step/)")
    accelerator, model_dir = trainer.start(args, "distill_lcm")
    device = accelerator.device
    teacher_pipe = LatentDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    vae, text_encoder, tokenizer = teacher_pipe.vae, teacher_pipe.text_encoder, teacher_pipe.tokenizer
    teacher = teacher_pipe.unet.requires_grad_(False).eval().to(device)
    for part in (vae, text_encoder):
        part.requires_grad_(False).to(device)
    schedule = DDPMScheduler.from_config(teacher_pipe.scheduler.config).schedule
    if args.num_ddim_timesteps > len(schedule):
        raise ValueError(f"--num-ddim-timesteps must be at most the schedule's {len(schedule)} steps")
    prediction_type = teacher_pipe.scheduler.config.prediction_type
    student = few_step.with_guidance_embedding(teacher, args.time_cond_proj_dim).to(device).train()
    if args.lora_rank:  # LCM-LoRA: the base frozen, a LoRA and the guidance embedding trained
        student.requires_grad_(False)
        few_step.add_lora(student, args.lora_rank)
        student.time_embedding.cond_proj.requires_grad_(True)
    target = copy.deepcopy(student).requires_grad_(False).eval()
    # the target network θ⁻ is the EMA the trainer keeps (and checkpoints) of the student; diffusers' EMAModel ramps
    # its decay up as (1 + n) / (10 + n) to --target-decay (frozen weights are copied as they are)
    ema = EMAModel(student.parameters(), decay=args.target_decay)

    resolution = args.resolution or teacher.config.sample_size * vae_scale_factor(vae.config)
    train_set, _ = trainer.split_dataset(args, resolution)
    if not hasattr(train_set, "dataset"):
        raise ValueError(f"distillation reads an imagefolder or save_to_disk folder; --data {args.data} is shards, "
                         "which only the three training stages stream so far")
    cached = cached_latents(accelerator, args, train_set, resolution, vae, text_encoder, tokenizer)
    text_table, scaling = cached.text.to(device), vae.config.scaling_factor
    loader = trainer.make_loader(cached, args, collate_fn=collate_cached)
    ema.to(device)
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=args.weight_decay)
    student, optimizer, lr_scheduler, loader = trainer.prepare(
        accelerator, student, optimizer, trainer.make_lr_scheduler(optimizer, args), loader=loader)

    def step(batch):
        ema.copy_to(target.parameters())
        latents = sample_cached_latents(batch, scaling)
        loss = consistency_loss(student, target, teacher, schedule, latents, text_table[batch["text_ids"]],
                                text_table[:1], args, prediction_type)
        return loss, {}

    progress = trainer.train(accelerator, args, [student], optimizer, lr_scheduler, loader, step, ema=ema)
    summary = progress.summary()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(student)
        ema.copy_to(raw.parameters())  # the target network is the one that samples
        if args.lora_rank:  # the teacher's pipeline, with the student beside it as few-step weights
            if Path(model_dir).resolve() != Path(args.model).resolve():
                LatentDiffusionPipeline(**teacher_pipe.components).save_pretrained(model_dir)
            summary["few_step"] = str(few_step.save(
                raw, Path(model_dir) / few_step.FOLDER, args.lora_rank, args.num_ddim_timesteps,
                args.few_step_max_steps, (1 + args.w_min, 1 + args.w_max)))
        else:
            LatentDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=raw, clip=teacher_pipe.clip,
                scheduler=LCMScheduler.from_config(teacher_pipe.scheduler.config,
                                                   original_inference_steps=args.num_ddim_timesteps)
            ).save_pretrained(model_dir)
        summary["model"] = str(model_dir)
        trainer.write_summary(args.output_dir, summary)
    accelerator.end_training()
    return summary

