"""Stage 1: a BPE tokenizer and a CLIP (text + image towers) trained from scratch with the symmetric contrastive
loss (Radford et al. 2021), correct across processes through open_clip's `ClipLoss` (features gathered with
their gradients, so N processes give the gradient of one process on the global batch).

    python training/train_clip.py --data data/shapes --preset small --output-dir runs/clip --model-dir runs/model

Writes MODEL_DIR/tokenizer, MODEL_DIR/text_encoder (the text tower as a CLIPTextModel) and MODEL_DIR/clip (the
whole CLIPModel with its tokenizer and image-processor config, ready to judge). Images enter the CLIP as the
loader gives them, in [−1, 1]; the saved image-processor config (mean = std = 0.5) does the same mapping.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPTokenizer

from .. import argparsing
from . import trainer
from ..data.loader import readable_batches
from ..evaluation.metrics import two_way_retrieval
from ..model_folder import write_component
from ..model_folder import save_clip_folder
from ..models import build_clip, load_preset, pooled, text_encoder_from_clip
from ..tokenizer import train_tokenizer

MAX_LOGIT_SCALE = math.log(100)  # the temperature 1/τ is clamped at 100 (Radford et al. 2021, §2.5)


def embed_images(clip: CLIPModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """Unit-norm image embeddings (B, P) for images in [−1, 1] at the vision tower's resolution."""
    return F.normalize(pooled(clip.get_image_features(pixel_values=pixel_values)).float(), dim=-1)


def embed_texts(clip: CLIPModel, input_ids: torch.Tensor) -> torch.Tensor:
    """Unit-norm text embeddings (B, P)."""
    return F.normalize(pooled(clip.get_text_features(input_ids=input_ids)).float(), dim=-1)


def tokenize(tokenizer: CLIPTokenizer, captions: list[str], device=None, full_context: bool = True) -> torch.Tensor:
    """Token ids, truncated to the context. `full_context` pads to it, as the pipeline does for the U-Net's text
    states; CLIP training pads to the longest caption instead: its pooled feature is read at the end-of-text token
    under a causal mask, so padding after that token changes nothing and only costs compute."""
    return tokenizer(captions, padding="max_length" if full_context else "longest", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids.to(device)


def contrastive_loss(accelerator):
    """open_clip's ClipLoss, gathering features with gradients across the processes of `accelerator`."""
    from open_clip.loss import ClipLoss

    return ClipLoss(local_loss=False, gather_with_grad=True, cache_labels=True,
                    rank=accelerator.process_index, world_size=accelerator.num_processes)


@torch.no_grad()
def retrieval(clip: CLIPModel, tokenizer: CLIPTokenizer, dataset, batch_size: int = 64, device=None) -> dict:
    """Image→text and text→image top-1/top-5 accuracy over a held-out set, one caption (the first) per image.
    A retrieved item counts as right when its caption is the query's (identical captions are interchangeable)."""
    image_emb, captions = [], []
    for rows, pixels in readable_batches(dataset, batch_size):
        image_emb.append(embed_images(clip, pixels.to(device)))
        captions += [c if isinstance(c, str) else c[0] for c in (dataset.captions[i] for i in rows)]
    image_emb, distinct = torch.cat(image_emb), list(dict.fromkeys(captions))
    chunks = [distinct[i: i + batch_size] for i in range(0, len(distinct), batch_size)]
    text_emb = torch.cat([embed_texts(clip, tokenize(tokenizer, chunk, device, full_context=False))
                          for chunk in chunks])
    return {"holdout_size": len(captions), "chance_top1": 1 / len(distinct),
            **two_way_retrieval(image_emb.cpu(), captions, text_emb.cpu())}


def draw_hard_negatives(captions: list[str], count: int, generators: list[torch.Generator],
                        held_out: set = frozenset()) -> list[list[str]]:
    """Up to `count` hard negatives per caption (`shapes.hard_negatives`): each draw picks a kind (swap, opposite,
    replace) uniformly among those the caption has, then one of its captions, so binding swaps are not drowned by
    the many replacements. Negatives naming a held-out colour-shape pair are left out: no training caption, not even
    a negative one, names such a pair. Draws come from the per-row generators, so a resumed run draws the same."""
    from ..data.shapes import caption_pairs, hard_negatives

    drawn = []
    for caption, generator in zip(captions, generators):
        kinds = [[c for c in texts if not caption_pairs(c) & held_out] for texts in hard_negatives(caption).values()]
        kinds = [texts for texts in kinds if texts]
        picks = []
        for _ in range(count if kinds else 0):
            texts = kinds[int(torch.randint(len(kinds), (), generator=generator))]
            picks.append(texts[int(torch.randint(len(texts), (), generator=generator))])
        drawn.append(picks)
    return drawn


class CollateWithHardNegatives:
    """The loader's collate plus each row's drawn hard negatives, so that the drawing (Python string work, 0.2 s for
    512 captions on one core) runs in the loader's workers, not in the main process between optimizer steps. The draws are the same as in the main process: per (seed, epoch, row) generators, the epoch
    read from the dataset the worker was started with (workers start anew each epoch)."""

    def __init__(self, dataset, count: int, seed: int, held_out: set):
        self.dataset, self.count, self.seed, self.held_out = dataset, count, seed, held_out

    def __call__(self, items: list[dict | None]) -> dict:
        from ..data.loader import collate, item_generator

        batch = collate(items)
        generators = [item_generator(self.seed, self.dataset.epoch, int(i)) for i in batch["indices"]]
        batch["hard_negatives"] = draw_hard_negatives(batch["captions"], self.count, generators, self.held_out)
        return batch


def hard_negative_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, negative_embeds: list[torch.Tensor],
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean over images of −log softmax of the true caption among [true caption, its own hard negatives]. Each
    image's term needs only its own texts, so it is the same on one process or many (no gather)."""
    terms = []
    for image, text, negatives in zip(image_embeds, text_embeds, negative_embeds):
        if len(negatives):
            logits = logit_scale * torch.cat([text[None], negatives]) @ image
            terms.append(torch.logsumexp(logits, 0) - logits[0])
    return torch.stack(terms).mean() if terms else image_embeds.sum() * 0


@torch.no_grad()
def hard_negative_accuracy(clip: CLIPModel, tokenizer: CLIPTokenizer, images: torch.Tensor, captions: list[str],
                           device=None, batch_size: int = 64) -> dict:
    """For each image and each kind of hard negative (swap, opposite, replace): is its caption rated above every
    negative of that kind? ("all": above every negative of every kind.) Images in [−1, 1], (N, 3, R, R)."""
    from ..data.shapes import hard_negatives

    wins: dict[str, list[bool]] = {"swap": [], "opposite": [], "replace": [], "all": []}
    for start in range(0, len(captions), batch_size):
        image_emb = embed_images(clip, images[start: start + batch_size].to(device))
        for image, caption in zip(image_emb, captions[start: start + batch_size]):
            negatives = hard_negatives(caption)
            texts = [caption] + [c for kind in negatives.values() for c in kind]
            scores = (embed_texts(clip, tokenize(tokenizer, texts, device, full_context=False)) @ image).tolist()
            offset, beaten = 1, []
            for kind, kind_texts in negatives.items():
                if kind_texts:
                    won = scores[0] > max(scores[offset: offset + len(kind_texts)])
                    wins[kind].append(won)
                    beaten.append(won)
                offset += len(kind_texts)
            if beaten:
                wins["all"].append(all(beaten))
    return {kind: (sum(v) / len(v) if v else None) for kind, v in wins.items()} | {
        f"{kind}_images": len(v) for kind, v in wins.items()}


def unseen_images(data_dir, resolution: int) -> tuple[torch.Tensor, list[str]] | None:
    """A shapes data set's unseen prompts (scenes with held-out pairs), rendered, as CLIP inputs and first captions."""
    import numpy as np
    from PIL import Image

    from ..data.shapes import Scene
    from ..evaluation.metrics import unseen_prompts

    prompts = unseen_prompts(data_dir)
    if not prompts:
        return None
    size = Image.open(next(Path(data_dir).glob("*.png"))).size[0]  # scenes keep their boxes in the set's pixels
    arrays = [np.asarray(Scene.from_dict(p.scene).render(size).resize((resolution, resolution)),
                         dtype=np.float32) / 127.5 - 1 for p in prompts]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2), [p.text for p in prompts]


