"""How much of a shapes scene survives the VAE: oracle accuracy of real scenes after an encode-decode round trip,
the ceiling for any U-Net trained on that VAE's latents.

    python benchmarks/vae_oracle_ceiling.py --vae runs/shapes64/model/vae --data runs/shapes64/data [--n 300]

Prints, and writes as JSON to --out, the oracle accuracy of the first N real scenes and of their reconstructions
(the latent distribution's mode, decoded).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKL

    from latentdiff import evaluation as ev

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", required=True, help="a VAE folder (MODEL/vae)")
    parser.add_argument("--data", required=True, help="a shapes data set folder (latentdiff data shapes)")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--out", default=None, help="JSON report path")
    args = parser.parse_args(argv)
    prompts, dataset = ev.load_prompts(args.data)
    count = min(args.n, len(prompts))
    if not all(p.scene for p in prompts[:count]):
        raise ValueError(f"--data {args.data} must be a shapes data set (its rows need scenes for the oracle)")
    vae = AutoencoderKL.from_pretrained(args.vae).eval()
    real, round_trip = [], []
    with torch.no_grad():
        for start in range(0, count, 50):
            rows = dataset.select(range(start, min(count, start + 50)))
            images = [row["image"].convert("RGB") for row in rows]
            pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in images]))
            decoded = vae.decode(vae.encode(pixels.permute(0, 3, 1, 2)).latent_dist.mode()).sample.clamp(-1, 1)
            for offset, (image, out) in enumerate(zip(images, decoded)):
                scene = prompts[start + offset].scene
                array = ((out.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
                real.append(ev.oracle_scores(scene, image))
                round_trip.append(ev.oracle_scores(scene, Image.fromarray(array)))
    report = {"vae": args.vae, "data": args.data, "scenes": count, "real": ev.oracle_accuracy(real),
              "round_trip": ev.oracle_accuracy(round_trip)}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
