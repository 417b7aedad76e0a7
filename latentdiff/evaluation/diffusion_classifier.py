"""Does the model tell a caption from one a single edit away? The diffusion model as a zero-shot classifier (Li et
al. 2023, "Your diffusion model is secretly a zero-shot classifier"): an image's latent is noised at fixed timesteps
with fixed noise, each candidate caption is scored by the U-Net's denoising error under it (the ELBO's terms up to
weighting), and the caption with the lowest error is the model's reading of the image. Against the shapes world's
hard negatives — the same words bound the other way ("swap"), a relation or position turned round ("opposite") —
it measures what a text encoder must carry, through the model that reads it: a CLIP's pooled embedding can miss
what the U-Net's per-token states still hold, and the other way round.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import diffusion

KINDS = ("swap", "opposite")


@torch.no_grad()
def hard_negative_accuracy(pipe, images: torch.Tensor, captions: list[str], draws: int = 16, seed: int = 0,
                           kinds: tuple[str, ...] = KINDS, tasks: list[str] | None = None) -> dict:
    """For each image (N, 3, R, R) in [−1, 1] and each kind of hard negative: is its caption's denoising error below
    that of every negative of the kind? ("all": below every negative of every kind.) The same `draws` timesteps,
    stratified over the training range, and the same noise (seeded per image) for every caption of an image, so the
    comparison is paired. Returns the accuracy and the number of images counted, per kind; with each image's
    `tasks` ("single", "count", "relation"), the same per task too, under "by_task" (a turned relation and a turned
    position are both "opposite", and the easy one can hide the hard one)."""
    from ..data.shapes import hard_negatives
    from ..schedulers import DDPMScheduler

    unet, vae, device = pipe.unet, pipe.vae, pipe._execution_device
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = schedule.config.num_train_timesteps
    prediction_type = schedule.config.prediction_type
    t = ((torch.arange(draws) + 0.5) * steps / draws).long().to(device)  # (D,)
    wins: dict[str, list[bool]] = {kind: [] for kind in (*kinds, "all")}
    task_wins: dict[str, dict[str, list[bool]]] = {}
    for index, (image, caption) in enumerate(zip(images, captions)):
        negatives = {kind: texts for kind, texts in hard_negatives(caption).items() if kind in kinds and texts}
        if not negatives:
            continue
        texts = [caption] + [c for kind_texts in negatives.values() for c in kind_texts]
        states = pipe.encode_prompt(texts, device, 1, False)[0].to(unet.dtype)  # (M, L, D)
        latent = vae.encode(image[None].to(device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
        noise = torch.randn((draws, *latent.shape[1:]), generator=generator).to(device)  # (D, C, h, w)
        x0 = latent.expand(draws, -1, -1, -1)
        alpha_bar = schedule.schedule.alpha_bar(t, x0)
        noisy, target = diffusion.q_sample(x0, noise, alpha_bar), diffusion.training_target(x0, noise, alpha_bar,
                                                                                              prediction_type)
        errors = []
        for state in states:  # one U-Net call per caption, over the D draws
            output = unet(noisy.to(unet.dtype), t, encoder_hidden_states=state.expand(draws, -1, -1)).sample
            errors.append((output.float() - target).pow(2).mean().item())
        offset, won = 1, {}
        for kind, kind_texts in negatives.items():
            won[kind] = errors[0] < min(errors[offset: offset + len(kind_texts)])
            offset += len(kind_texts)
        won["all"] = all(won.values())
        for kind, value in won.items():
            wins[kind].append(value)
            if tasks is not None:
                task_wins.setdefault(tasks[index], {}).setdefault(kind, []).append(value)
    result = _rates(wins)
    return result | ({"by_task": {task: _rates(w) for task, w in sorted(task_wins.items())}} if tasks is not None else {})


def _rates(wins: dict[str, list[bool]]) -> dict:
    return {kind: (sum(v) / len(v) if v else None) for kind, v in wins.items()} | {
        f"{kind}_images": len(v) for kind, v in wins.items()}


def shapes_test_images(data_dir, n: int, seed: int = 0) -> dict[str, tuple[torch.Tensor, list[str], list[str]]]:
    """Images, first captions and tasks to test on, from a shapes data set with held-out pairs: "seen", n scenes freshly
    drawn (seed 1 000 003 + `seed`, not the set's own) without a held-out pair, and "unseen", the first n of its
    unseen prompts' scenes, rendered; both at the set's image size."""
    import numpy as np
    from PIL import Image

    from ..data.shapes import Scene, read_split, shapes_rows
    from .metrics import unseen_prompts

    data_dir = Path(data_dir)
    split = read_split(data_dir)
    size = Image.open(min(data_dir.glob("*.png"))).size[0]
    holdout = [tuple(pair.split(" ")) for pair in split["holdout"]]

    def tensor(pictures) -> torch.Tensor:
        arrays = [np.asarray(p.convert("RGB"), dtype=np.float32) / 127.5 - 1 for p in pictures]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)

    fresh = list(shapes_rows(n, size, seed=1_000_003 + seed, holdout=holdout))
    unseen = unseen_prompts(data_dir)[:n]
    return {"seen": (tensor([image for image, _ in fresh]), [meta["text"][0] for _, meta in fresh],
                     [meta["scene"]["task"] for _, meta in fresh]),
            "unseen": (tensor([Scene.from_dict(p.scene).render(size) for p in unseen]), [p.text for p in unseen],
                       [p.scene["task"] for p in unseen])}