def save_clip(clip: CLIPModel, tokenizer: CLIPTokenizer, model_dir: Path) -> None:
    """MODEL_DIR/tokenizer, /text_encoder and /clip (with tokenizer and image-processor config)."""
    write_component(model_dir / "tokenizer", tokenizer.save_pretrained)
    text_encoder = text_encoder_from_clip(clip)
    write_component(model_dir / "text_encoder", lambda f: text_encoder.save_pretrained(f, max_shard_size="15MB"))
    write_component(model_dir / "clip", lambda f: save_clip_folder(clip, tokenizer, f))


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.parser(None, __doc__)
    parser.add_argument("--preset", default="small", help="architecture: tiny, small, base or a JSON file")
    parser.add_argument("--model-dir", default=None, help="where the parts go (default: OUTPUT_DIR/model)")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer folder to use instead of training one (default: train one on the captions)")
    parser.add_argument("--hard-negatives", type=int, default=0, metavar="K",
                        help="hard-negative captions per image (shapes vocabulary: swapped bindings, opposite "
                             "relations, replaced attributes), scored against the image beside its own caption (0: off)")
    parser.add_argument("--hard-negative-weight", type=float, default=1.0,
                        help="weight of the hard-negative loss beside the batch contrastive loss")
    trainer.add_common_args(parser, lr=5e-4, batch_size=64, max_steps=2000)
    return parser


