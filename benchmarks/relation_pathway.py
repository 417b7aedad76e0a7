"""Can a shapes model learn a relation's order from its caption at all? Two scenes that differ only in order
("a red circle above a blue square" / "... below ...", both objects in the middle column, on white), a U-Net
fine-tuned on just them at the noisiest timesteps, and its x_0 prediction from pure noise under each caption.

    python benchmarks/relation_pathway.py data --out runs/two-scenes
    python training/train_unet.py --model latentdiff/assets/shapes-model --data runs/two-scenes \
        --output-dir runs/two-scenes-run --max-steps 150 --batch-size 64 --learning-rate 4e-4 --train-text-encoder \
        --text-encoder-lr 3e-4 --lr-scheduler constant --lr-warmup-steps 20 --mixed-precision bf16 --cache-latents \
        --snr-gamma 5 --snr-floor 1 --timestep-bias range --timestep-bias-begin 900 --timestep-bias-end 1000 \
        --timestep-bias-multiplier 1000 --holdout 0 --uncond-prob 0 --report-to none
    python benchmarks/relation_pathway.py check --model runs/two-scenes-run/model

`check` prints, for t = 999, 949, 899, the mean colour of the top and bottom halves of the decoded mean x_0
prediction (8 noise draws) under each caption: a model that reads the order puts red on top under "above" and
blue on top under "below"; one that does not gives both captions the same picture.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentdiff import LatentDiffusionPipeline  # noqa: E402
from latentdiff.data.shapes import Scene, SceneObject, _box, position_of  # noqa: E402
from relation_order import decoded_mean_x0, latent_shape  # noqa: E402  (beside this file)

CAPTIONS = ("a red circle above a blue square", "a red circle below a blue square")


def write_data(out: Path, copies: int = 32) -> None:
    if (out / "metadata.jsonl").exists():
        raise SystemExit(f"--out {out} already holds a data set; choose another folder")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for k, relation in enumerate(("above", "below")):
        red_y, blue_y = (0.27, 0.73) if relation == "above" else (0.73, 0.27)
        scene = Scene("relation", "white", [SceneObject(shape, colour, "medium", position_of(_box(0.5, y, "medium", 64), 64),
                                                        _box(0.5, y, "medium", 64))
                                            for colour, shape, y in (("red", "circle", red_y), ("blue", "square", blue_y))],
                      relation)
        for r in range(copies):
            scene.render(64).save(out / f"{k}_{r}.png")
            rows.append({"file_name": f"{k}_{r}.png", "text": scene.captions()[:2], "scene": scene.to_dict()})
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} images of 2 scenes to {out}")


@torch.no_grad()
def check(model: str, draws: int = 8) -> dict:
    pipe = LatentDiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32)
    report = {}
    for t in (999, 949, 899):
        g = torch.Generator().manual_seed(0)  # the same noise under both captions
        noises = [torch.randn((1, *latent_shape(pipe)), generator=g).repeat(2, 1, 1, 1) for _ in range(draws)]
        images = decoded_mean_x0(pipe, list(CAPTIONS), t, noises)
        half = images.shape[1] // 2
        for caption, image in zip(CAPTIONS, images):
            top, bottom = (image[rows].mean((0, 1)).round().tolist() for rows in (slice(0, half), slice(half, None)))
            report[f"{t} {caption}"] = {"top_rgb": top, "bottom_rgb": bottom}
            print(f"t={t}  {caption:34s} top RGB {top}  bottom RGB {bottom}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data").add_argument("--out", required=True, help="folder for the two-scene data set")
    checker = sub.add_parser("check")
    checker.add_argument("--model", required=True, help="model folder or shipped name")
    checker.add_argument("--out", default=None, help="JSON report (default: print only)")
    args = parser.parse_args(argv)
    if args.command == "data":
        return write_data(Path(args.out))
    report = check(args.model)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
