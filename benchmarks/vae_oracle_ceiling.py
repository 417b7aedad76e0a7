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



def main(argv: list[str] | None = None) -> dict:
    from diffusers import AutoencoderKL

    from latentdiff.evaluation import metrics as ev

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
    rows = dataset.select(range(count))
    report = {"vae": args.vae, "data": args.data,
              **ev.round_trip_oracle(vae, [row["image"] for row in rows], [p.scene for p in prompts[:count]])}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
