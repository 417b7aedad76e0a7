"""The text encoder alone, taught to state the scene a caption describes rather than the words it uses in the states
the U-Net reads. A causal CLIP text tower trained contrastively against images keeps "a red circle above a blue
square" nearer "a red circle below a blue square" (one word apart) than "a blue square below a red circle" (the same
scene): in the shipped shapes model that holds for 298 of 300 relation captions, and the U-Net, which reads these
states, then draws the two objects either way round. This stage adds a text-to-text contrastive loss (InfoNCE, as in
supervised SimCSE, Gao et al. 2021): each caption's summary state must be nearest another caption of the same image,
against the batch's other captions and its own hard negatives (binding swapped, relation turned round:
`shapes.hard_negatives`, as CLIP training draws them), while an anchor term keeps every state near the starting
encoder's, so the U-Net trained on those states still reads them.

    python training/train_text_encoder.py --model latentdiff/assets/shapes-model --data runs/shapes64-pooled/data \
        --output-dir runs/te-scene --max-steps 400 --batch-size 96 --learning-rate 5e-4

The summary state is the mean of the final states from the end-of-text token on: under the causal mask those are
the positions that read the whole caption (the pipeline pads with end-of-text tokens to the full context, so the
U-Net sees about twenty of them). Writes OUTPUT_DIR/model: --model's pipeline folder with its text encoder
replaced, and in the run summary the paraphrase test (`paraphrase_accuracy`) before and after, on the held-out rows
and on the data set's unseen prompts.
"""

from __future__ import annotations

import argparse
import copy
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from .. import argparsing
from ..data.loader import caption_groups, item_generator
from ..model_folder import check_weights, write_component
from . import trainer
from .clip import draw_hard_negatives, tokenize


def summary_states(text_encoder: CLIPTextModel, input_ids: torch.Tensor,
                   eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(final states (B, L, D), unit-norm summary (B, D)): the mean of the states from the first end-of-text token
    on. `input_ids` padded to the full context, as the pipeline pads them."""
    states = text_encoder(input_ids)[0]
    eos = (input_ids == eos_token_id).int().argmax(1)  # the first end-of-text token (padding repeats it)
    keep = (torch.arange(input_ids.shape[1], device=input_ids.device)[None] >= eos[:, None]).to(states.dtype)
    summary = (states * keep[..., None]).sum(1) / keep.sum(1, keepdim=True)
    return states, F.normalize(summary.float(), dim=-1)


def paraphrase_loss(anchors: torch.Tensor, positives: torch.Tensor, negatives: list[torch.Tensor],
                    temperature: float) -> torch.Tensor:
    """InfoNCE over unit vectors: anchor i against positive i, the batch's other positives and its own hard
    negatives (a (K_i, D) tensor each, K_i ≥ 0)."""
    terms = []
    batch = anchors @ positives.T / temperature  # (B, B)
    for i, own in enumerate(negatives):
        logits = torch.cat([batch[i], anchors[i] @ own.T / temperature]) if len(own) else batch[i]
        terms.append(torch.logsumexp(logits, 0) - logits[i])
    return torch.stack(terms).mean()


def anchor_loss(states: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Squared distance of every state from the starting encoder's, relative to the reference states' size."""
    return ((states.float() - reference.float()) ** 2).sum(-1).mean() / (reference.float() ** 2).sum(-1).mean()


@torch.no_grad()
def paraphrase_accuracy(text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, caption_lists: list[list[str]],
                        device=None, batch_size: int = 128) -> dict:
    """For each image with two or more captions: is its second caption's summary nearer its first's than every
    hard negative of the first of one kind (swap: binding swapped, opposite: relation or position turned round)?
    The captions of one image state the same scene, so an encoder of the scene passes and one of the words fails
    wherever the paraphrase reorders them ("a red circle above a blue square" / "a blue square below a red
    circle"). Also `change`: how far the summary positions' final states move when the relation or position is
    turned round (the first opposite negative), relative to their size, averaged over the captions that have one."""
    from ..data.shapes import hard_negatives

    rows = [(c[0], c[1], hard_negatives(c[0])) for c in caption_lists if len(c) >= 2]
    wins: dict[str, list[bool]] = {"swap": [], "opposite": []}
    changes = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start: start + batch_size]
        texts = [t for first, second, negs in chunk for t in (first, second, *negs["swap"], *negs["opposite"])]
        ids = tokenize(tokenizer, texts, device)
        states, summaries = summary_states(text_encoder, ids, tokenizer.eos_token_id)
        base = 0
        for first, second, negs in chunk:
            anchor = summaries[base]
            own, at = anchor @ summaries[base + 1], base + 2
            for kind in ("swap", "opposite"):
                group = len(negs[kind])
                if group:
                    wins[kind].append(bool((summaries[at: at + group] @ anchor < own).all()))
                at += group
            if negs["opposite"]:  # the summary positions of the caption and of its first opposite
                other = base + 2 + len(negs["swap"])
                end = int((ids[base] == tokenizer.eos_token_id).int().argmax())
                a, b = states[base, end:], states[other, end:]
                changes.append(((a - b).norm(dim=-1) / a.norm(dim=-1)).mean())
            base = at
    report = {kind: sum(w) / len(w) for kind, w in wins.items() if w}
    report.update({f"{kind}_count": len(w) for kind, w in wins.items()})
    if changes:
        report["change"] = float(torch.stack(changes).mean())
    return report


