"""Training throughput per stage and process count, streaming shards: the records a larger run is planned from.

    python benchmarks/bench_scale.py [--n 2048] [--steps 20] [--batch-size 32] [--processes 1,2] [--preset small]

Writes --n shapes scenes at 64x64 as shards, trains a model's parts on them with the project's own scripts
(`accelerate launch`, one run per stage and process count, torch threads = cores / processes), and reads each
run's loop time from its summary (its sitting's seconds: loading and any latent encoding before the loop are not
in them). Images/s = steps × batch per process × processes / seconds. Stages: clip, vae, unet (images encoded
every step) and unet on latent shards (`--cache-latents`, encoded once beforehand).
Writes benchmarks/results/scale.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_report  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def launch(processes: int, script: str, args: list[str]) -> None:
    threads = max(1, (os.cpu_count() or 1) // processes)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               *(["--multi_gpu"] if processes > 1 else ["--num_cpu_threads_per_process", str(threads)]),
               str(REPO / "training" / script), *args]
    subprocess.run(command, check=True, capture_output=True, text=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--processes", default="1,2")
    parser.add_argument("--preset", default="small")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    from latentdiff.data.imagefolder import write_imagefolder
    from latentdiff.data.shapes import shapes_rows
    from latentdiff.data.shards import write_shards

    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    write_imagefolder(work / "folder", shapes_rows(args.n, 64, seed=0))
    write_shards(work / "folder", work / "shards", shard_size=max(1, args.n // 16))
    model = work / "model"
    common = ["--data", str(work / "shards"), "--preset", args.preset, "--batch-size", str(args.batch_size),
              "--holdout", "0", "--report-to", "none", "--checkpointing-steps", "1000000"]
    # the parts the U-Net stage needs, from one short run each
    launch(1, "train_clip.py", [*common, "--model-dir", str(model), "--output-dir", str(work / "clip0"),
                                "--max-steps", "1"])
    launch(1, "train_vae.py", [*common, "--model-dir", str(model), "--output-dir", str(work / "vae0"),
                               "--max-steps", "1"])
    stages = {"clip": ("train_clip.py", ["--model-dir", str(work / "m-clip")]),
              "vae": ("train_vae.py", ["--model-dir", str(work / "m-vae")]),
              "unet (images encoded every step)": ("train_unet.py", ["--model", str(model), "--model-dir",
                                                                     str(work / "m-unet"), "--validation-prompts", "x"]),
              "unet (latent shards)": ("train_unet.py", ["--model", str(model), "--model-dir", str(work / "m-unet2"),
                                                         "--validation-prompts", "x", "--cache-latents",
                                                         "--cache-dir", str(work / "cache")])}
    results = {}
    for name, (script, extra) in stages.items():
        for processes in (int(p) for p in args.processes.split(",")):
            out = work / f"run-{len(results)}"
            launch(processes, script, [*common, *extra, "--output-dir", str(out), "--max-steps", str(args.steps)])
            sitting = json.loads((out / "summary.json").read_text())["sittings"][-1]
            images = args.steps * args.batch_size * processes
            results[f"{name}, {processes} process(es)"] = {
                "stage": name, "processes": processes, "seconds": sitting["seconds"],
                "images_per_s": images / sitting["seconds"], "batch_per_process": args.batch_size}
    report = {"machine": machine(), "preset": args.preset, "steps": args.steps, "n": args.n, "results": results,
              "command": " ".join(sys.argv)}
    table = ["| stage | processes | loop seconds | images/s |", "|---|---|---|---|"]
    for r in results.values():
        table.append(f"| {r['stage']} | {r['processes']} | {r['seconds']:.1f} | {r['images_per_s']:.1f} |")
    table.append(f"\n{args.preset} preset, 64x64 shapes scenes from shards, {args.steps} steps of "
                 f"{args.batch_size} images per process, fp32; {machine()}")
    write_report(Path(args.out), "scale", report, "\n".join(table))
    print("\n".join(table))
    return report


if __name__ == "__main__":
    main()
