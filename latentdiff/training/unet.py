"""Stage 3: the U-Net, trained to denoise VAE latents conditioned on the frozen text encoder (LDM, eq. 2), with
the caption dropped to "" for a fraction of samples so that one network serves classifier-free guidance.

    python training/train_unet.py --data data/emoji --model runs/model --preset small --output-dir runs/unet

--model holds tokenizer/, text_encoder/ and vae/ (and clip/, carried along). Without unet/ in it, the U-Net is
built from --preset (from scratch); with unet/ it is fine-tuned, fully or through a LoRA of --lora-rank (peft),
saved as pytorch_lora_weights.safetensors for `pipe.load_lora_weights`. The whole pipeline folder is written to
--model-dir at the end, with the EMA weights when --use-ema is on.
--cache-latents encodes the data once (posterior mean and std per image, text hidden states per distinct
caption) into a safetensors file named by a hash of the VAE's encoder side, text encoder, tokenizer, data and resolution, so
it is reused across epochs and runs and never used for another model or data set. The main process builds it
while the others wait (keep --cache-dir on a shared disk for several machines; build it once beforehand with a
single process for very large data, where the wait could pass the process group's timeout).
--train-text-encoder trains the text encoder with the U-Net on the diffusion loss (as LDM trained its text
transformer jointly, and as diffusers' DreamBooth scripts do with --train_text_encoder), at --text-encoder-lr; the
EMA then follows both, and both are saved. Its cache holds latents only: the text states change every step.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.training_utils import EMAModel
from PIL import Image
from transformers import CLIPModel, CLIPTextModel, CLIPTokenizer

from .. import argparsing, diffusion
from . import trainer
from .clip import tokenize
from ..data.loader import caption_groups, item_generator, readable_batches
from ..images import image_grid
from ..model_folder import check_weights, load_scheduler
from ..files import write_atomically
from ..model_folder import vae_scale_factor, with_config
from ..models import build_scheduler, build_unet, load_preset
from ..pipelines.text_to_image import LatentDiffusionPipeline
from ..schedulers import DDIMScheduler, DDPMScheduler

DEFAULT_PROMPTS = ["a red circle", "two blue squares", "a tiger", "a red apple"]


# 1. Latent and text-embedding cache -------------------------------------------------------------------------------

def _fingerprint(*modules: torch.nn.Module, skip: tuple[str, ...] = ()) -> str:
    """A hash of the modules' configs and of their weights, but for those whose names start with `skip`."""
    digest = hashlib.sha256()
    for module in modules:
        config = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(module.state_dict().items()):
            if name.startswith(skip):
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def encoders_fingerprint(vae, text_encoder, tokenizer) -> str:
    """What a cache of latents and text states depends on besides the data: the VAE's encoder side (a fine-tuned
    decoder, train_vae --finetune-decoder, keeps the cache), the text encoder (None: a cache of latents only), and
    the tokenizer's vocabulary, merges, normalisation and context (not the padding and truncation a previous call
    left set on it)."""
    digest = hashlib.sha256()
    digest.update(_fingerprint(vae, skip=("decoder.", "post_quant_conv.")).encode())
    digest.update(b"latents only" if text_encoder is None else _fingerprint(text_encoder).encode())
    backend = {k: v for k, v in json.loads(tokenizer.backend_tokenizer.to_str()).items()
               if k not in ("padding", "truncation")}
    digest.update(json.dumps(backend, sort_keys=True).encode())
    digest.update(str(tokenizer.model_max_length).encode())
    return digest.hexdigest()


def cache_path(cache_dir: Path, vae, text_encoder, tokenizer, dataset, resolution: int) -> Path:
    """Where the cache for exactly this VAE, text encoder, tokenizer, data and resolution lives."""
    digest = hashlib.sha256(encoders_fingerprint(vae, text_encoder, tokenizer).encode())
    digest.update(f"{dataset.dataset._fingerprint}|{dataset.image_column}|{dataset.caption_column}|{resolution}".encode())
    return cache_dir / f"latents-{digest.hexdigest()[:24]}.safetensors"


