"""FLOPs per training image of each preset at its native size (torch.utils.flop_counter): the U-Net's training step
(forward + backward) and the VAE encoder + text encoder forwards that latent shards do once instead of every step.

    python benchmarks/flops_per_image.py [--presets small,base]

Writes benchmarks/results/flops.json and .md (the planning estimate in README's "Training at scale" uses them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_training import step_flops  # noqa: E402
from common import write_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,base")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    results = {name: step_flops(name, 1) for name in args.presets.split(",")}
    table = ["| preset | U-Net training step, GFLOP per image | VAE encoder + text encoder, GFLOP per image |",
             "|---|---|---|"]
    for name, flops in results.items():
        table.append(f"| {name} | {flops['unet_step'] / 1e9:.1f} | {flops['encoders'] / 1e9:.1f} |")
    write_report(Path(args.out), "flops", {"per_image": results, "command": " ".join(sys.argv)}, "\n".join(table))
    print("\n".join(table))
    return results


if __name__ == "__main__":
    main()
