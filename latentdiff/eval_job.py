"""The evaluation job: `latentdiff eval …` or `accelerate launch training/evaluate.py …` (processes split the
prompts; every image has its own seed, so the report does not depend on the process count).

Writes REPORT_DIR/report.json, report.csv, sweep.png (CLIP score and FD against guidance scale) and
grid-s{scale}.png (the first 16 images at each scale, each under its prompt, enlarged to ≥ 128 px by
pixel repetition).
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import evaluation as ev
from .images import image_grid

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--prompts", required=True, help=".txt, .jsonl/.csv with a text column, or a data set folder")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--judge", default=None, help="CLIP folder or open_clip:ARCH:CHECKPOINT (default: MODEL/clip)")
    parser.add_argument("--reference", default=None, help="real images for FD (default: the prompts' data set)")
    parser.add_argument("--guidance-scales", default="1,2,4,7.5")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--scheduler", choices=("ddpm", "ddim", "dpm++"), default=None)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32",
                        help="the networks' precision while generating (the judge always runs in fp32)")
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts")
    parser.add_argument("--sample-prompts", type=int, default=None,
                        help="evaluate N prompts spread evenly over the list (after --max-prompts; deterministic)")
    parser.add_argument("--candidates", default=None,
                        help="texts the judge ranks for each generated image, as PROMPTS takes them "
                             "(default: every distinct prompt, before --max-prompts/--sample-prompts)")
    parser.add_argument("--max-reference", type=int, default=2000, help="reference images used for FD")
    parser.add_argument("--inception-weights", default=None,
                        help="Inception-v3 weights file: also report classic FID (needs torch-fidelity)")
    return parser


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        scales = []
    if not scales or any(not (s >= 0 and s != float("inf")) for s in scales):
        raise ValueError(f"--guidance-scales must be comma-separated finite numbers ≥ 0, got {text!r}")
    return scales


@torch.no_grad()
def generate(pipe, prompts: list[ev.Prompt], indices: list[int], scale: float, args,
             show: bool = True) -> list[tuple[int, int, Image.Image]]:
    """(prompt index, image index, image) for this process's prompts; per-image seeds."""
    from tqdm.auto import tqdm

    n, out = args.images_per_prompt, []
    per_batch = max(1, args.batch_size // n)
    starts = range(0, len(indices), per_batch)
    for start in tqdm(starts, desc=f"guidance {scale:g}", unit="batch", disable=not show, leave=False):
        chunk = indices[start: start + per_batch]
        generators = [torch.Generator().manual_seed(ev.image_seed(args.seed, i, k)) for i in chunk for k in range(n)]
        images = pipe([prompts[i].text for i in chunk], guidance_scale=scale, num_inference_steps=args.steps,
                      num_images_per_prompt=n, generator=generators).images
        out += [(i, k, images[j * n + k]) for j, i in enumerate(chunk) for k in range(n)]
    return out


def reference_images(args, dataset) -> tuple[list[Image.Image], list[str] | None]:
    """The first --max-reference real images, with their first captions when the data set has a text column."""
    if args.reference:
        from .data.loader import open_dataset

        dataset = open_dataset(args.reference)
    if dataset is None:
        return [], None
    column = "image" if "image" in dataset.column_names else dataset.column_names[0]
    rows = dataset.select(range(min(len(dataset), args.max_reference)))
    texts = rows["text"] if "text" in rows.column_names else []
    # retrieval needs a caption on every image: a folder with some missing is used for FD only
    captions = [ev.first_caption(t) for t in texts] if texts and all(t for t in texts) else None
    return [row[column].convert("RGB") for row in rows], captions


def load_candidates(source: str | None, prompts: list[ev.Prompt], everything: list[ev.Prompt]) -> list[str]:
    """The distinct texts the judge ranks for each generated image: --candidates, or every prompt of --prompts
    (before --max-prompts/--sample-prompts). Every evaluated prompt must be among them."""
    if source is None:
        return list(dict.fromkeys(p.text for p in everything))
    try:
        candidates = list(dict.fromkeys(p.text for p in ev.load_prompts(source)[0]))
    except ValueError as error:
        raise ValueError(f"--candidates: {error}") from None
    known = set(candidates)
    missing = [p.text for p in prompts if p.text not in known]
    if missing:
        raise ValueError(f"--candidates {source} must hold every evaluated prompt; it lacks {len(missing)}, "
                         f"e.g. {missing[0]!r}")
    return candidates


def subsample(prompts: list, count: int) -> list:
    """`count` items spread evenly over `prompts`, in order (all of them when there are fewer)."""
    if count >= len(prompts):
        return prompts
    return [prompts[i] for i in np.linspace(0, len(prompts) - 1, count).round().astype(int)]


def judge_reference(judge: ev.Judge, features: torch.Tensor, captions: list[str]) -> dict:
    """How well the judge itself matches real images to their captions: text→image and image→text retrieval."""
    distinct = list(dict.fromkeys(captions))
    return {"images": len(captions), "distinct_captions": len(distinct),
            **ev.two_way_retrieval(features, captions, judge.text_features(distinct))}


def sweep_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance_scale"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.plot(scales, [r["clip_score"] for r in rows], "o-")
    left.set(xlabel="guidance scale", ylabel="CLIP score", title="CLIP score (higher is better)")
    if all(r.get("fd") is not None for r in rows):
        right.plot(scales, [r["fd"] for r in rows], "o-", color="C1")
    right.set(xlabel="guidance scale", ylabel="FD", title="FD to reference (lower is better)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def check_args(args) -> list[float]:
    """Validate the parsed flags; return the guidance scales."""
    scales = parse_scales(args.guidance_scales)
    if args.inception_weights is not None:
        if not Path(args.inception_weights).is_file():
            raise ValueError(f"--inception-weights must be an existing weights file, got {args.inception_weights!r}")
        ev.check_inception_available()
    for name in ("max_prompts", "sample_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    for name in ("steps", "images_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    return scales


def score_scale(gathered: list, prompts: list[ev.Prompt], candidates: list[str], candidate_features: torch.Tensor,
                reference: torch.Tensor | None, real_images: list, args) -> dict:
    """The report row of one guidance scale from every process's (prompt index, image index, image features,
    text features, oracle check, image or None) rows, sorted."""
    image_features = torch.from_numpy(np.stack([r[2] for r in gathered]))
    text_features = torch.from_numpy(np.stack([r[3] for r in gathered]))
    row = {"clip_score": ev.clip_score(image_features, text_features), "images": len(gathered)}
    # the judge ranks every candidate text for each generated image: is the image's own prompt among its top k?
    retrieved = ev.retrieval_accuracy(image_features, candidate_features, [prompts[r[0]].text for r in gathered],
                                      candidates)
    row.update({f"retrieval_{k}": v for k, v in retrieved.items()}, retrieval_candidates=len(candidates))
    if reference is not None and len(reference) >= 2:
        row.update(fd=ev.frechet_distance(image_features, reference), fd_generated=len(gathered),
                   fd_reference=len(reference))
    if args.inception_weights is not None and real_images:
        row["inception_fid"] = ev.inception_fid([r[5] for r in gathered], real_images, args.inception_weights)
    oracle = ev.oracle_accuracy([r[4] for r in gathered if r[4] is not None])
    if oracle:
        row["oracle"] = oracle
    return row


def write_tables(out: Path, report: dict) -> None:
    """report.json, report.csv (one row per guidance scale) and sweep.png."""
    rows = report["scales"]
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        columns = ["guidance_scale", "clip_score", "retrieval_top1", "retrieval_top5", "retrieval_candidates", "fd",
                   "fd_generated", "fd_reference", "inception_fid", "images", "seconds"]
        columns += [f"oracle_{t}" for t in (*ev.ORACLE_TASKS, "mean")]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{f"oracle_{k}": v for k, v in row.get("oracle", {}).items()}})
    sweep_plot(rows, out / "sweep.png")


def main(argv: list[str] | None = None) -> dict | None:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .model_folder import resolve_model_dir
    from .pipeline import LatentDiffusionPipeline
    from .schedulers import scheduler_from_name

    args = build_parser().parse_args(argv)
    scales = check_args(args)
    state = PartialState(cpu=not torch.cuda.is_available())
    prompts, dataset = ev.load_prompts(args.prompts)
    if not prompts:
        raise ValueError(f"--prompts {args.prompts} holds no prompts")
    everything = prompts
    prompts = prompts[: args.max_prompts] if args.max_prompts else prompts
    prompts = subsample(prompts, args.sample_prompts) if args.sample_prompts else prompts
    candidates = load_candidates(args.candidates, prompts, everything)
    model_dir = resolve_model_dir(args.model)
    judge_spec = args.judge or model_dir / "clip"
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir).to(state.device, dtype=DTYPES[args.dtype])
    if args.scheduler:
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    judge = ev.Judge(judge_spec, state.device)
    real_images, real_captions = reference_images(args, dataset) if state.is_main_process else ([], None)
    reference = judge.image_features(real_images) if real_images else None
    candidate_features = judge.text_features(candidates) if state.is_main_process else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    rows = []
    for scale in tqdm(scales, desc="guidance scales", disable=not state.is_main_process):
        started = time.time()
        with state.split_between_processes(list(range(len(prompts)))) as mine:
            local = generate(pipe, prompts, mine, scale, args, show=state.is_main_process)  # [] with no prompts
            # numpy rows: a row of a torch tensor pickles its whole storage, which the gather would ship N times
            features = judge.image_features([im for _, _, im in local]).numpy() if local else []
            texts = judge.text_features([prompts[i].text for i, _, _ in local]).numpy() if local else []
            checks = [ev.oracle_scores(prompts[i].scene, im) if prompts[i].scene else None for i, _, im in local]
            shown = [(i, k, im) for i, k, im in local if i * args.images_per_prompt + k < 16]
        keep_images = args.inception_weights is not None
        gathered = gather_object([(i, k, f.copy(), t.copy(), c, im if keep_images else None)
                                  for (i, k, im), f, t, c in zip(local, features, texts, checks)])
        gathered_grid = gather_object(shown)
        if not state.is_main_process:
            continue
        gathered.sort(key=lambda r: (r[0], r[1]))  # the same order whatever the process count
        tiles = sorted(gathered_grid, key=lambda r: (r[0], r[1]))
        row = {"guidance_scale": scale, **score_scale(gathered, prompts, candidates, candidate_features, reference,
                                                      real_images, args),
               "image_size": tiles[0][2].size[0] if tiles else None, "seconds": round(time.time() - started, 2)}
        rows.append(row)
        image_grid([im for _, _, im in tiles], cols=min(args.images_per_prompt, 16) if args.images_per_prompt > 1
                   else None, labels=[prompts[i].text for i, _, _ in tiles],
                   zoom=-(-128 // tiles[0][2].size[0])).save(out / f"grid-s{scale:g}.png")
    if not state.is_main_process:
        return _finish(state, None)
    small = [r["image_size"] for r in rows if r.get("oracle") and r["image_size"] and r["image_size"] < 64]
    if small:
        print(f"warning: oracle accuracy on {small[0]} px images is unreliable (it needs ≥ 64 px; see README)")
    report = {"out": str(out), "model": str(model_dir), "judge": str(judge_spec), "prompts": len(prompts),
              "steps": args.steps, "scheduler": type(pipe.scheduler).__name__, "dtype": args.dtype, "seed": args.seed,
              "images_per_prompt": args.images_per_prompt, "processes": state.num_processes, "scales": rows}
    if reference is not None and real_captions is not None:
        report["judge_on_reference"] = judge_reference(judge, reference, real_captions)
    write_tables(out, report)
    return _finish(state, report)


def _finish(state, report: dict | None) -> dict | None:
    """Every process waits for the report, then the process group (if any) is torn down before the processes exit:
    gloo threads still running at interpreter exit can abort a process."""
    state.wait_for_everyone()
    state.destroy_process_group()
    return report
