"""Train a noise-aware classifier p_φ(y | x_t) on a model's latents, for classifier guidance (Dhariwal & Nichol
2021): `python training/train_classifier.py --model MODEL --data DATA --label shapes:colour --output-dir RUN`.

Each step encodes a batch of images with the model's VAE (posterior mean × scaling factor: the x_0 the U-Net was
trained on; with --cache-latents every training image is encoded once, in memory, and the steps see the same x_0),
draws t uniformly and noises them with the model's own schedule, x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε, and
minimises the cross-entropy of the label. Labels come from the data: `shapes:colour` / `shapes:shape` (a shapes
scene whose objects all share that attribute; other scenes are left out) or `column:NAME` (any column of strings
or integers). The classifier (`NoisyLatentClassifier`, a small convolutional net with a timestep embedding) is
written to OUTPUT_DIR/classifier with its class names, for classifier guidance in sampling:
`pipe(prompt, classifier=OUTPUT_DIR/classifier, classifier_label=..., classifier_scale=s)`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .. import argparsing, diffusion
from ..model_folder import write_component
from ..classifier import NoisyLatentClassifier
from . import trainer

__all__ = ["NoisyLatentClassifier", "accuracy_by_time", "labels_of", "main"]


def labels_of(dataset, spec: str) -> tuple[list[int], list[str]]:
    """Per row: the label's index (−1: left out), and the class names, from `shapes:colour|shape` or `column:NAME`."""
    kind, _, name = spec.partition(":")
    if kind == "shapes" and name in ("colour", "shape"):
        if "scene" not in dataset.column_names:
            raise ValueError(f"--label {spec} needs shapes scenes (a 'scene' column); this data set has "
                             f"{dataset.column_names}")
        values = []
        for scene in dataset["scene"]:
            found = {o[name] for o in scene["objects"]}
            values.append(found.pop() if len(found) == 1 else None)
    elif kind == "column" and name:
        if name not in dataset.column_names:
            raise ValueError(f"--label column:{name}: no such column; the columns are {dataset.column_names}")
        values = [None if v is None else str(v) for v in dataset[name]]
    else:
        raise ValueError(f"--label must be shapes:colour, shapes:shape or column:NAME, got {spec!r}")
    classes = sorted({v for v in values if v is not None})
    if len(classes) < 2:
        raise ValueError(f"--label {spec} gives {len(classes)} class(es) in this data; a classifier needs 2 or more")
    index = {c: i for i, c in enumerate(classes)}
    return [index[v] if v is not None else -1 for v in values], classes


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.parser(None, __doc__)
    parser.add_argument("--model", required=True, help="model folder whose vae/ and scheduler/ the classifier serves")
    parser.add_argument("--label", required=True, help="shapes:colour, shapes:shape or column:NAME")
    parser.add_argument("--width", type=int, default=64, help="channels of the classifier (default: 64)")
    parser.add_argument("--cache-latents", action="store_true",
                        help="encode every training image once, in memory (C·h·w floats an image), instead of every "
                             "step: the same x_0 (the posterior mean), far fewer VAE passes; not with --random-crop "
                             "or --random-flip")
    trainer.add_common_args(parser, lr=1e-3, batch_size=64, max_steps=2000)
    return parser


@torch.no_grad()
def accuracy_by_time(classifier, vae, schedule, holdout, labels: list[int], device, times=(0, 250, 500, 750, 999),
                     seed: int = 0) -> dict:
    """Held-out accuracy at fixed noise levels t (the same noise for every classifier: a fixed seed)."""
    from ..data.loader import readable_batches

    scaling = vae.config.scaling_factor
    correct = {t: 0 for t in times}
    total = 0
    generator = torch.Generator().manual_seed(seed)
    for rows, pixels in readable_batches(holdout, 64):
        y = torch.tensor([labels[i] for i in rows])
        keep = y >= 0
        if not keep.any():
            continue
        x0 = vae.encode(pixels[keep].to(device)).latent_dist.mean * scaling
        total += int(keep.sum())
        for t in times:
            noise = torch.randn(x0.shape, generator=generator).to(device)
            alpha_bar = schedule.alphas_cumprod[t].to(device)
            x_t = diffusion.q_sample(x0, noise, alpha_bar)
            correct[t] += int((classifier(x_t, torch.full((len(x_t),), t, device=device)).argmax(1).cpu()
                               == y[keep]).sum())
    return {str(t): correct[t] / total for t in times} if total else {}


