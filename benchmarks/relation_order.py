"""Does a shapes model take a relation's order from its caption? "a red circle above a blue square" and "a red
circle below a blue square" name the same objects on the same axis; only the order differs.

    python benchmarks/relation_order.py --model shapes --scenes 96 --out results/relation-order.json

For --scenes relation scenes of seen colour–shape pairs (the model's held-out pairs from --holdout, default the
shipped model's six), each image generated three ways with the same seeds, scored by the oracle:
  noise        text to image from pure noise, the caption as it is (what a user gets)
  trace        img2img at strength 1 from the scene's own image: x_T = √ᾱ_T z_0 + √(1 − ᾱ_T) ε, the start a
               training step at t = T sees, with its faint trace of the true layout
  trace-turned the same start under the caption with the relation turned round, scored against the turned scene
`relation` is the fraction drawn in the stated order, `binding` the fraction with both objects in their colours
(relation ≤ binding). A model that ignores the order draws the same image under both captions from the same start:
trace + trace-turned ≈ binding. `same` counts the pairs whose two images read as the same layout.

`x0_order` looks before any sampling: at the noisiest timesteps (--timesteps) the model's prediction of x_0 from
pure noise, under the caption (guidance 1, --noise-draws draws averaged), decoded; a scene counts when that mean
image lies nearer each object's colour inside that object's own box than with the two colours swapped. A model
that reads no order from the text scores about 0.5 there, however well it samples later.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from latentdiff import LatentDiffusionPipeline, diffusion  # noqa: E402
from latentdiff.data.shapes import RELATIONS, Scene, parse_pairs, sample_scene, scene_pairs  # noqa: E402
from latentdiff.evaluation.metrics import layout, oracle_scores  # noqa: E402
from latentdiff.pipelines.image_to_image import LatentDiffusionImg2ImgPipeline  # noqa: E402

SHIPPED_HOLDOUT = "orange star, green circle, purple square, blue cross, red triangle, yellow diamond"


def turned(scene: Scene) -> Scene:
    return Scene.from_dict({**scene.to_dict(), "relation": RELATIONS[scene.relation]})


@torch.no_grad()
def decoded_mean_x0(pipe, captions: list[str], t: int, noises: list[torch.Tensor]) -> np.ndarray:
    """The model's x_0 prediction at timestep t from each x_t in `noises` (pure noise, (B, C, h, w) each), under
    the captions (guidance 1), averaged over the draws and decoded: (B, H, W, 3) in [0, 255]."""
    hidden = pipe.encode_prompt(captions, pipe.device, 1, False)[0]
    alpha_bar = pipe.scheduler.alphas_cumprod[t].float()
    mean_x0 = 0
    for x_t in noises:
        output = pipe.unet(x_t, torch.full((len(captions),), t), encoder_hidden_states=hidden).sample
        x0 = diffusion.split_model_output(output, x_t, alpha_bar, pipe.scheduler.config.prediction_type)[0]
        mean_x0 = mean_x0 + x0 / len(noises)
    decoded = pipe.vae.decode(mean_x0 / pipe.vae.config.scaling_factor).sample.clamp(-1, 1)
    return ((decoded + 1) * 127.5).permute(0, 2, 3, 1).numpy()


def latent_shape(pipe) -> tuple[int, int, int]:
    return pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size


def x0_order(pipe, scenes: list[Scene], timesteps: list[int], draws: int, batch_size: int) -> dict[str, float]:
    from latentdiff.data.shapes import COLOURS

    result = {}
    for t in timesteps:
        right = []
        for start in range(0, len(scenes), batch_size):
            batch = scenes[start: start + batch_size]
            g = torch.Generator().manual_seed(1000 + start)
            noises = [torch.randn((len(batch), *latent_shape(pipe)), generator=g) for _ in range(draws)]
            for scene, image in zip(batch, decoded_mean_x0(pipe, [s.captions()[0] for s in batch], t, noises)):
                a, b = scene.objects
                colour = {o.colour: np.array(COLOURS[o.colour], dtype=np.float32) for o in (a, b)}

                def distance(box, c):
                    return float(np.linalg.norm(image[box[1]: box[3] + 1, box[0]: box[2] + 1] - colour[c], axis=-1).mean())
                right.append(distance(a.box, a.colour) + distance(b.box, b.colour)
                             < distance(a.box, b.colour) + distance(b.box, a.colour))
        result[str(t)] = float(np.mean(right))
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="shapes", help="model folder or shipped name (default: shapes)")
    parser.add_argument("--scenes", type=int, default=96, help="relation scenes (default: 96)")
    parser.add_argument("--holdout", default=SHIPPED_HOLDOUT, help="pairs to leave out (default: the shipped six)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="default: 7.5")
    parser.add_argument("--steps", type=int, default=20, help="default: 20")
    parser.add_argument("--batch-size", type=int, default=16, help="default: 16")
    parser.add_argument("--seed", type=int, default=123, help="scene draws (default: 123)")
    parser.add_argument("--timesteps", default="999,899,799", help="for x0_order (default: 999,899,799)")
    parser.add_argument("--noise-draws", type=int, default=4, help="for x0_order (default: 4)")
    parser.add_argument("--out", default=None, help="JSON report (default: print only)")
    args = parser.parse_args(argv)
    if args.scenes < 1:
        raise SystemExit(f"--scenes must be ≥ 1, got {args.scenes}")
    held, rng, scenes = set(parse_pairs(args.holdout)), random.Random(args.seed), []
    while len(scenes) < args.scenes:
        scene = sample_scene(rng, 64, task="relation")
        if not scene_pairs(scene) & held:
            scenes.append(scene)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    img2img = LatentDiffusionImg2ImgPipeline(**pipe.components)
    img2img.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    call = dict(guidance_scale=args.guidance_scale, num_inference_steps=args.steps)
    started, images = time.perf_counter(), {"noise": [], "trace": [], "trace-turned": []}
    for start in range(0, len(scenes), args.batch_size):
        batch = scenes[start: start + args.batch_size]
        seed = lambda: torch.Generator().manual_seed(start)  # noqa: E731
        first = lambda ss: [s.captions()[0] for s in ss]  # noqa: E731
        images["noise"] += pipe(first(batch), generator=seed(), **call).images
        renders = [s.render(size) for s in batch]
        images["trace"] += img2img(first(batch), image=renders, strength=1.0, generator=seed(), **call).images
        images["trace-turned"] += img2img(first([turned(s) for s in batch]), image=renders, strength=1.0,
                                          generator=seed(), **call).images
    report = {"model": args.model, "scenes": len(scenes), "guidance_scale": args.guidance_scale, "steps": args.steps}
    for name, generated in images.items():
        truths = [turned(s) if name == "trace-turned" else s for s in scenes]
        checks = [oracle_scores(t.to_dict(), im) for t, im in zip(truths, generated)]
        report[name] = {k: float(np.mean([c[k] for c in checks])) for k in ("relation", "colour_binding")}
    report["x0_order"] = x0_order(pipe, scenes, [int(t) for t in args.timesteps.split(",")], args.noise_draws,
                                  args.batch_size)
    report["same"] = float(np.mean([layout(a) == layout(b) for a, b in zip(images["trace"], images["trace-turned"])]))
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