def check_args(args) -> None:
    """The flags' own rules, checked before anything loads (recipes check them before any stage runs)."""
    trainer.check_args(args)
    if args.hard_negatives < 0:
        raise ValueError(f"--hard-negatives must be ≥ 0, got {args.hard_negatives}")
    if args.hard_negatives and args.random_flip:
        raise ValueError("--hard-negatives cannot go with --random-flip: a flipped image of 'on the left' shows "
                         "'on the right', so its opposite negatives would be true")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    accelerator, model_dir = trainer.start(args, "train_clip")
    preset = load_preset(args.preset)
    resolution = args.resolution or preset["clip"]["vision_config"]["image_size"]
    train_set, holdout = trainer.split_dataset(args, resolution)

    # 1. The tokenizer: given, or trained on the training captions (the same on every process: deterministic).
    if args.tokenizer:
        tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    else:
        texts = [t for c in train_set.captions for t in ([c] if isinstance(c, str) else c)]
        tokenizer = train_tokenizer(texts, **preset["tokenizer"])
    # 2. The CLIP, its optimizer and the loss.
    clip = build_clip(preset, tokenizer)
    if resolution != clip.config.vision_config.image_size:
        raise ValueError(f"--resolution must be the vision tower's image_size ({clip.config.vision_config.image_size}) "
                         f"for a CLIP built from a preset, got {resolution}")
    if args.gradient_checkpointing:
        clip.gradient_checkpointing_enable()
    # as open_clip: no weight decay on the temperature, biases, norms and embeddings (1-D parameters)
    decayed = [p for n, p in clip.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    kept = [p for n, p in clip.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decayed, "weight_decay": args.weight_decay},
                                   {"params": kept, "weight_decay": 0.0}], lr=args.learning_rate)
    from ..data.loader import item_generator
    from ..data.shapes import held_out_pairs

    held_out = held_out_pairs(args.data)
    negatives_seed = args.seed + 1
    from ..data.shards import ShardStream

    if args.hard_negatives > 0 and not isinstance(train_set, ShardStream):  # a stream batches itself: drawn in the step
        loader = trainer.make_loader(train_set, args, collate_fn=CollateWithHardNegatives(
            train_set, args.hard_negatives, negatives_seed, held_out))
    else:
        loader = trainer.make_loader(train_set, args)
    clip, optimizer, lr_scheduler, loader = trainer.prepare(
        accelerator, clip, optimizer, trainer.make_lr_scheduler(optimizer, args), loader=loader)
    loss_fn = contrastive_loss(accelerator)
    raw = accelerator.unwrap_model(clip)

    def step(batch):
        with torch.no_grad():
            raw.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
        ids = tokenize(tokenizer, batch["captions"], accelerator.device, full_context=False)
        out = clip(input_ids=ids, pixel_values=batch["pixel_values"])  # image_embeds / text_embeds: unit norm
        scale = raw.logit_scale.exp()
        loss, logs = loss_fn(out.image_embeds, out.text_embeds, scale), {"train/logit_scale": scale.item()}
        if args.hard_negatives > 0:
            drawn = batch.get("hard_negatives")
            if drawn is None:
                generators = [item_generator(negatives_seed, train_set.epoch, int(i)) for i in batch["indices"]]
                drawn = draw_hard_negatives(batch["captions"], args.hard_negatives, generators, held_out)
            flat = [c for picks in drawn for c in picks]
            if flat:
                # the unwrapped model: DDP has no get_text_features; its hooks still sync the gradients
                embeds = embed_texts(raw, tokenize(tokenizer, flat, accelerator.device, full_context=False))
                per_image = list(embeds.split([len(picks) for picks in drawn]))
                extra = hard_negative_loss(out.image_embeds.float(), out.text_embeds.float(), per_image, scale)
                loss = loss + args.hard_negative_weight * extra
                logs["train/hard_negative_loss"] = extra.item()
        return loss, logs

    progress = trainer.train(accelerator, args, [clip], optimizer, lr_scheduler, loader, step)
    # 3. The parts, then held-out retrieval (a failing measurement must not lose the trained model).
    summary = progress.summary()
    if accelerator.is_main_process:
        raw.eval()
        save_clip(raw, tokenizer, model_dir)
        if holdout is not None:
            scores = retrieval(raw, tokenizer, holdout, device=accelerator.device)
            summary.update(scores)
            accelerator.log({f"eval/{k}": v for k, v in scores.items() if isinstance(v, float)}, step=progress.step)
            accelerator.print("held-out retrieval: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()
                                                                   if k.endswith(("top1", "top5"))))
            rows = [(i, p) for rows, pixels in readable_batches(holdout, 64) for i, p in zip(rows, pixels)]
            captions = [c if isinstance(c, str) else c[0] for c in (holdout.captions[i] for i, _ in rows)]
            summary["hard_negatives"] = hard_negative_accuracy(raw, tokenizer, torch.stack([p for _, p in rows]),
                                                               captions, accelerator.device)
            unseen = unseen_images(args.data, resolution)
            if unseen is not None:  # scenes with held-out pairs, which no training image or caption holds
                summary["unseen_hard_negatives"] = hard_negative_accuracy(raw, tokenizer, *unseen, accelerator.device)
            for key in ("hard_negatives", "unseen_hard_negatives"):
                if key in summary:
                    accelerator.print(f"{key}: " + ", ".join(f"{k} {v:.3f}" for k, v in summary[key].items()
                                                             if isinstance(v, float)))
        trainer.write_summary(args.output_dir, summary)
    accelerator.end_training()
    return summary