class EncodedImages(torch.utils.data.Dataset):
    """The training images encoded once: items {"x0" (C, h, w), "index" (the data set's row, for its label)}."""

    def __init__(self, vae, dataset, device, batch_size: int = 64):
        from ..data.loader import readable_batches

        latents, rows = [], []
        with torch.no_grad():
            for kept, pixels in readable_batches(dataset, batch_size):
                latents.append(vae.encode(pixels.to(device)).latent_dist.mean.cpu() * vae.config.scaling_factor)
                rows += kept
        self.latents, self.rows = torch.cat(latents), rows
        self.skipped = len(dataset) - len(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return {"x0": self.latents[index], "index": self.rows[index]}


def collate_encoded(items: list[dict]) -> dict:
    return {"x0": torch.stack([i["x0"] for i in items]), "indices": torch.tensor([i["index"] for i in items]),
            "skipped": 0}


def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKL

    from ..schedulers import DDPMScheduler

    args = build_parser().parse_args(argv)
    trainer.check_args(args)
    if args.width < 8 or args.width % 8:
        raise ValueError(f"--width must be a positive multiple of 8, got {args.width}")
    if args.cache_latents and (args.random_crop or args.random_flip):
        raise ValueError("--cache-latents stores one encoding per image: drop --random-crop / --random-flip")
    accelerator = trainer.make_accelerator(args, "train_classifier")
    model = Path(args.model)
    vae = AutoencoderKL.from_pretrained(model / "vae").to(accelerator.device).eval().requires_grad_(False)
    schedule = DDPMScheduler.from_config(DDPMScheduler.load_config(model / "scheduler"))
    resolution = args.resolution or vae.config.sample_size
    train_set, holdout = trainer.split_dataset(args, resolution)
    if not hasattr(train_set, "dataset"):
        raise ValueError(f"train_classifier reads an imagefolder or save_to_disk folder; --data {args.data} is shards")
    train_labels, classes = labels_of(train_set.dataset, args.label)
    held_labels = labels_of(holdout.dataset, args.label)[0] if holdout is not None else []
    classifier = NoisyLatentClassifier(vae.config.latent_channels, args.width, tuple(classes),
                                       schedule.config.num_train_timesteps)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    if args.cache_latents:
        encoded = EncodedImages(vae, train_set, accelerator.device)
        if encoded.skipped:
            accelerator.print(f"--cache-latents: {encoded.skipped} unreadable image(s) left out")
        loader = trainer.make_loader(encoded, args, collate_fn=collate_encoded)
    else:
        loader = trainer.make_loader(train_set, args)
    classifier, optimizer, lr_scheduler, loader = trainer.prepare(
        accelerator, classifier, optimizer, trainer.make_lr_scheduler(optimizer, args), loader=loader)
    table = torch.tensor(train_labels)
    alphas_cumprod = schedule.alphas_cumprod.to(accelerator.device)
    scaling = vae.config.scaling_factor

    def step(batch):
        y = table[batch["indices"].cpu()].to(accelerator.device)
        if args.cache_latents:
            x0 = batch["x0"]
        else:
            with torch.no_grad():
                x0 = vae.encode(batch["pixel_values"]).latent_dist.mean * scaling
        t = torch.randint(0, len(alphas_cumprod), (len(x0),), device=x0.device)
        x_t = diffusion.q_sample(x0, torch.randn(x0.shape, device=x0.device), diffusion.broadcast_to(
            alphas_cumprod[t], x0))
        logits = classifier(x_t, t)
        loss = torch.nn.functional.cross_entropy(logits.float(), y, ignore_index=-1)
        if not (y >= 0).any():
            loss = logits.sum() * 0  # a batch without a labelled row: no signal, but every process steps together
        return loss, {}

    progress = trainer.train(accelerator, args, [classifier], optimizer, lr_scheduler, loader, step)
    summary = {**progress.summary(), "classes": classes, "label": args.label}
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(classifier).eval()
        if holdout is not None:
            summary["holdout_accuracy"] = accuracy_by_time(raw, vae, schedule, holdout, held_labels,
                                                           accelerator.device)
            summary["chance"] = 1 / len(classes)
            accelerator.print(f"held-out accuracy by t: {json.dumps(summary['holdout_accuracy'])} (chance "
                              f"{summary['chance']:.3f})")
        out = Path(args.output_dir) / "classifier"
        write_component(out, lambda folder: raw.save_pretrained(folder))
        summary["classifier"] = str(out)
        trainer.write_summary(args.output_dir, summary)
    accelerator.end_training()
    return summary