def cache_texts(dataset) -> list[str]:
    """The distinct captions of `dataset`, "" first, in the order a cache numbers them (its `caption_ids`)."""
    return list(dict.fromkeys([""] + [t for group in caption_groups(dataset) for t in group]))


@torch.no_grad()
def build_cache(path: Path, dataset, vae, text_encoder, tokenizer, device, batch_size: int = 32) -> None:
    """Encode every image (posterior mean, std) and every distinct caption ("" first) once, to `path`; with
    `text_encoder` None the captions are only numbered (cache_texts), for a text encoder that trains."""
    from safetensors.torch import save_file

    captions = caption_groups(dataset)
    texts = cache_texts(dataset)
    text_id = {t: i for i, t in enumerate(texts)}
    means, stds, keep = [], [], []
    for rows, pixels in readable_batches(dataset, batch_size):
        posterior = vae.encode(pixels.to(device)).latent_dist
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        keep += rows
    hidden = torch.zeros(0) if text_encoder is None else torch.cat(
        [text_encoder(tokenize(tokenizer, texts[i: i + batch_size], device))[0].cpu()
         for i in range(0, len(texts), batch_size)])
    ids = [text_id[t] for i in keep for t in captions[i]]
    offsets = torch.tensor([0] + [len(captions[i]) for i in keep]).cumsum(0)
    tensors = {"mean": torch.cat(means).contiguous(), "std": torch.cat(stds).contiguous(), "text": hidden.contiguous(),
               "caption_ids": torch.tensor(ids), "offsets": offsets,
               "is_list": torch.tensor([not isinstance(dataset.captions[i], str) for i in keep]),
               "rows": torch.tensor(keep)}
    write_atomically(path, lambda tmp: save_file(tensors, tmp))  # two jobs building one cache never collide


class CachedLatents(torch.utils.data.Dataset):
    """Items {"mean", "std", "text_id"} from a cache file; one caption drawn per item as the image loader does."""

    def __init__(self, path: Path, seed: int = 0):
        from safetensors.torch import load_file

        self.tensors = load_file(path)
        self.text = self.tensors["text"]
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.tensors["mean"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        start, end = self.tensors["offsets"][index].item(), self.tensors["offsets"][index + 1].item()
        row = int(self.tensors["rows"][index])  # the image loader's row: the same caption is drawn as uncached
        generator = item_generator(self.seed, self.epoch, row)
        pick = int(torch.randint(end - start, (), generator=generator)) if self.tensors["is_list"][index] else 0
        return {"mean": self.tensors["mean"][index], "std": self.tensors["std"][index],
                "text_id": self.tensors["caption_ids"][start + pick]}



def cached_latents(accelerator, args, train_set, resolution: int, vae, text_encoder, tokenizer):
    """The training set's latent cache (--cache-dir), built by the main process when missing: a CachedLatents, or
    for sharded data a LatentShardStream. `text_encoder` None: latents only, the captions numbered."""
    from ..data.shards import ShardStream

    cache_dir = Path(args.cache_dir or Path.home() / ".cache" / "latentdiff")
    if isinstance(train_set, ShardStream):  # sharded data: latent shards, streamed as the images would be
        if text_encoder is None:
            raise ValueError("--train-text-encoder with --cache-latents: latent shards hold text states, not the "
                             "captions a training text encoder reads; drop --cache-latents for sharded data")
        from .latent_shards import latent_stream

        return latent_stream(accelerator, args, train_set, encoders_fingerprint(vae, text_encoder, tokenizer), vae,
                             text_encoder, tokenizer, cache_dir)
    path = cache_path(cache_dir, vae, text_encoder, tokenizer, train_set, resolution)
    if accelerator.is_main_process and not path.is_file():
        accelerator.print(f"caching latents{'' if text_encoder is None else ' and text states'} to {path}")
        build_cache(path, train_set, vae, text_encoder, tokenizer, accelerator.device)
    accelerator.wait_for_everyone()
    return CachedLatents(path, seed=args.seed)

def sample_cached_latents(batch: dict, scaling_factor: float) -> torch.Tensor:
    """z ~ N(mean, std²) × scaling_factor: the posterior sample the VAE would draw (same numbers, same order)."""
    mean = batch["mean"]
    return (mean + batch["std"] * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)) * scaling_factor


