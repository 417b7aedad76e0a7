"""The evaluation job: `latentdiff eval …` or `accelerate launch training/evaluate.py …` (processes split the
prompts; every image has its own seed, so the report does not depend on the process count).

Writes REPORT_DIR/report.json, report.csv (one row per guidance scale and prompt group), prompts.csv (one row per
image: its prompt, group, CLIP score, the rank of its prompt among the candidates, its oracle checks), sweep.png
(CLIP score and FD against guidance scale) and grid-s{scale}.png (the first 16 images at each scale, each under its
prompt, enlarged to ≥ 128 px by pixel repetition). Every mean carries a 95 % bootstrap interval over images.

A shapes data set with held-out colour-shape pairs (`latentdiff data shapes --holdout…`) is evaluated on its own
prompts ("seen") and on its unseen prompts (scenes with held-out pairs, which no training image shows), reported
apart; --max-prompts and --sample-prompts apply to each group.
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

from .. import argparsing
from ..files import write_atomically
from . import metrics as ev
from ..images import image_grid



def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparsing.parser(prog, __doc__)
    parser.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    parser.add_argument("--prompts", required=True, help=".txt, .jsonl/.csv with a text column, or a data set folder")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--judge", default=None, help="CLIP folder or open_clip:ARCH:CHECKPOINT (default: MODEL/clip)")
    parser.add_argument("--reference", default=None, help="real images for FD (default: the prompts' data set)")
    parser.add_argument("--guidance-scales", default="1,2,4,7.5", help="comma-separated guidance scales to sweep")
    parser.add_argument("--guidance-rescale", type=float, default=0.0, metavar="PHI",
                        help="φ of Lin et al. 2024 at every scale: rescale the guided ε toward the conditional one's "
                             "standard deviation, in [0, 1] (default: 0, off)")
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("START", "STOP"),
                        help="at every scale, guide only the steps in this fraction of the sampling (0.3 1: the "
                             "first 30 %% unguided, Kynkäänniemi et al. 2024; default: 0 1, every step)")
    parser.add_argument("--steps", type=argparsing.positive_int, default=25, help="sampling steps per image")
    parser.add_argument("--hard-negatives", type=int, default=0, metavar="N",
                        help="on a shapes data set with held-out pairs: for N fresh seen scenes and N unseen ones, "
                             "does the model's denoising error rate the true caption above captions with the binding "
                             "swapped or the relation turned round? (diffusion classifier; default: 0, off)")
    parser.add_argument("--scheduler", choices=("ddpm", "ddim", "dpm++"), default=None,
                        help="sampler (default: the model's own; with --steps at most 8 on a model with few-step "
                             "weights, those weights and LCMScheduler). A scheduler named here always samples the "
                             "model itself")
    parser.add_argument("--dtype", choices=tuple(argparsing.DTYPE_NAMES), default="fp32",
                        help="the networks' precision while generating (the judge always runs in fp32)")
    parser.add_argument("--images-per-prompt", type=argparsing.positive_int, default=4, help="images per prompt and scale")
    parser.add_argument("--seed", type=argparsing.seed, default=0, help="base seed; each image has its own, derived from it")
    parser.add_argument("--batch-size", type=argparsing.positive_int, default=16, help="images generated per pipeline call")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N prompts (default: all)")
    parser.add_argument("--sample-prompts", type=int, default=None,
                        help="evaluate N prompts spread evenly over the list (after --max-prompts; deterministic; default: all)")
    parser.add_argument("--candidates", default=None,
                        help="texts the judge ranks for each generated image, as PROMPTS takes them "
                             "(default: every distinct prompt, before --max-prompts/--sample-prompts)")
    parser.add_argument("--max-reference", type=int, default=2000, help="reference images used for FD")
    parser.add_argument("--diversity", type=int, default=0, metavar="N",
                        help="shapes: for N prompts that leave positions free (counts, relations), generate "
                             "--diversity-seeds images each and count the distinct layouts the oracle reads (0: off)")
    parser.add_argument("--diversity-seeds", type=argparsing.positive_int, default=8, help="seeds per --diversity prompt")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals")
    parser.add_argument("--inception-weights", default=None,
                        help="Inception-v3 weights file: also report classic FID (needs torch-fidelity; default: no FID)")
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
        images = pipe([prompts[i].text for i in chunk], guidance_scale=scale,
                      guidance_rescale=args.guidance_rescale, guidance_interval=args.guidance_interval,
                      num_inference_steps=args.steps,
                      num_images_per_prompt=n, generator=generators).images
        out += [(i, k, images[j * n + k]) for j, i in enumerate(chunk) for k in range(n)]
    return out


def reference_images(args, dataset) -> tuple[list[Image.Image], list[str] | None]:
    """The first --max-reference real images, with their first captions when the data set has a text column."""
    if args.reference:
        from ..data.loader import open_dataset

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
    (before --max-prompts/--sample-prompts) and, for shapes prompts, the plainest caption of every scene the shapes
    world can draw. Every evaluated prompt must be among them."""
    if source is None:
        texts = [p.text for p in everything]
        if any(p.scene for p in everything):
            from ..data.shapes import all_first_captions

            texts += all_first_captions()
        candidates = list(dict.fromkeys(texts))
        if len(candidates) < 100:
            print(f"warning: the judge ranks each image among only {len(candidates)} candidate texts (the prompts "
                  "given), so retrieval is easy; pass --candidates with the texts the model could have been asked for")
        return candidates
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


