"""LatentDiffusionPipeline against diffusers' StableDiffusionPipeline on the same weights, side by side in one run.

    python benchmarks/bench_pipeline.py [--models small,shipped] [--batches 1,8] [--steps 25] [--repeats 5] [--profile]

For each model and batch size: images/s of both pipelines (fp32, same scheduler, steps, seed, 64x64, guidance
7.5; runs interleaved so all see the same machine), their ratio, the largest pixel difference between their images,
diffusers' pipeline with its text encoder, U-Net and VAE decoder compiled by OpenVINO (what optimum-intel does; static shapes,
compiled before timing, at f32 and at bf16 precision) as the fastest CPU peer, ours with torch traces instead of
OpenVINO (`pipe.compile_backend = "torch"`),
the torch-free runtime of `latentdiff generate` (latentdiff.runtime, OpenVINO networks and numpy samplers),
the achieved GFLOP/s (FLOPs of one call counted with torch.utils.flop_counter) against the fp32 matmul peak measured
in the same run, ours with tracing off (`pipe.use_tracing = False`: what the traced graphs gain), and our
reduced-precision mode (`pipe.to(dtype=torch.bfloat16)`) against diffusers in fp32 and in bf16. Writes
benchmarks/results/pipeline.json and .md.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import count_flops, machine, matmul_peak, summary, write_report  # noqa: E402


def load_pipes(model_dir: Path) -> dict:
    from diffusers import StableDiffusionPipeline

    from latentdiff import LatentDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(model_dir)
    eager = LatentDiffusionPipeline.from_pretrained(model_dir)
    eager.use_tracing = False
    bf16 = LatentDiffusionPipeline.from_pretrained(model_dir).to(dtype=torch.bfloat16)
    theirs = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                     torch_dtype=torch.float32)
    theirs_bf16 = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                          torch_dtype=torch.bfloat16)
    traced = LatentDiffusionPipeline.from_pretrained(model_dir)
    traced.compile_backend = "torch"
    peers = [StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False,
                                                     torch_dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
    for pipe in (theirs, theirs_bf16, *peers):
        pipe.scheduler = _diffusers_scheduler(ours.scheduler)
    for pipe in peers:
        _run_in_openvino(pipe)
    pipes = {"ours": ours, "ours_eager": eager, "ours_torch": traced, "diffusers": theirs,
             "diffusers_openvino": peers[0], "ours_bf16": bf16, "diffusers_bf16": theirs_bf16,
             "diffusers_openvino_bf16": peers[1]}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    try:  # the torch-free runtime of `latentdiff generate` (models whose sampler it runs)
        from latentdiff.runtime.bundle import build
        from latentdiff.runtime.generate import Runtime

        pipes["runtime"] = Runtime(build(model_dir))
    except ValueError as error:
        print(f"no runtime row for {model_dir}: {error}")
    return pipes


class _OpenVINOPeer:
    """`fn(module, *tensors)` run by OpenVINO, one network per input shape compiled at its first call (as
    optimum-intel's pipelines do after `reshape`), through the same conversion latentdiff uses, compiled as
    optimum-intel compiles (one request, the latency hint), not as latentdiff's halves in parallel."""

    def __init__(self, module, fn):
        import copy

        self.module, self.fn, self.graphs = copy.deepcopy(module), fn, {}

    def __call__(self, *tensors):
        from latentdiff.pipelines.openvino import compile_graph

        key = tuple((t.shape, t.dtype) for t in tensors)
        if key not in self.graphs:
            self.graphs[key] = compile_graph(self.module, self.fn, tensors, parallel_halves=False)  # optimum's hints
        return self.graphs[key](*tensors)


def _run_in_openvino(pipe) -> None:
    """diffusers' pipeline with its text encoder, U-Net and VAE decoder replaced by OpenVINO networks, as
    optimum-intel's pipelines have them (the rest stays diffusers')."""
    from latentdiff.pipelines.text_to_image import _text_encode, _unet_forward, _vae_decode

    unet, decoder = _OpenVINOPeer(pipe.unet, _unet_forward), _OpenVINOPeer(pipe.vae, _vae_decode)
    text_encoder = _OpenVINOPeer(pipe.text_encoder, _text_encode)
    pipe.text_encoder.forward = lambda input_ids, attention_mask=None, output_hidden_states=None, **kw: (
        text_encoder(input_ids),)
    pipe.unet.forward = lambda sample, timestep, encoder_hidden_states=None, return_dict=True, **kw: (
        unet(sample, torch.as_tensor(timestep), encoder_hidden_states),)
    pipe.vae.decode = lambda z, return_dict=True, generator=None: (decoder(z),)


def _diffusers_scheduler(scheduler):
    """diffusers' own class of the same name, from the same config."""
    import diffusers

    return getattr(diffusers, type(scheduler).__name__).from_config(scheduler.config)


def model_dirs(names: list[str], work: Path) -> dict[str, Path]:
    from latentdiff.model_folder import SHIPPED_MODEL_DIR
    from latentdiff.models import new_pipeline

    dirs = {}
    for name in names:
        if name == "shipped":
            if (SHIPPED_MODEL_DIR / "model_index.json").is_file():
                dirs[name] = SHIPPED_MODEL_DIR
            else:
                print("no shipped model yet: skipping it")
        else:
            new_pipeline(name, seed=0).save_pretrained(work / name)
            dirs[name] = work / name
    return dirs


def run(pipe, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    prompts = ["a tiger", "a red apple", "a car", "a smiling face"] * ((batch + 3) // 4)
    if not hasattr(pipe, "set_progress_bar_config"):  # the runtime: uint8 images
        return pipe(prompts[:batch], list(range(seed, seed + batch)), steps, 7.5).astype(np.float32) / 255
    generator = [torch.Generator().manual_seed(seed + i) for i in range(batch)]
    return pipe(prompts[:batch], num_inference_steps=steps, guidance_scale=7.5, generator=generator,
                output_type="np").images


def profile_ops(name: str, batch: int, calls: dict, path: Path, rows: int = 12) -> None:
    """Append the torch.profiler table (self CPU time by op) of one warm call of each pipeline to `path`."""
    from torch.profiler import ProfilerActivity, profile

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for key, call in calls.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                call()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=50)
            f.write(f"== {name}, batch {batch}, {key}\n{table}\n")


def measure(name: str, pipes: dict, batch: int, args, peak: dict) -> dict:
    """One table row: every pipeline timed `repeats` times, interleaved, after two warm-up calls (the second one
    replays our traced graphs; its images are the ones compared)."""
    calls = {k: functools.partial(run, pipe, batch, args.steps) for k, pipe in pipes.items()}
    images = {k: (call(), call())[1] for k, call in calls.items()}
    timings = {k: [] for k in pipes}
    for _ in range(args.repeats):  # interleaved: a slow spell of the machine hits every pipeline
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            timings[key].append(time.perf_counter() - started)
    profiled = {k: c for k, c in calls.items() if k != "runtime"}
    flops = count_flops(calls["ours_eager"])  # the counter sees eager ops; the traced graph runs the same ones
    stats = {k: summary(v) for k, v in timings.items()}

    def ratio(slow: str, fast: str) -> dict:
        """Median ratio of the medians, and the spread of the ratios of the same repeat."""
        paired = [a / b for a, b in zip(timings[slow], timings[fast])]
        return {"median": stats[slow]["median_s"] / stats[fast]["median_s"], "min": min(paired), "max": max(paired)}

    row = {"model": name, "batch": batch, "steps": args.steps, "flops": flops,
           "max_abs_pixel_diff": float(np.abs(images["ours"] - images["diffusers"]).max()),
           "traced_vs_eager_max_abs_pixel_diff": float(np.abs(images["ours_torch"] - images["ours_eager"]).max()),
           "bf16_vs_fp32_mean_abs_pixel_diff": float(np.abs(images["ours_bf16"] - images["ours"]).mean()),
           **{f"{k}_images_per_s": batch / s["median_s"] for k, s in stats.items()}, "timings": stats,
           "speedup": ratio("diffusers", "ours"), "eager_speedup": ratio("diffusers", "ours_eager"),
           "bf16_speedup": ratio("diffusers", "ours_bf16"), "bf16_vs_diffusers_bf16": ratio("diffusers_bf16", "ours_bf16"),
           "vs_openvino": ratio("diffusers_openvino", "ours"),
           "bf16_vs_openvino_bf16": ratio("diffusers_openvino_bf16", "ours_bf16"),
           "torch_backend_speedup": ratio("diffusers", "ours_torch"),
           "openvino_peer_max_abs_pixel_diff": float(np.abs(images["diffusers_openvino"] - images["ours_eager"]).max()),
           "ours_vs_eager_max_abs_pixel_diff": float(np.abs(images["ours"] - images["ours_eager"]).max())}
    if "runtime" in pipes:
        row["runtime_vs_openvino"] = ratio("diffusers_openvino", "runtime")
        row["runtime_vs_eager_max_abs_pixel_diff"] = float(np.abs(
            images["runtime"] - (images["ours_eager"] * 255).round() / 255).max())
    if args.profile:
        profile_ops(name, batch, profiled, Path(args.out) / "pipeline-profile.txt")
    row["ours_gflops"] = flops / stats["ours"]["median_s"] / 1e9
    row["ours_fraction_of_fp32_peak"] = row["ours_gflops"] / peak["fp32"]
    print(f"{name} batch {batch}: ours {row['ours_images_per_s']:.2f} img/s, diffusers {row['diffusers_images_per_s']:.2f} "
          f"img/s ({row['speedup']['median']:.2f}x), diffusers+OpenVINO {row['vs_openvino']['median']:.2f}x, "
          f"bf16 {row['bf16_speedup']['median']:.2f}x, bf16 vs diffusers+OpenVINO bf16 "
          f"{row['bf16_vs_openvino_bf16']['median']:.2f}x"
          + (f", runtime {row['runtime_vs_openvino']['median']:.2f}x diffusers+OpenVINO" if "runtime" in pipes else ""),
          flush=True)
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,shipped", help="presets and/or 'shipped'")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--profile", action="store_true",
                        help="also write pipeline-profile.txt: the ops that take the time in one call of each pipeline")
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    torch.set_grad_enabled(False)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name, model_dir in model_dirs(args.models.split(","), Path(work)).items():
            pipes = load_pipes(model_dir)
            for batch in batches:
                rows.append(measure(name, pipes, batch, args, peak))
    report = {"machine": machine(), "matmul_peak_gflops": peak, "rows": rows, "command": " ".join(sys.argv)}
    table = ["| model | batch | ours img/s | diffusers img/s | ratio (spread) | eager ratio | torch-trace ratio | "
             "max pixel diff vs eager | diffusers+OpenVINO img/s | ours vs it (spread) | GFLOP/s | of fp32 peak | "
             "ours bf16 img/s | vs diffusers fp32 (spread) | vs diffusers bf16 | vs diffusers+OpenVINO bf16 (spread) | "
             "runtime img/s | vs diffusers+OpenVINO (spread) | runtime max pixel diff vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = lambda key: f"{r[key]['median']:.2f}x ({r[key]['min']:.2f}–{r[key]['max']:.2f})"  # noqa: E731
        table.append(f"| {r['model']} | {r['batch']} | {r['ours_images_per_s']:.2f} | {r['diffusers_images_per_s']:.2f} "
                     f"| {spread('speedup')} | {r['eager_speedup']['median']:.2f}x | "
                     f"{r['torch_backend_speedup']['median']:.2f}x | {r['ours_vs_eager_max_abs_pixel_diff'] * 255:.2f}/255 | "
                     f"{r['diffusers_openvino_images_per_s']:.2f} | {spread('vs_openvino')} | {r['ours_gflops']:.0f} | "
                     f"{100 * r['ours_fraction_of_fp32_peak']:.0f} % | {r['ours_bf16_images_per_s']:.2f} | "
                     f"{spread('bf16_speedup')} | {r['bf16_vs_diffusers_bf16']['median']:.2f}x | "
                     f"{spread('bf16_vs_openvino_bf16')} | "
                     + (f"{r['runtime_images_per_s']:.2f} | {spread('runtime_vs_openvino')} | "
                        f"{r['runtime_vs_eager_max_abs_pixel_diff'] * 255:.0f}/255 |" if "runtime_vs_openvino" in r
                        else "– | – | – |"))
    table.append(f"\nfp32 matmul peak {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s; {machine()}")
    write_report(Path(args.out), "pipeline", report, "\n".join(table))
    return report


if __name__ == "__main__":
    main()