def collate_cached(items: list[dict]) -> dict:
    return {"mean": torch.stack([i["mean"] for i in items]), "std": torch.stack([i["std"] for i in items]),
            "text_ids": torch.stack([i["text_id"] for i in items]), "skipped": 0}


# 2. The training step ------------------------------------------------------------------------------------------------

def diffusion_training_loss(unet, noise_scheduler, latents_fn, text_fn, batch_size: int, args) -> torch.Tensor:
    """One DDPM training loss (Ho et al. 2020, Algorithm 1) in latent space. Random draws always come in the same
    order — caption dropout, latent sample, noise, timesteps — so cached and uncached runs see the same numbers."""
    drop = torch.rand(batch_size) < args.uncond_prob  # (B,) classifier-free guidance: caption → ""
    latents = latents_fn()  # (B, C, h, w), already × scaling_factor
    hidden = text_fn(drop)  # (B, L, D)
    # drawn by shape, not randn_like: a latent's memory layout (a chunked view from the VAE, or a cached tensor)
    # must not decide which number lands where
    noise = torch.randn(latents.shape, device=latents.device, dtype=latents.dtype)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    steps = noise_scheduler.config.num_train_timesteps
    weights = timestep_weights(steps, args)
    t = (torch.randint(0, steps, (batch_size,), device=latents.device) if weights is None
         else torch.multinomial(weights, batch_size, replacement=True).to(latents.device))
    alpha_bar = noise_scheduler.schedule.alpha_bar(t, latents)
    noisy = diffusion.q_sample(latents, noise, alpha_bar)
    prediction = unet(noisy, t, encoder_hidden_states=hidden).sample
    return diffusion.diffusion_loss(prediction, latents, noise, alpha_bar, noise_scheduler.config.prediction_type,
                                    args.snr_gamma, getattr(args, "snr_floor", 0.0))


TIMESTEP_BIASES = ("none", "earlier", "later", "range")


