"""U-Net training throughput: cached latents and text states (latentdiff's `--cache-latents`) against a loop that runs
the VAE encoder and the text encoder on every step, the way diffusers' text-to-image example trains.

    python benchmarks/bench_training.py [--preset small] [--batch-size 32] [--steps 20] [--repeats 3]

Both run train_unet's own step (same U-Net, batch, precision, optimizer) on the same data; the time of the steps
alone is measured (the one-off cache build is reported apart). Model-FLOPs utilisation = FLOPs of one U-Net training
step (forward + backward, torch.utils.flop_counter) × steps/s ÷ the fp32 matmul peak measured in the same run.
Writes benchmarks/results/training-{fp32,bf16}.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, machine, matmul_peak, summary, write_report  # noqa: E402


def make_model_and_data(preset: str, work: Path, images: int) -> tuple[Path, Path]:
    from latentdiff.data.imagefolder import write_imagefolder
    from latentdiff.data.shapes import shapes_rows
    from latentdiff.models import load_preset, new_pipeline

    resolution = load_preset(preset)["resolution"]
    write_imagefolder(work / "data", shapes_rows(images, resolution, seed=0))
    new_pipeline(preset, seed=0).save_pretrained(work / "model")
    return work / "model", work / "data"


def time_steps(model: Path, data: Path, work: Path, cached: bool, args) -> dict:
    """Seconds per optimizer step of train_unet (steps after the first two, which warm up allocators)."""
    from latentdiff.training import unet as unet_training

    stamps = []
    original = unet_training.diffusion_training_loss

    def timed(*a, **kw):  # every training step calls the loss once
        stamps.append(time.perf_counter())
        return original(*a, **kw)

    unet_training.diffusion_training_loss = timed
    try:
        started = time.perf_counter()
        unet_training.main(["--data", str(data), "--model", str(model), "--output-dir", str(work / "run"),
                            "--model-dir", str(work / "out"), "--max-steps", str(args.steps), "--batch-size",
                            str(args.batch_size), "--holdout", "0", "--report-to", "none", "--checkpointing-steps",
                            "100000", "--validation-prompts", "a red circle", "--mixed-precision", args.precision,
                            "--cache-dir", str(work / "cache"), *(["--cache-latents"] if cached else [])])
        total = time.perf_counter() - started
    finally:
        unet_training.diffusion_training_loss = original
    gaps = [b - a for a, b in zip(stamps[2:], stamps[3:])]
    return {**summary(gaps), "wall_s": total}


def step_flops(preset: str, batch: int) -> dict:
    """FLOPs of one U-Net training step (forward + backward) and of the encoder forwards the uncached loop adds."""
    from latentdiff.models import build_unet, build_vae, load_preset, new_pipeline

    config = load_preset(preset)
    unet, vae = build_unet(config), build_vae(config)
    text_encoder = new_pipeline(preset, seed=0).text_encoder
    size, length = config["unet"]["sample_size"], config["tokenizer"]["model_max_length"]
    x = torch.randn(batch, config["unet"]["in_channels"], size, size)
    hidden = torch.randn(batch, length, config["unet"]["cross_attention_dim"])
    pixels = torch.randn(batch, 3, config["resolution"], config["resolution"])
    ids = torch.zeros(batch, length, dtype=torch.long)

    def unet_step():
        unet(x, torch.randint(0, 1000, (batch,)), encoder_hidden_states=hidden).sample.square().mean().backward()

    with torch.no_grad():
        encoders = count_flops(lambda: (vae.encode(pixels).latent_dist.sample(), text_encoder(ids)))
    return {"unet_step": count_flops(unet_step), "encoders": encoders}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--precision", choices=("no", "bf16"), default="no")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    peak = matmul_peak(torch.bfloat16 if args.precision == "bf16" else torch.float32)
    flops = step_flops(args.preset, args.batch_size)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        model, data = make_model_and_data(args.preset, Path(work), args.images)
        for name, cached in (("uncached", False), ("cached", True)):
            results[name] = time_steps(model, data, Path(work) / name, cached, args)
            results[name]["samples_per_s"] = args.batch_size / results[name]["median_s"]
            # model FLOPs: the U-Net step only (the encoders' work is what caching removes)
            results[name]["mfu"] = flops["unet_step"] / results[name]["median_s"] / 1e9 / peak
    ratio = results["cached"]["samples_per_s"] / results["uncached"]["samples_per_s"]
    # if both loops ran their FLOPs at the same rate, caching could gain at most this much
    bound = (flops["unet_step"] + flops["encoders"]) / flops["unet_step"]
    report = {"machine": machine(), "matmul_peak_gflops": peak, "flops": flops, "flop_bound_on_ratio": bound, "preset": args.preset,
              "batch_size": args.batch_size, "precision": args.precision, "results": results,
              "cached_over_uncached": ratio, "command": " ".join(sys.argv)}
    table = ["| loop | samples/s | s/step (median, min–max) | model-FLOPs utilisation |", "|---|---|---|---|"]
    for name, r in results.items():
        table.append(f"| {name} | {r['samples_per_s']:.1f} | {r['median_s']:.3f} ({r['min_s']:.3f}–{r['max_s']:.3f}) "
                     f"| {100 * r['mfu']:.0f} % |")
    table.append(f"\ncached / uncached = {ratio:.2f}x (FLOPs alone bound it at {bound:.2f}x: U-Net step "
                 f"{flops['unet_step'] / 1e9:.0f} GFLOP, VAE encoder + text encoder {flops['encoders'] / 1e9:.0f} GFLOP); "
                 f"{args.preset} preset, batch {args.batch_size}, precision "
                 f"{'fp32' if args.precision == 'no' else args.precision}; matmul peak in that precision {peak:.0f} GFLOP/s; {machine()}")
    write_report(Path(args.out), f"training-{'fp32' if args.precision == 'no' else args.precision}", report, "\n".join(table))
    return report


if __name__ == "__main__":
    main()
