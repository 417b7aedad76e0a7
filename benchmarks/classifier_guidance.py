"""Classifier guidance on the shipped shapes model, measured by the oracle: how often the generated scene's objects
are of the colour the classifier steers toward, with and without it.

    python training/train_classifier.py --model latentdiff/assets/shapes-model --data DATA --label shapes:colour \
        --output-dir runs/colour-classifier ...
    python benchmarks/classifier_guidance.py --classifier runs/colour-classifier/classifier --out results/cg.json

For --images seeds each, four prompt settings:
- "": no text at all (the unconditional model), guidance 1, for every colour c of the classifier: classifier
  guidance alone makes the model class-conditional;
- "a c SHAPE", shapes in turn, guidance 1: plain conditional sampling with the colour named;
- the held-out pairs of the model's data (--data's split.json: "a green circle" …, combinations no training caption
  named), guidance 1, and again at guidance 7.5: classifier-free and classifier guidance together.
An image counts as the label's when the oracle reads at least one object and every object it reads is colour c.
Every setting runs each --scales value on the same seeds (scale 0 is the unguided pipeline, bit for bit).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentdiff import LatentDiffusionPipeline  # noqa: E402
from latentdiff.data.oracle import read_scene  # noqa: E402
from latentdiff.data.shapes import SHAPES, read_split  # noqa: E402
from latentdiff.classifier import NoisyLatentClassifier  # noqa: E402


def label_hits(images, colour: str) -> int:
    """Images in which the oracle reads at least one object and every object it reads is `colour`."""
    hits = 0
    for image in images:
        objects = read_scene(image).objects
        hits += bool(objects) and all(o.colour == colour for o in objects)
    return hits


def wilson(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a proportion."""
    centre, spread = (hits + z * z / 2) / (n + z * z), z * math.sqrt(hits * (n - hits) / n + z * z / 4) / (n + z * z)
    return centre - spread, centre + spread


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="a colour classifier folder (train_classifier.py)")
    parser.add_argument("--model", default="shapes", help="model folder or shipped name (default: shapes)")
    parser.add_argument("--scales", default="0,3,10", help="classifier scales, comma-separated (default: 0,3,10)")
    parser.add_argument("--images", type=int, default=16, help="seeds per colour and setting (default: 16)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    parser.add_argument("--data", default=None, help="the model's shapes data set, for its held-out pairs")
    parser.add_argument("--settings", default=None,
                        help="run only these settings (comma-separated numbers 1-4, in the order above; default: all)")
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--grid", default=None, help="also write a PNG: the no-prompt setting's first --grid-seeds "
                                                     "images per colour (rows) at each scale (column groups)")
    parser.add_argument("--grid-seeds", type=int, default=3, help="images per colour and scale in --grid (default: 3)")
    args = parser.parse_args(argv)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    classifier = NoisyLatentClassifier.from_pretrained(args.classifier).eval()
    colours = list(classifier.config.classes)
    scales = [float(s) for s in args.scales.split(",")]
    n = args.images
    cycled = {c: [f"a {c} {SHAPES[(k + i) % len(SHAPES)]}" for i in range(n)] for k, c in enumerate(colours)}
    settings = {"no prompt, guidance 1": ({c: [""] * n for c in colours}, 1.0),
                "colour named, guidance 1": (cycled, 1.0)}
    split = read_split(args.data) if args.data else None
    if split:
        held_out = {pair.split()[0]: [f"a {pair}"] * n for pair in split["holdout"]}
        settings["held-out pair named, guidance 1"] = (held_out, 1.0)
        settings["held-out pair named, guidance 7.5"] = (held_out, 7.5)
    if args.settings:
        chosen = [int(k) - 1 for k in args.settings.split(",")]
        settings = {name: value for k, (name, value) in enumerate(settings.items()) if k in chosen}
    started, rows, shown = time.time(), {}, {}
    for name, (prompts_of, guidance) in settings.items():
        rows[name] = {}
        for scale in scales:
            hits = {}
            for k, (colour, prompts) in enumerate(prompts_of.items()):
                generators = [torch.Generator().manual_seed(1000 * k + i) for i in range(n)]
                extra = {"classifier": classifier, "classifier_label": colour, "classifier_scale": scale} if scale \
                    else {}
                images = pipe(prompts, num_inference_steps=args.steps, guidance_scale=guidance,
                              generator=generators, **extra).images
                hits[colour] = label_hits(images, colour)
                if name == "no prompt, guidance 1":
                    shown[(colour, scale)] = images[: args.grid_seeds]
            total, images = sum(hits.values()), n * len(hits)
            rows[name][f"{scale:g}"] = {"rate": total / images, "hits": total, "images": images,
                                        "interval_95": wilson(total, images), "per_label": hits,
                                        "prompts": {c: p[0] for c, p in prompts_of.items()}}
            print(f"{name}, classifier scale {scale:g}: {total}/{images} = {total / images:.3f} (95 % "
                  f"{wilson(total, images)[0]:.2f}–{wilson(total, images)[1]:.2f})", flush=True)
    report = {"model": str(args.model), "classifier": str(args.classifier), "colours": colours,
              "images_per_colour": args.images, "steps": args.steps, "sampler": type(pipe.scheduler).__name__,
              "settings": rows, "seconds": round(time.time() - started, 1),
              "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()},
              "date": time.strftime("%Y-%m-%d")}
    if args.grid and shown:
        from latentdiff.images import image_grid

        cells = [(image, f"{colour} s={scale:g}" if i == 0 else "") for colour in colours for scale in scales
                 for i, image in enumerate(shown.get((colour, scale), []))]
        image_grid([c[0] for c in cells], cols=len(scales) * args.grid_seeds, labels=[c[1] for c in cells],
                   zoom=2).save(args.grid)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