def timestep_weights(steps: int, args) -> torch.Tensor | None:
    """Relative weights of the training timesteps under --timestep-bias (the strategies of diffusers' SDXL training
    script): "later" multiplies the last --timestep-bias-portion of them (the noisiest, where the layout is decided)
    by --timestep-bias-multiplier, "earlier" the first, "range" [--timestep-bias-begin, --timestep-bias-end); None
    for uniform timesteps, drawn as without the flag."""
    strategy = getattr(args, "timestep_bias", "none")
    if strategy == "none" or args.timestep_bias_multiplier == 1:
        return None
    weights, biased = torch.ones(steps), round(args.timestep_bias_portion * steps)
    span = {"later": slice(steps - biased, steps), "earlier": slice(0, biased),
            "range": slice(args.timestep_bias_begin, args.timestep_bias_end)}[strategy]
    weights[span] *= args.timestep_bias_multiplier
    return weights


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.parser(None, __doc__)
    parser.add_argument("--model", required=True, help="folder with tokenizer/, text_encoder/, vae/ (and unet/ to fine-tune)")
    parser.add_argument("--preset", default=None, help="U-Net architecture when --model has no unet/ (default: none; needed then)")
    parser.add_argument("--model-dir", default=None, help="where the pipeline goes (default: OUTPUT_DIR/model)")
    parser.add_argument("--lora-rank", type=int, default=0, help="fine-tune a LoRA of this rank instead (0: off)")
    parser.add_argument("--prediction-type", choices=diffusion.PREDICTION_TYPES, default=None,
                        help="default: the model's scheduler config")
    parser.add_argument("--rescale-betas-zero-snr", action="store_true",
                        help="rescale the noise schedule to zero terminal SNR (Lin et al. 2024): the last training "
                             "step sees pure noise, as sampling does, so the layout must come from the caption; "
                             "needs v_prediction (default: the model's scheduler config)")
    parser.add_argument("--add-text-embedding", action="store_true",
                        help="give the U-Net a pooled text embedding added to its timestep embedding (diffusers' "
                             "addition_embed_type 'text': attention pooling over the text states, as in unCLIP and "
                             "DeepFloyd IF), zero at the start so the model draws as before until it trains; every "
                             "block then hears the whole caption, not only the cross-attention layers")
    parser.add_argument("--uncond-prob", type=float, default=0.1, help="caption dropout to '' (default: 0.1)")
    parser.add_argument("--snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting, e.g. 5 (default: off, plain MSE)")
    parser.add_argument("--snr-floor", type=float, default=0.0,
                        help="raise the x_0-loss weight to at least this at the noisiest timesteps (SNR below it), "
                             "where the layout is decided: max(min(SNR, γ), F); 1 weighs them as v-prediction does "
                             "(default: 0, off)")
    parser.add_argument("--noise-offset", type=float, default=0.0, help="offset noise strength (0: off)")
    parser.add_argument("--timestep-bias", choices=TIMESTEP_BIASES, default="none",
                        help="draw some training timesteps more often: the last (later, noisiest) or first (earlier) "
                             "--timestep-bias-portion of them, or those in a range (default: none, uniform)")
    parser.add_argument("--timestep-bias-multiplier", type=float, default=1.0,
                        help="how much more often the biased timesteps are drawn (default: 1.0)")
    parser.add_argument("--timestep-bias-portion", type=float, default=0.25,
                        help="the fraction of timesteps --timestep-bias earlier/later favours (default: 0.25)")
    parser.add_argument("--timestep-bias-begin", type=int, default=0, help="first timestep of --timestep-bias range")
    parser.add_argument("--timestep-bias-end", type=int, default=1000,
                        help="end (exclusive) of --timestep-bias range (default: 1000)")
    parser.add_argument("--use-ema", action="store_true", help="keep an exponential moving average of the weights; it is what gets saved")
    parser.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    parser.add_argument("--cache-latents", action="store_true",
                        help="encode images and captions once and train on the cached latents and text states")
    parser.add_argument("--cache-dir", default=None, help="default: ~/.cache/latentdiff")
    parser.add_argument("--train-text-encoder", action="store_true",
                        help="train the text encoder with the U-Net on the diffusion loss (default: frozen)")
    parser.add_argument("--text-encoder-lr", type=float, default=None,
                        help="the text encoder's learning rate with --train-text-encoder (default: --learning-rate)")
    parser.add_argument("--validation-steps", type=int, default=0, help="sample every N steps (0: only at the end)")
    parser.add_argument("--validation-prompts", nargs="+", default=DEFAULT_PROMPTS, help="prompts of the sample grids")
    parser.add_argument("--validation-guidance", type=float, nargs=2, default=(1.0, 7.5),
                        help="the two guidance scales of the sample grids")
    trainer.add_common_args(parser, lr=2e-4, batch_size=32, max_steps=5000)
    return parser