def cut(prompts: list, max_prompts: int | None, sample_prompts: int | None) -> list:
    """--max-prompts (the first N), then --sample-prompts (N spread evenly)."""
    prompts = prompts[:max_prompts] if max_prompts else prompts
    return subsample(prompts, sample_prompts) if sample_prompts else prompts


def judge_reference(judge: ev.Judge, features: torch.Tensor, captions: list[str]) -> dict:
    """How well the judge itself matches real images to their captions: text→image and image→text retrieval."""
    distinct = list(dict.fromkeys(captions))
    return {"images": len(captions), "distinct_captions": len(distinct),
            **ev.two_way_retrieval(features, captions, judge.text_features(distinct))}


def sweep_plot(rows: list[dict], path: Path) -> None:
    """CLIP score, FD (when it could be computed) and, for shapes, the oracle mean per group, against guidance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = [r["guidance_scale"] for r in rows]
    panels = (["clip"] if all("clip_score" in r for r in rows) else []) + (["fd"] if all(r.get("fd") is not None for r in rows) else []) + \
        (["oracle"] if all(r.get("oracle") for r in rows) else [])
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for axis, panel in zip(axes[0], panels):
        if panel == "clip":
            axis.plot(scales, [r["clip_score"] for r in rows], "o-")
            axis.set(xlabel="guidance scale", ylabel="CLIP score", title="CLIP score (higher is better)")
        elif panel == "fd":
            axis.plot(scales, [r["fd"] for r in rows], "o-", color="C1")
            axis.set(xlabel="guidance scale", ylabel="FD", title="FD to reference (lower is better)")
        else:
            for name in dict.fromkeys(g for r in rows for g in r.get("groups", {})) or [None]:
                values = [(r["groups"][name] if name else r)["oracle"]["mean"] for r in rows]
                axis.plot(scales, values, "o-", label=name or "all")
            axis.set(xlabel="guidance scale", ylabel="oracle mean", title="oracle accuracy (higher is better)",
                     ylim=(0, 1))
            axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def check_args(args, prompts_written: bool = True) -> list[float]:
    """Validate the parsed flags; return the guidance scales. `prompts_written=False`: --prompts names a data set
    still to be made (a recipe's), so the rules that read it wait for the run."""
    scales = parse_scales(args.guidance_scales)
    if args.inception_weights is not None:
        if not Path(args.inception_weights).is_file():
            raise ValueError(f"--inception-weights must be an existing weights file, got {args.inception_weights!r}")
        ev.check_inception_available()
    if not 0 <= args.guidance_rescale <= 1:
        raise ValueError(f"--guidance-rescale must be in [0, 1], got {args.guidance_rescale}")
    args.guidance_interval = argparsing.check_interval("--guidance-interval", args.guidance_interval)
    if args.hard_negatives < 0:
        raise ValueError(f"--hard-negatives must be ≥ 0 (images per group; 0: off), got {args.hard_negatives}")
    from ..data.shapes import read_split

    if prompts_written and args.hard_negatives and not (Path(args.prompts).is_dir() and read_split(args.prompts)):
        raise ValueError(f"--hard-negatives needs a shapes data set with held-out pairs as --prompts (its split.json), "
                         f"got {args.prompts!r}")
    if args.diversity < 0:
        raise ValueError(f"--diversity must be ≥ 0, got {args.diversity}")
    for name in ("max_prompts", "sample_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    for name in ("steps", "images_per_prompt", "batch_size", "diversity_seeds", "bootstrap"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    return scales


def own_ranks(image_features: torch.Tensor, candidate_features: torch.Tensor, own: list[int]) -> np.ndarray:
    """1 + the number of candidate texts the judge rates above each image's own prompt (candidate index `own`)."""
    similarity = image_features.float() @ candidate_features.float().T
    mine = similarity[torch.arange(len(own)), torch.tensor(own)]
    return (similarity > mine[:, None]).sum(1).numpy() + 1


def summarise(scores: np.ndarray | None, ranks: np.ndarray | None, checks: list, prompt_ids: np.ndarray, args) -> dict:
    """CLIP score, retrieval top-1/top-5 (None without a judge) and oracle accuracies of a set of images, each with
    its 95 % bootstrap interval; prompts are resampled (each with all its images), as they are the unit sampled."""
    count = len(checks)

    def interval(statistic):
        return ev.bootstrap_interval(statistic, count, args.bootstrap, args.seed, clusters=prompt_ids)

    row = {"images": count}
    if scores is not None:
        row["clip_score"] = max(float(scores.mean()), 0.0)
        row["clip_score_ci"] = interval(lambda i: max(scores[i].mean(), 0.0))
        for k in (1, 5):
            hits = (ranks <= k).astype(np.float64)
            row[f"retrieval_top{k}"] = float(hits.mean())
            row[f"retrieval_top{k}_ci"] = interval(lambda i, hits=hits: hits[i].mean())
    known = [n for n, c in enumerate(checks) if c is not None]
    if known:
        table = ev.oracle_table([checks[n] for n in known])
        oracle = ev.oracle_from_table(table)
        tasks = tuple(t for t in oracle if t != "mean")
        clusters = prompt_ids[known]
        row["oracle"] = oracle
        row["oracle_ci"] = {task: ev.bootstrap_interval(
            lambda i, task=task: ev.oracle_from_table(table[i], tasks).get(task, np.nan), len(known), args.bootstrap,
            args.seed, clusters=clusters) for task in oracle}
    return row


def score_scale(gathered: list, prompts: list[ev.Prompt], candidates: list[str], candidate_features: torch.Tensor,
                reference: torch.Tensor | None, real_images: list, args) -> tuple[dict, list[dict]]:
    """The report row of one guidance scale, and one row per image, from every process's (prompt index, image
    index, image features, text features, oracle check, image or None) rows, sorted."""
    judged = gathered[0][2] is not None  # without a judge: the oracle only
    image_features = torch.from_numpy(np.stack([r[2] for r in gathered])) if judged else None
    scores = ranks = None
    if judged:
        text_features = torch.from_numpy(np.stack([r[3] for r in gathered]))
        scores = (100 * (image_features * text_features).sum(-1)).numpy().astype(np.float64)
        index = {text: i for i, text in enumerate(candidates)}
        ranks = own_ranks(image_features, candidate_features, [index[prompts[r[0]].text] for r in gathered])
    checks = [r[4] for r in gathered]
    prompt_ids = np.array([r[0] for r in gathered])
    row = summarise(scores, ranks, checks, prompt_ids, args)
    if judged:
        row["retrieval_candidates"] = len(candidates)
    groups = [prompts[r[0]].group for r in gathered]
    if any(groups):
        row["groups"] = {}
        for name in dict.fromkeys(groups):
            mask = np.array([g == name for g in groups])
            row["groups"][name] = summarise(scores[mask] if judged else None, ranks[mask] if judged else None,
                                            [c for c, m in zip(checks, mask) if m], prompt_ids[mask], args)
    # FD compares with the reference images, which show seen prompts only: unseen images stay out of it
    compared = np.array([g != "unseen" for g in groups])
    if reference is not None and len(reference) >= 2 and compared.sum() >= 2:
        row.update(fd=ev.frechet_distance(image_features[torch.from_numpy(compared)], reference),
                   fd_generated=int(compared.sum()), fd_reference=len(reference))
    if args.inception_weights is not None and real_images:
        row["inception_fid"] = ev.inception_fid([r[5] for r, c in zip(gathered, compared) if c], real_images,
                                                args.inception_weights)
    per_image = [{"prompt_index": r[0], "image_index": r[1], "prompt": prompts[r[0]].text,
                  "group": prompts[r[0]].group or "",
                  **({"clip_score": round(float(scores[n]), 4), "rank": int(ranks[n])} if judged else {}),
                  **({f"oracle_{k}": int(v) for k, v in r[4].items()} if r[4] else {})}
                 for n, r in enumerate(gathered)]
    return row, per_image


def diversity(pipe, prompts: list[ev.Prompt], scale: float, args) -> dict | None:
    """For up to --diversity prompts that leave positions free (counts and relations), --diversity-seeds images
    each: how many distinct layouts (`evaluation.layout`) the seeds give, on average, and how many prompts give one."""
    free = [i for i, p in enumerate(prompts) if p.scene and p.scene["task"] in ("count", "relation")]
    chosen = subsample(free, args.diversity)
    if not chosen:
        return None
    per_prompt = []
    for i in chosen:
        generators = [torch.Generator().manual_seed(ev.image_seed(args.seed + 1, i, k))
                      for k in range(args.diversity_seeds)]
        images = pipe(prompts[i].text, guidance_scale=scale, guidance_rescale=args.guidance_rescale,
                      guidance_interval=args.guidance_interval, num_inference_steps=args.steps,
                      num_images_per_prompt=args.diversity_seeds, generator=generators).images
        per_prompt.append(len({ev.layout(im) for im in images}))
    return {"prompts": len(chosen), "seeds": args.diversity_seeds,
            "mean_distinct_layouts": sum(per_prompt) / len(per_prompt),
            "all_alike": sum(n == 1 for n in per_prompt) / len(per_prompt), "distinct_layouts": per_prompt}


def write_tables(out: Path, report: dict, per_image: list[dict] | None = None) -> None:
    """report.json, report.csv (one row per guidance scale, and per group), prompts.csv and sweep.png."""
    rows = report["scales"]
    write_atomically(out / "report.json", json.dumps(report, indent=2) + "\n")
    with open(out / "report.csv", "w", newline="") as f:
        columns = ["guidance_scale", "group", "clip_score", "clip_score_ci", "retrieval_top1", "retrieval_top1_ci",
                   "retrieval_top5", "retrieval_top5_ci", "retrieval_candidates", "fd", "fd_generated", "fd_reference",
                   "inception_fid", "images", "seconds"]
        columns += [f"oracle_{t}{ci}" for t in (*ev.ORACLE_TASKS, "mean") for ci in ("", "_ci")]
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            for group, values in [("all", row), *row.get("groups", {}).items()]:
                flat = {**values, **{f"oracle_{k}": v for k, v in values.get("oracle", {}).items()},
                        **{f"oracle_{k}_ci": v for k, v in values.get("oracle_ci", {}).items()}}
                flat = {k: (" ".join(f"{x:.4f}" for x in v) if isinstance(v, list) else v) for k, v in flat.items()}
                writer.writerow({**flat, "guidance_scale": row["guidance_scale"], "group": group})
    if per_image:
        columns = ["guidance_scale", "prompt_index", "image_index", "group", "prompt", "clip_score", "rank",
                   *[f"oracle_{t}" for t in ev.ORACLE_TASKS]]
        with open(out / "prompts.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(per_image)
    sweep_plot(rows, out / "sweep.png")


def main(argv: list[str] | None = None, prog: str | None = None) -> dict | None:
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from ..model_folder import resolve_model_dir
    from ..pipelines.text_to_image import LatentDiffusionPipeline
    from ..schedulers import scheduler_from_name

    args = build_parser(prog).parse_args(argv)
    scales = check_args(args)
    state = PartialState(cpu=not torch.cuda.is_available())
    prompts, dataset = ev.load_prompts(args.prompts)
    if not prompts:
        raise ValueError(f"--prompts {args.prompts} holds no prompts")
    unseen = ev.unseen_prompts(args.prompts)
    if unseen:  # a data set with held-out pairs: its own prompts are the seen ones
        prompts = [ev.Prompt(p.text, p.scene, "seen") for p in prompts]
    everything = prompts + unseen
    prompts = [p for group in (prompts, unseen) if group
               for p in cut(group, args.max_prompts, args.sample_prompts)]
    candidates = load_candidates(args.candidates, prompts, everything)
    model_dir = resolve_model_dir(args.model)
    judge_spec = args.judge or (model_dir / "clip" if (model_dir / "clip" / "config.json").is_file() else None)
    if judge_spec is None:
        if not any(p.scene for p in prompts):
            raise ValueError(f"--judge: the model folder {model_dir} has no clip/ to judge with; pass --judge with a "
                             "CLIP folder or open_clip:ARCH:CHECKPOINT")
        print(f"no judge ({model_dir} has no clip/ and no --judge was given): CLIP score, retrieval and FD are "
              "skipped; the oracle scores the images")
    pipe = LatentDiffusionPipeline.from_pretrained(model_dir).to(state.device, dtype=argparsing.torch_dtype(args.dtype))
    if args.scheduler:  # a sampler chosen for the model itself: its few-step weights stay unused
        pipe.scheduler = scheduler_from_name(args.scheduler, pipe.scheduler.config)
        pipe.use_few_step = False
    few_step = pipe.few_step_for(args.steps) is not None
    argparsing.check_guidance_options_apply(args.guidance_rescale, few_step, args.steps, args.guidance_interval)
    pipe.set_progress_bar_config(disable=True)
    judge = ev.Judge(judge_spec, state.device) if judge_spec is not None else None
    real_images, real_captions = reference_images(args, dataset) if state.is_main_process and judge else ([], None)
    reference = judge.image_features(real_images) if real_images else None
    candidate_features = judge.text_features(candidates) if state.is_main_process and judge else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm.auto import tqdm

    if reference is None and state.is_main_process:
        fd_note = "no judge" if judge is None else ("no reference images: " + (
            f"{args.prompts} is a prompt file, not a data set; pass --reference with a folder of real images"
            if dataset is None and not args.reference else "the reference set is empty"))
        print(f"FD not computed: {fd_note}")
    rows, per_image = [], []
    for scale in tqdm(scales, desc="guidance scales", disable=not state.is_main_process):
        started = time.time()
        with state.split_between_processes(list(range(len(prompts)))) as mine:
            local = generate(pipe, prompts, mine, scale, args, show=state.is_main_process)  # [] with no prompts
            # numpy rows: a row of a torch tensor pickles its whole storage, which the gather would ship N times
            features = judge.image_features([im for _, _, im in local]).numpy() if local and judge else [None] * len(local)
            texts = (judge.text_features([prompts[i].text for i, _, _ in local]).numpy() if local and judge
                     else [None] * len(local))
            checks = [ev.oracle_scores(prompts[i].scene, im) if prompts[i].scene else None for i, _, im in local]
            shown = [(i, k, im) for i, k, im in local if i * args.images_per_prompt + k < 16]
        keep_images = args.inception_weights is not None
        gathered = gather_object([(i, k, f if f is None else f.copy(), t if t is None else t.copy(), c,
                                   im if keep_images else None)
                                  for (i, k, im), f, t, c in zip(local, features, texts, checks)])
        gathered_grid = gather_object(shown)
        if not state.is_main_process:
            continue
        gathered.sort(key=lambda r: (r[0], r[1]))  # the same order whatever the process count
        tiles = sorted(gathered_grid, key=lambda r: (r[0], r[1]))
        scored, images_rows = score_scale(gathered, prompts, candidates, candidate_features, reference, real_images,
                                          args)
        row = {"guidance_scale": scale, **scored, "image_size": tiles[0][2].size[0] if tiles else None}
        if args.diversity:
            row["diversity"] = diversity(pipe, prompts, scale, args)
        row["seconds"] = round(time.time() - started, 2)
        rows.append(row)
        per_image += [{"guidance_scale": scale, **r} for r in images_rows]
        image_grid([im for _, _, im in tiles], cols=min(args.images_per_prompt, 16) if args.images_per_prompt > 1
                   else None, labels=[prompts[i].text for i, _, _ in tiles],
                   zoom=-(-128 // tiles[0][2].size[0])).save(out / f"grid-s{scale:g}.png")
    if not state.is_main_process:
        return _finish(state, None)
    small = [r["image_size"] for r in rows if r.get("oracle") and r["image_size"] and r["image_size"] < 64]
    if small:
        print(f"warning: oracle accuracy on {small[0]} px images is unreliable (it needs ≥ 64 px; see README)")
    report = {"out": str(out), "model": str(model_dir), "judge": judge_spec and str(judge_spec), "prompts": len(prompts),
              "steps": args.steps, "scheduler": "LCMScheduler" if few_step else type(pipe.scheduler).__name__,
              "few_step": few_step, "dtype": args.dtype, "seed": args.seed,
              "guidance_rescale": args.guidance_rescale, "guidance_interval": list(args.guidance_interval),
              "images_per_prompt": args.images_per_prompt,
              "processes": state.num_processes, "scales": rows}
    if reference is None:
        report["fd_note"] = fd_note
    if unseen:
        report["groups"] = {"seen": sum(p.group == "seen" for p in prompts),
                            "unseen": sum(p.group == "unseen" for p in prompts)}
    if reference is not None and real_captions is not None:
        report["judge_on_reference"] = judge_reference(judge, reference, real_captions)
    if args.hard_negatives:
        report["hard_negatives"] = text_hard_negatives(pipe, args)
    write_tables(out, report, per_image)
    return _finish(state, report)


def text_hard_negatives(pipe, args) -> dict:
    """The diffusion classifier's hard-negative accuracy on fresh seen scenes and on unseen ones (per group)."""
    from .diffusion_classifier import hard_negative_accuracy, shapes_test_images

    started, result = time.time(), {}
    for group, (images, captions, tasks) in shapes_test_images(args.prompts, args.hard_negatives, args.seed).items():
        result[group] = hard_negative_accuracy(pipe, images, captions, seed=args.seed, tasks=tasks)
        print(f"hard negatives, {group}: " + ", ".join(f"{k} {v:.3f}" for k, v in result[group].items()
                                                       if isinstance(v, float)) + "; opposite by task: " +
              ", ".join(f"{task} {r['opposite']:.3f}" for task, r in result[group]["by_task"].items()
                        if r["opposite"] is not None))
    return {**result, "seconds": round(time.time() - started, 1)}


def _finish(state, report: dict | None) -> dict | None:
    """Every process waits for the report, then the process group (if any) is torn down before the processes exit:
    gloo threads still running at interpreter exit can abort a process."""
    state.wait_for_everyone()
    state.destroy_process_group()
    return report
