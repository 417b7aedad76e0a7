"""Images/s of the shipped model by number of steps: at most 8 steps sample with its few-step weights (LCM-LoRA,
one U-Net pass a step), more with the model itself (DPM-Solver++, two passes a step under guidance).

    python benchmarks/bench_few_step.py [--steps 1,2,4,8,20] [--batches 1,8] [--repeats 5]

For each step count and batch: the pipeline (`LatentDiffusionPipeline`, compiled graphs warm) and the torch-free
runtime of `latentdiff generate`, timed interleaved after two warm-up calls, guidance 7.5, 64x64. Quality at the
same step counts comes from `latentdiff eval` (README). Writes benchmarks/results/few_step.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import run  # noqa: E402
from common import machine, summary, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped emoji model)")
    parser.add_argument("--steps", default="1,2,4,8,20")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    from latentdiff import LatentDiffusionPipeline
    from latentdiff.runtime.bundle import build
    from latentdiff.runtime.generate import Runtime

    torch.set_grad_enabled(False)
    pipe = LatentDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    runtime = Runtime(build(args.model))
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        for steps in (int(s) for s in args.steps.split(",")):
            calls = {"pipeline": functools.partial(run, pipe, batch, steps),
                     "runtime": functools.partial(run, runtime, batch, steps)}
            for call in calls.values():
                call(), call()
            timings = {k: [] for k in calls}
            for _ in range(args.repeats):
                for key, call in calls.items():
                    started = time.perf_counter()
                    call()
                    timings[key].append(time.perf_counter() - started)
            stats = {k: summary(v) for k, v in timings.items()}
            row = {"steps": steps, "batch": batch, "few_step": pipe.few_step_for(steps) is not None,
                   **{f"{k}_images_per_s": batch / s["median_s"] for k, s in stats.items()}, "timings": stats}
            print(f"batch {batch}, {steps} steps ({'few-step weights' if row['few_step'] else 'the model'}): "
                  f"pipeline {row['pipeline_images_per_s']:.2f} img/s, runtime {row['runtime_images_per_s']:.2f} "
                  "img/s", flush=True)
            rows.append(row)
    report = {"machine": machine(), "rows": rows, "command": " ".join(sys.argv)}
    table = ["| batch | steps | sampled with | pipeline img/s | runtime img/s |", "|---|---|---|---|---|"]
    table += [f"| {r['batch']} | {r['steps']} | {'few-step weights (LCM)' if r['few_step'] else 'the model (DPM++)'} "
              f"| {r['pipeline_images_per_s']:.2f} | {r['runtime_images_per_s']:.2f} |" for r in rows]
    table.append(f"\n{machine()}")
    write_report(Path(args.out), "few_step", report, "\n".join(table))
    return report


if __name__ == "__main__":
    main()