def load_parts(args, device):
    """Tokenizer, text encoder and VAE (frozen), the U-Net (from the folder or the preset) and the noise schedule."""
    root = Path(args.model)
    for name in ("text_encoder", "vae"):
        check_weights(root / name)
    tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
    fp32 = dict(use_safetensors=True, dtype=torch.float32)  # transformers keeps the stored dtype otherwise
    text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", **fp32).requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(root / "vae", use_safetensors=True).requires_grad_(False)
    clip = CLIPModel.from_pretrained(root / "clip", **fp32) if (root / "clip" / "config.json").is_file() else None
    if (root / "unet" / "config.json").is_file():
        check_weights(root / "unet")
        unet = UNet2DConditionModel.from_pretrained(root / "unet", use_safetensors=True)
        scheduler = load_scheduler(root / "scheduler")
    else:
        if args.lora_rank:
            raise ValueError("--lora-rank fine-tunes an existing U-Net, but --model has no unet/")
        if not args.preset:
            raise ValueError(f"--model {root} has no unet/: pass --preset to build one from scratch")
        unet, scheduler = build_unet(load_preset(args.preset)), build_scheduler(load_preset(args.preset))
    if args.add_text_embedding:
        unet = with_text_embedding(unet)
    changes = {**({"prediction_type": args.prediction_type} if args.prediction_type else {}),
               **({"rescale_betas_zero_snr": True} if args.rescale_betas_zero_snr else {})}
    if changes:  # rebuilt, not only re-registered: the betas follow rescale_betas_zero_snr
        scheduler = with_config(type(scheduler), scheduler.config, **changes)
    if scheduler.config.get("rescale_betas_zero_snr"):  # the model's own ε, where --prediction-type was left out
        _check_zero_snr(scheduler.config.prediction_type, "add")
    return tokenizer, text_encoder.to(device), vae.to(device), clip, unet, scheduler


def with_text_embedding(unet: UNet2DConditionModel) -> UNet2DConditionModel:
    """`unet` with diffusers' pooled-text embedding (addition_embed_type "text", 64-wide pooling heads) added to
    its timestep embedding; its last LayerNorm starts at zero, so the new U-Net's output is the old one's exactly.
    A U-Net that has one already is returned as it is."""
    if unet.config.addition_embed_type == "text":
        return unet
    if unet.config.addition_embed_type is not None or unet.config.encoder_hid_dim_type is not None:
        raise ValueError("--add-text-embedding: the U-Net already has an addition embedding of type "
                         f"{unet.config.addition_embed_type!r} (encoder_hid_dim_type "
                         f"{unet.config.encoder_hid_dim_type!r}); it takes one of type 'text' only in place of none")
    heads = max(1, unet.config.cross_attention_dim // 64)
    new = with_config(UNet2DConditionModel, unet.config, addition_embed_type="text",
                      addition_embed_type_num_heads=heads)
    missing, unexpected = new.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(name.startswith("add_embedding.") for name in missing), (missing, unexpected)
    with torch.no_grad():
        new.add_embedding.norm2.weight.zero_()
        new.add_embedding.norm2.bias.zero_()
    return new


def _parameters(modules) -> list[torch.nn.Parameter]:
    """The parameters an EMA over `modules` follows, in its order (trainer.train's)."""
    return [p for module in modules for p in module.parameters()]


@torch.no_grad()
def validate(args, step: int, unet, vae, text_encoder, tokenizer, scheduler, accelerator, ema=None) -> Path:
    """Sample the validation prompts at the two guidance scales (rows) with a fixed seed; write a PNG grid. With
    `ema`, with its weights: the U-Net's, and the text encoder's where it trains."""
    trained = _parameters([unet, text_encoder] if args.train_text_encoder else [unet])
    if ema is not None:
        ema.store(trained)
        ema.copy_to(trained)
    unet.eval()
    pipe = LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    rows = [pipe(args.validation_prompts, guidance_scale=scale, num_inference_steps=25,
                 generator=[torch.Generator().manual_seed(args.seed + i) for i in range(len(args.validation_prompts))],
                 output_type="pil").images for scale in args.validation_guidance]
    unet.train()
    if ema is not None:
        ema.restore(trained)
    path = Path(args.output_dir) / "samples" / f"step-{step:06d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([im for row in rows for im in row], cols=len(args.validation_prompts)).save(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")
    return path


