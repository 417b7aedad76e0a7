"""Stage 2: the KL-regularised autoencoder (Rombach et al. 2022, §3 and appendix G) from a preset.

    python training/train_vae.py --data data/emoji --preset small --output-dir runs/vae --model-dir runs/model

loss = reconstruction (L1 or L2, per pixel) + --kl-weight · KL / pixels, which is LDM's per-sample sums divided
by the pixel count (same optimum, gradient sizes that suit clipping), plus optional terms that need no downloaded
weights: a perceptual distance in the feature space of the project's own CLIP image tower (`--perceptual-weight`,
from MODEL_DIR/clip), and a PatchGAN (Isola et al. 2017) with the hinge loss and LDM's adaptive weight from
`--disc-start` on. At the end: PSNR on held-out images, a grid of originals over reconstructions, and
`scaling_factor` = 1 / std of the latents over training images (LDM §4.3.2), stored in the VAE's config.

`--finetune-decoder` continues MODEL_DIR/vae with its encoder frozen, as Stability's ft-MSE/ft-EMA decoders were
made: the latents, and so the scaling factor and every U-Net trained on them, stay as they were, while the images
decoded from them get sharper. The recipe's `decoder` stage runs it after the U-Net.
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .. import argparsing
from . import trainer
from ..data.loader import readable_batches
from ..images import image_grid
from ..model_folder import check_weights, write_component
from ..models import build_vae, load_preset


class Autoencode(nn.Module):
    """encode → sample → decode as one forward, so that DDP syncs its gradients and accelerate's autocast covers it
    (both wrap `forward` only; calling `vae.encode` on the prepared model would bypass them)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior.mean, posterior.logvar


def kl_to_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²) per sample (Kingma & Welling 2014, appendix B)."""
    return 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1 - logvar.float()).flatten(1).sum(1)


class PatchDiscriminator(nn.Module):
    """PatchGAN: a grid of real/fake logits, one per overlapping patch (Isola et al. 2017; taming/LDM's layout)."""

    def __init__(self, in_channels: int = 3, width: int = 64, layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers + 1):
            out = width * min(2**i, 8)
            blocks += [nn.Conv2d(channels, out, 4, 2 if i < layers else 1, 1, bias=False), nn.GroupNorm(8, out),
                       nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)  # (B, 1, h, w) logits


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, scale: float) -> torch.Tensor:
    """λ = ‖∇ L_rec‖ / (‖∇ L_G‖ + δ) at the decoder's last layer (Esser et al. 2021, eq. 7)."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach() * scale


class ClipPerceptualLoss(nn.Module):
    """Mean squared distance between unit-normalised token features of every layer of a frozen CLIP image tower."""

    def __init__(self, clip_dir: str | Path):
        super().__init__()
        from transformers import CLIPModel

        clip = CLIPModel.from_pretrained(clip_dir, use_safetensors=True, dtype=torch.float32)
        self.tower = clip.vision_model.eval().requires_grad_(False)
        self.size = self.tower.config.image_size

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        both = torch.cat([images, targets])
        if both.shape[-1] != self.size:
            both = F.interpolate(both, size=(self.size, self.size), mode="bilinear", align_corners=False)
        hidden = self.tower(pixel_values=both, output_hidden_states=True).hidden_states[1:]
        return sum(F.mse_loss(*F.normalize(h, dim=-1).chunk(2)) for h in hidden) / len(hidden)


def foreground_weights(x: torch.Tensor, weight: float, threshold: float = 0.1) -> torch.Tensor:
    """(B, 1, H, W) per-pixel loss weights: `weight` where a pixel stands apart from its image's background (the
    median colour of the image border, as the shapes oracle reads it), 1 elsewhere. On flat backgrounds a small
    object is a few % of the pixels, so an unweighted mean lets it fade; this keeps its edges and colour in the loss.
    `threshold` is the RGB distance (pixels in [−1, 1]) that counts as apart."""
    border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)  # (B, 3, 4W)
    background = border.median(dim=-1).values[..., None, None]  # (B, 3, 1, 1)
    apart = ((x - background).norm(dim=1, keepdim=True) > threshold).float()
    apart = F.max_pool2d(apart, 3, stride=1, padding=1)  # and one pixel around: both sides of every edge
    return 1 + (weight - 1) * apart


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, kind: str, foreground_weight: float = 1.0) -> torch.Tensor:
    """Per-pixel L1 or L2, averaged with `foreground_weights` (a plain mean when the weight is 1)."""
    error = (rec - x).abs() if kind == "l1" else (rec - x).pow(2)
    if foreground_weight == 1:
        return error.mean()
    weights = foreground_weights(x, foreground_weight)
    return (error * weights).sum() / (weights.sum() * x.shape[1])


def psnr(images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per image, for pixel values in [−1, 1] mapped to [0, 1]: 10 log10(1 / MSE)."""
    mse = ((images.clamp(-1, 1) - targets) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp(min=1e-10))


