"""Fewer steps at equal quality: FD (and CLIP score, judge retrieval, wall time) of DDPM at 250 steps, DDIM and
DPM-Solver++ at 10/20/50 steps, and the default sampler in bf16, all through `latentdiff eval` on the same prompts
and per-image seeds.

    python benchmarks/bench_samplers.py --prompts runs/emoji64/data [--model DIR] [--sample-prompts 256]

Each configuration's FD is also given relative to DDPM-250's, the reference the issue sets ("within 5 %"); the bf16
row is relative to the same sampler in fp32. Writes benchmarks/results/samplers.json and .md; the eval reports stay
under --work.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_report  # noqa: E402

CONFIGS = [("ddpm", 250, "fp32"), *((s, n, "fp32") for s in ("ddim", "dpm++") for n in (10, 20, 50)), ("ddim", 20, "bf16")]


def main(argv: list[str] | None = None) -> dict:
    from latentdiff.evaluation import job as eval_job

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", required=True, help="a data set folder (its images are the FD reference)")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--sample-prompts", type=int, default=256)
    parser.add_argument("--guidance-scale", default="7.5")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-reference", type=int, default=4000)
    parser.add_argument("--work", default=None, help="where the eval reports go (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-samplers-"))
    rows = []
    for scheduler, steps, dtype in CONFIGS:
        name = f"{scheduler}-{steps}-{dtype}"
        print(f"== {name}", flush=True)
        report = eval_job.main([
            *(["--model", args.model] if args.model else []), "--prompts", args.prompts, "--out", str(work / name),
            "--guidance-scales", args.guidance_scale, "--steps", str(steps), "--scheduler", scheduler, "--dtype", dtype,
            "--images-per-prompt", "1", "--sample-prompts", str(args.sample_prompts), "--batch-size",
            str(args.batch_size), "--max-reference", str(args.max_reference)])
        row = report["scales"][0]
        rows.append({"scheduler": scheduler, "steps": steps, "dtype": dtype, "fd": row["fd"],
                     "clip_score": row["clip_score"], "retrieval_top1": row["retrieval_top1"],
                     "retrieval_top5": row["retrieval_top5"], "seconds": row["seconds"], "images": row["images"],
                     "fd_reference": row["fd_reference"]})
    reference_fd = rows[0]["fd"]
    for row in rows:
        row["fd_vs_ddpm250"] = row["fd"] / reference_fd - 1
    fp32 = next(r for r in rows if (r["scheduler"], r["steps"], r["dtype"]) == ("ddim", 20, "fp32"))
    bf16 = rows[-1]
    bf16["fd_vs_fp32"] = bf16["fd"] / fp32["fd"] - 1
    report = {"machine": machine(), "model": args.model or "shipped", "prompts": args.prompts,
              "guidance_scale": float(args.guidance_scale), "rows": rows, "command": " ".join(sys.argv)}
    table = ["| sampler | steps | dtype | FD | FD vs DDPM-250 | CLIP score | judge top-1 | judge top-5 | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['scheduler']} | {r['steps']} | {r['dtype']} | {r['fd']:.4f} | {100 * r['fd_vs_ddpm250']:+.1f} % "
                     f"| {r['clip_score']:.2f} | {100 * r['retrieval_top1']:.1f} % | {100 * r['retrieval_top5']:.1f} % "
                     f"| {r['seconds']:.0f} |")
    table.append(f"\n{rows[0]['images']} images per row (one per prompt, the same seeds), FD against "
                 f"{rows[0]['fd_reference']} real images in the judge's feature space, guidance {args.guidance_scale}; "
                 f"bf16 DDIM-20 FD vs fp32 DDIM-20: {100 * bf16['fd_vs_fp32']:+.2f} %; {machine()}")
    write_report(Path(args.out), "samplers", report, "\n".join(table))
    return report


if __name__ == "__main__":
    main()