def _check_zero_snr(prediction_type: str | None, fix: str) -> None:
    """--rescale-betas-zero-snr's rule, checked on the flags (`fix` "use") and on the model's scheduler ("add")."""
    if prediction_type == "epsilon":
        raise ValueError("--rescale-betas-zero-snr makes ᾱ_T = 0, where an ε-prediction says nothing about x_0: "
                         f"{fix} --prediction-type v_prediction")


def check_args(args) -> None:
    """The flags' own rules, checked before anything loads (recipes check them before any stage runs)."""
    trainer.check_args(args)
    if not 0 <= args.uncond_prob <= 1:
        raise ValueError(f"--uncond-prob must be in [0, 1], got {args.uncond_prob}")
    if args.cache_latents and (args.random_crop or args.random_flip):
        raise ValueError("--cache-latents stores one encoding per image: drop --random-crop / --random-flip")
    if args.lora_rank and (args.use_ema or args.prediction_type or args.rescale_betas_zero_snr
                           or args.train_text_encoder or args.add_text_embedding):
        raise ValueError("--lora-rank trains an adapter for the model as it is: --use-ema, --prediction-type, "
                         "--rescale-betas-zero-snr, --add-text-embedding and --train-text-encoder do not apply to it")
    if args.rescale_betas_zero_snr:
        _check_zero_snr(args.prediction_type, "use")
    if args.text_encoder_lr is not None and not args.train_text_encoder:
        raise ValueError(f"--text-encoder-lr {args.text_encoder_lr:g} sets the learning rate of a text encoder that "
                         "trains: add --train-text-encoder")
    diffusion.check_snr_weighting(args.snr_gamma, args.snr_floor, ("--snr-gamma", "--snr-floor"))
    if not args.timestep_bias_multiplier > 0:
        raise ValueError(f"--timestep-bias-multiplier must be > 0, got {args.timestep_bias_multiplier:g}")
    if not 0 < args.timestep_bias_portion <= 1:
        raise ValueError(f"--timestep-bias-portion must be in (0, 1], got {args.timestep_bias_portion:g}")
    if args.timestep_bias == "range" and not 0 <= args.timestep_bias_begin < args.timestep_bias_end:
        raise ValueError("--timestep-bias range needs 0 ≤ --timestep-bias-begin < --timestep-bias-end, got "
                         f"{args.timestep_bias_begin} and {args.timestep_bias_end}")
    if args.timestep_bias == "none" and args.timestep_bias_multiplier != 1:
        raise ValueError(f"--timestep-bias-multiplier {args.timestep_bias_multiplier:g} needs --timestep-bias "
                         "earlier, later or range")
    if args.text_encoder_lr is not None and not args.text_encoder_lr > 0:
        raise ValueError(f"--text-encoder-lr must be > 0, got {args.text_encoder_lr:g}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    accelerator, model_dir = trainer.start(args, "train_unet")
    device = accelerator.device
    tokenizer, text_encoder, vae, clip, unet, scheduler = load_parts(args, device)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)  # ours: the training noise schedule as ᾱ_t
    resolution = args.resolution or unet.config.sample_size * vae_scale_factor(vae.config)
    train_set, _ = trainer.split_dataset(args, resolution)
    scaling = vae.config.scaling_factor

    # 1. What trains: the whole U-Net, or a LoRA inside it.
    if args.lora_rank:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                    target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    groups = [{"params": trainable}]
    trained = [unet]  # what the EMA follows, in this order, and what the checkpoints hold
    if args.train_text_encoder:
        text_encoder.requires_grad_(True).train()
        groups.append({"params": list(text_encoder.parameters()), "lr": args.text_encoder_lr or args.learning_rate})
        trained.append(text_encoder)
    ema = EMAModel(_parameters(trained), decay=args.ema_decay) if args.use_ema and not args.lora_rank else None

    # 2. Data: cached latents and text states, or images and captions encoded every step.
    if args.cache_latents:
        cached = cached_latents(accelerator, args, train_set, resolution, vae,
                                None if args.train_text_encoder else text_encoder, tokenizer)
        if args.train_text_encoder:  # the captions' token ids, numbered as the cache numbers them
            token_table = tokenize(tokenizer, cache_texts(train_set), device)
        elif hasattr(cached, "text"):
            text_table = cached.text.to(device)
        else:  # latent shards carry each sample's text states; "" is the dropped caption's
            with torch.no_grad():
                empty_text = text_encoder(tokenize(tokenizer, [""], device))[0]
        loader = trainer.make_loader(cached, args, collate_fn=collate_cached)
    else:
        loader = trainer.make_loader(train_set, args)
    if ema is not None:
        ema.to(device)
    optimizer = torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay)
    *trained, optimizer, lr_scheduler, loader = trainer.prepare(
        accelerator, *trained, optimizer, trainer.make_lr_scheduler(optimizer, args), loader=loader)
    unet = trained[0]
    encode = trained[1] if args.train_text_encoder else text_encoder  # the prepared (wrapped) one trains

    def step(batch):
        if args.cache_latents:
            size = len(batch["mean"])
            latents_fn = lambda: sample_cached_latents(batch, scaling)  # noqa: E731
            if args.train_text_encoder:
                text_fn = lambda drop: encode(token_table[torch.where(drop.to(device), 0, batch["text_ids"])])[0]  # noqa: E731
            elif "text" in batch:
                text_fn = lambda drop: torch.where(drop.to(device)[:, None, None], empty_text, batch["text"])  # noqa: E731
            else:
                text_fn = lambda drop: text_table[torch.where(drop.to(device), 0, batch["text_ids"])]  # noqa: E731
        else:
            size = len(batch["captions"])

            def latents_fn():
                with torch.no_grad():
                    return vae.encode(batch["pixel_values"]).latent_dist.sample() * scaling

            def text_fn(drop):
                captions = ["" if d else c for c, d in zip(batch["captions"], drop.tolist())]
                with torch.set_grad_enabled(args.train_text_encoder):
                    return encode(tokenize(tokenizer, captions, device))[0]

        return diffusion_training_loss(unet, noise_scheduler, latents_fn, text_fn, size, args), {}

    raw_unet = accelerator.unwrap_model(unet)

    def on_step(step_number: int) -> None:
        if args.validation_steps and step_number % args.validation_steps == 0 and accelerator.is_main_process:
            validate(args, step_number, raw_unet, vae, text_encoder, tokenizer, scheduler, accelerator, ema)

    progress = trainer.train(accelerator, args, trained, optimizer, lr_scheduler, loader, step, ema=ema,
                             on_step=on_step)
    summary = progress.summary()
    if accelerator.is_main_process:
        summary["samples"] = str(validate(args, progress.step, raw_unet, vae, text_encoder, tokenizer, scheduler,
                                          accelerator, ema))
        if ema is not None:
            ema.copy_to(_parameters([raw_unet, text_encoder] if args.train_text_encoder else [raw_unet]))
        if args.lora_rank:
            from peft.utils import get_peft_model_state_dict
            from diffusers.utils import convert_state_dict_to_diffusers

            LatentDiffusionPipeline.save_lora_weights(
                model_dir, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(raw_unet)))
            summary["lora"] = str(model_dir / "pytorch_lora_weights.safetensors")
        else:
            # Into the folder the frozen parts came from, only what this stage made is written: a VAE decoder
            # fine-tuned there meanwhile (the recipe's decoder stage) is not put back as it was.
            same = model_dir.resolve() == Path(args.model).resolve()
            made = ("unet", "scheduler", *(("text_encoder",) if args.train_text_encoder else ()))
            LatentDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=raw_unet,
                                    scheduler=scheduler, clip=clip).save_pretrained(
                model_dir, components=made if same else None)
        trainer.write_summary(args.output_dir, summary)
    accelerator.end_training()
    return summary