class Captions(torch.utils.data.Dataset):
    """The rows of an image-caption data set without their images: {"caption", "index"}, each caption drawn as the
    image loader draws it (per seed, epoch and row). The images are never read."""

    def __init__(self, rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def set_epoch(self, epoch: int) -> None:
        self.rows.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict:
        return {"caption": self.rows.caption(index), "index": index}


def collate_captions(items: list[dict]) -> dict:
    return {"captions": [item["caption"] for item in items],
            "indices": torch.tensor([item["index"] for item in items], dtype=torch.long), "skipped": 0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparsing.parser(None, __doc__)
    parser.add_argument("--model", required=True, help="pipeline folder whose text encoder (and tokenizer) to train")
    parser.add_argument("--model-dir", default=None, help="where the pipeline folder goes (default: OUTPUT_DIR/model)")
    parser.add_argument("--temperature", type=float, default=0.05, help="of the contrastive loss (default: 0.05)")
    parser.add_argument("--anchor-weight", type=float, default=1.0,
                        help="weight of the pull towards the starting encoder's states (default: 1; 0: off)")
    parser.add_argument("--hard-negatives", type=int, default=1, metavar="K",
                        help="hard-negative captions per caption, beside the batch (default: 1; 0: the batch only)")
    trainer.add_common_args(parser, lr=5e-4, batch_size=96, max_steps=400)
    return parser


def check_args(args) -> None:
    trainer.check_args(args)
    if not args.temperature > 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature:g}")
    if not args.anchor_weight >= 0:
        raise ValueError(f"--anchor-weight must be ≥ 0, got {args.anchor_weight:g}")
    if args.hard_negatives < 0:
        raise ValueError(f"--hard-negatives must be ≥ 0, got {args.hard_negatives}")
    if args.random_flip:
        raise ValueError("--random-flip does not apply: this stage reads captions only")


def write_model(source: Path, text_encoder: CLIPTextModel, model_dir: Path) -> None:
    """`source`'s model folder at `model_dir` with `text_encoder` in it; each part written atomically. The
    source's recipe.json is not copied: it describes how the source was made."""
    if model_dir.resolve() != source.resolve():
        for part in sorted(p for p in source.iterdir() if p.is_dir() and p.name != "text_encoder"):
            write_component(model_dir / part.name, lambda f, part=part: shutil.copytree(part, f))
        if (source / "model_index.json").is_file():
            shutil.copyfile(source / "model_index.json", model_dir / "model_index.json")
    write_component(model_dir / "text_encoder", lambda f: text_encoder.save_pretrained(f, max_shard_size="15MB"))


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    check_args(args)
    source = Path(args.model)
    for needed in ("text_encoder/config.json", "tokenizer"):
        if not (source / needed).exists():
            raise ValueError(f"--model {source} has no {needed}: give a model folder with a text encoder and its "
                             "tokenizer")
    check_weights(source / "text_encoder")
    accelerator, model_dir = trainer.start(args, "train_text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(source / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(source / "text_encoder", use_safetensors=True, dtype=torch.float32)
    # The anchor's encoder is the one the first sitting started from, kept in the run folder: a later sitting's
    # --model may already hold this stage's output (run-recipe replaces the model folder's encoder in place).
    kept = Path(args.output_dir) / "reference_text_encoder"
    if (kept / "config.json").is_file():
        reference = CLIPTextModel.from_pretrained(kept, use_safetensors=True, dtype=torch.float32)
    else:
        reference = copy.deepcopy(text_encoder)
        if accelerator.is_main_process:
            write_component(kept, lambda f: reference.save_pretrained(f, max_shard_size="15MB"))
    reference.requires_grad_(False).eval()
    train_set, holdout = trainer.split_dataset(args, args.resolution or 32)  # only their captions are read
    if not hasattr(train_set, "caption"):
        raise ValueError(f"--data {args.data}: this stage needs every row's captions at hand (an imagefolder or "
                         "save_to_disk folder), not a stream of shards")
    lists = caption_groups(train_set)
    if not any(len(c) >= 2 for c in lists):
        raise ValueError(f"--data {args.data}: no row has two captions, so no caption has a paraphrase to be "
                         "drawn to; this stage needs data with several captions per image (`latentdiff data shapes`)")
    from ..data.shapes import Scene, held_out_pairs
    from ..evaluation.metrics import unseen_prompts

    held_out = held_out_pairs(args.data)
    tests = {"holdout": caption_groups(holdout) if holdout is not None else [],
             "unseen": [Scene.from_dict(p.scene).captions() for p in unseen_prompts(args.data)]}
    before = {name: paraphrase_accuracy(reference, tokenizer, lists_) for name, lists_ in tests.items() if lists_}

    optimizer = torch.optim.AdamW(text_encoder.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    text_encoder, optimizer, lr_scheduler, loader = trainer.prepare(
        accelerator, text_encoder, optimizer, trainer.make_lr_scheduler(optimizer, args),
        loader=trainer.make_loader(Captions(train_set), args, collate_fn=collate_captions))
    reference.to(accelerator.device)
    positive_seed, negative_seed = args.seed + 1, args.seed + 2

    def step(batch):
        rows = [int(i) for i in batch["indices"]]
        anchors, positives = list(batch["captions"]), []
        for row, caption in zip(rows, anchors):  # another caption of the same image (itself when it has one)
            others = [c for c in lists[row] if c != caption] or [caption]
            g = item_generator(positive_seed, train_set.epoch, row)
            positives.append(others[int(torch.randint(len(others), (), generator=g))])
        drawn = draw_hard_negatives(anchors, args.hard_negatives,
                                    [item_generator(negative_seed, train_set.epoch, r) for r in rows], held_out)
        texts = anchors + positives + [c for picks in drawn for c in picks]
        ids = tokenize(tokenizer, texts, accelerator.device)
        states, summaries = summary_states(text_encoder, ids, tokenizer.eos_token_id)
        n = len(anchors)
        negatives = list(summaries[2 * n:].split([len(p) for p in drawn]))
        contrast = paraphrase_loss(summaries[:n], summaries[n: 2 * n], negatives, args.temperature)
        with torch.no_grad():
            reference_states = reference(ids)[0]
        anchor = anchor_loss(states, reference_states)
        logs = {"train/contrast": contrast.item(), "train/anchor": anchor.item()}
        return contrast + args.anchor_weight * anchor, logs

    progress = trainer.train(accelerator, args, [text_encoder], optimizer, lr_scheduler, loader, step)
    summary = progress.summary()
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(text_encoder).eval()
        write_model(source, raw, model_dir)
        after = {name: paraphrase_accuracy(raw, tokenizer, lists_, accelerator.device)
                 for name, lists_ in tests.items() if lists_}
        summary["paraphrase"] = {"before": before, "after": after}
        for name in after:
            accelerator.print(f"paraphrase test, {name}: " + ", ".join(
                f"{k} {before[name].get(k, float('nan')):.3f} → {after[name][k]:.3f}"
                for k in ("swap", "opposite", "change") if k in after[name]))
        trainer.write_summary(args.output_dir, summary)
    accelerator.end_training()
    return summary