@torch.no_grad()
def evaluate(vae, dataset, device, batch_size: int = 32) -> tuple[float, list, list]:
    """Mean held-out PSNR (posterior mode), and up to 8 originals and reconstructions as uint8 arrays."""
    scores, shown = [], ([], [])
    for _, pixels in readable_batches(dataset, batch_size):
        x = pixels.to(device)
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
        scores.append(psnr(rec, x))
        for source, images in zip(shown, (x, rec)):
            source += [((im.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
                       for im in images[: 8 - len(source)]]
    return torch.cat(scores).mean().item(), *shown


@torch.no_grad()
def latent_scaling_factor(vae, loader, device, max_images: int = 512) -> float:
    """1 / std of posterior samples over up to `max_images` training images (LDM §4.3.2)."""
    latents, seen = [], 0
    for batch in loader:
        if not len(batch["pixel_values"]):  # no image of the batch could be read
            continue
        latents.append(vae.encode(batch["pixel_values"].to(device)).latent_dist.sample().float().cpu())
        seen += len(latents[-1])
        if seen >= max_images:
            break
    if not latents:
        raise ValueError("no training image could be read to measure the latents' scale")
    return 1.0 / torch.cat(latents).std().item()


def held_out_round_trip(vae, holdout, resolution: int, device) -> dict:
    """`evaluation.round_trip_oracle` over the held-out scenes that decode and are drawn at the VAE's resolution (the
    oracle reads a scene's boxes in the pixels it was drawn at, so a resized scene would be misread)."""
    from PIL import Image

    from ..evaluation.metrics import round_trip_oracle

    images, scenes = [], []
    for index in range(len(holdout)):
        value = holdout.dataset[index][holdout.image_column]
        try:
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            image.load()
        except (OSError, ValueError):  # the loader already skips and counts unreadable images
            continue
        if image.size == (resolution, resolution):
            images.append(image)
            scenes.append(holdout.dataset[index]["scene"])
    if not images:
        return {"skipped": f"no readable held-out scene is drawn at the VAE's resolution ({resolution} px)"}
    return round_trip_oracle(vae, images, scenes, device)


def load_vae_to_finetune(folder: Path) -> nn.Module:
    """The trained VAE in `folder`, in float32, with the encoder side (encoder, quant_conv) frozen."""
    from diffusers import AutoencoderKL

    if not (folder / "config.json").is_file():
        raise ValueError(f"--finetune-decoder continues a trained VAE, but {folder} holds none (run the vae stage first)")
    check_weights(folder)
    vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, torch_dtype=torch.float32)
    vae.encoder.requires_grad_(False)
    if vae.quant_conv is not None:
        vae.quant_conv.requires_grad_(False)
    return vae


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.parser(None, __doc__)
    parser.add_argument("--preset", default="small", help="architecture: tiny, small, base or a JSON file")
    parser.add_argument("--model-dir", default=None, help="where vae/ goes; its clip/ serves the perceptual loss (default: OUTPUT_DIR/model)")
    parser.add_argument("--reconstruction-loss", choices=("l1", "l2"), default="l1", help="pixel loss")
    parser.add_argument("--foreground-weight", type=float, default=1.0,
                        help="loss weight of pixels apart from the image's border colour (1: plain mean)")
    parser.add_argument("--kl-weight", type=float, default=1e-6, help="weight of the KL term on the latents")
    parser.add_argument("--perceptual-weight", type=float, default=0.0, help="needs MODEL_DIR/clip (0: off)")
    parser.add_argument("--disc-weight", type=float, default=0.0, help="PatchGAN weight (0: off)")
    parser.add_argument("--disc-start", type=int, default=1000, help="first step of the adversarial term")
    parser.add_argument("--finetune-decoder", action="store_true",
                        help="train only the decoder of MODEL_DIR/vae (encoder frozen: latents unchanged)")
    trainer.add_common_args(parser, lr=1e-4, batch_size=16, max_steps=3000)
    return parser


def check_args(args) -> None:
    """The flags' own rules, checked before anything loads (recipes check them before any stage runs)."""
    trainer.check_args(args)
    for name in ("kl_weight", "perceptual_weight", "disc_weight", "disc_start"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 0, got {getattr(args, name)}")
    if not args.foreground_weight > 0:
        raise ValueError(f"--foreground-weight must be > 0, got {args.foreground_weight}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    accelerator, model_dir = trainer.start(args, "train_vae")
    if args.finetune_decoder:  # the VAE's own size, not the preset's
        vae = load_vae_to_finetune(model_dir / "vae")
        resolution = args.resolution or vae.config.sample_size
    else:
        preset = load_preset(args.preset)
        vae, resolution = build_vae(preset), args.resolution or preset["resolution"]
    train_set, holdout = trainer.split_dataset(args, resolution)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    trainable = [p for p in vae.parameters() if p.requires_grad]
    models, groups = [Autoencode(vae)], [{"params": trainable, "lr": args.learning_rate}]
    disc = PatchDiscriminator() if args.disc_weight > 0 else None
    if disc is not None:  # one optimizer: the discriminator's loss only reaches its own parameters (see step)
        models.append(disc)
        groups.append({"params": disc.parameters(), "lr": args.learning_rate})
    perceptual = None
    if args.perceptual_weight > 0:
        if not (model_dir / "clip" / "config.json").is_file():
            raise ValueError(f"--perceptual-weight needs a trained CLIP in {model_dir / 'clip'} (run train_clip first)")
        perceptual = ClipPerceptualLoss(model_dir / "clip").to(accelerator.device)
    optimizer = torch.optim.AdamW(groups, betas=(0.5, 0.9), weight_decay=args.weight_decay)
    loader = trainer.make_loader(train_set, args)
    *models, optimizer, lr_scheduler, loader = trainer.prepare(
        accelerator, *models, optimizer, trainer.make_lr_scheduler(optimizer, args), loader=loader)
    raw_vae = accelerator.unwrap_model(models[0]).vae
    progress = trainer.Progress()

    def step(batch):
        x = batch["pixel_values"]
        rec, mean, logvar = models[0](x)
        rec = rec.float()
        rec_loss = reconstruction_loss(rec, x, args.reconstruction_loss, args.foreground_weight)
        kl = kl_to_standard_normal(mean, logvar).mean() / x[0].numel()
        nll = rec_loss + (args.perceptual_weight * perceptual(rec, x) if perceptual is not None else 0)
        loss, logs = nll + args.kl_weight * kl, {"train/rec": rec_loss.item(), "train/kl": kl.item()}
        if disc is not None and progress.step >= args.disc_start:
            raw_disc = accelerator.unwrap_model(models[1])
            frozen = {k: v.detach() for k, v in raw_disc.named_parameters()}
            g_loss = -functional_call(raw_disc, frozen, (rec,)).mean()  # gradient reaches the VAE only
            weight = adaptive_weight(nll, g_loss, raw_vae.decoder.conv_out.weight, args.disc_weight)
            d_loss = hinge_d_loss(models[1](x.detach()), models[1](rec.detach()))  # reaches the discriminator only
            loss = loss + weight * g_loss + d_loss
            logs.update({"train/g_loss": g_loss.item(), "train/d_loss": d_loss.item(), "train/d_weight": weight.item()})
        return loss, logs

    trainer.train(accelerator, args, models, optimizer, lr_scheduler, loader, step, progress=progress)
    summary = progress.summary()
    if accelerator.is_main_process:
        raw_vae.eval()
        if not args.finetune_decoder:  # a frozen encoder keeps its latents, and so their scale
            raw_vae.register_to_config(scaling_factor=latent_scaling_factor(raw_vae, loader, accelerator.device))
        summary["scaling_factor"] = raw_vae.config.scaling_factor
        if holdout is not None:
            summary["holdout_psnr"], originals, reconstructions = evaluate(raw_vae, holdout, accelerator.device)
            from PIL import Image

            grid = image_grid([Image.fromarray(a) for a in originals + reconstructions], cols=len(originals))
            grid.save(Path(args.output_dir) / "reconstructions.png")
            accelerator.log({"eval/psnr": summary["holdout_psnr"]}, step=progress.step)
            accelerator.print(f"held-out PSNR {summary['holdout_psnr']:.2f} dB; scaling_factor "
                              f"{summary['scaling_factor']:.4f}; grid in {args.output_dir}/reconstructions.png")
        write_component(model_dir / "vae", lambda folder: raw_vae.save_pretrained(folder, max_shard_size="15MB"))
        if holdout is not None and "scene" in holdout.dataset.column_names:  # shapes: what survives the round trip
            summary["round_trip_oracle"] = held_out_round_trip(raw_vae, holdout, resolution, accelerator.device)
            accelerator.print(f"held-out oracle mean after the round trip "
                              f"{summary['round_trip_oracle'].get('round_trip', {}).get('mean', float('nan')):.3f}")
        trainer.write_summary(args.output_dir, summary)
    accelerator.end_training()
    return summary



