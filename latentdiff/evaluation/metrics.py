"""Evaluation: CLIP score, Fréchet distance in a judge's feature space, shapes oracle accuracy, guidance sweeps.

    latentdiff eval --model DIR --prompts PROMPTS --out REPORT_DIR [--judge JUDGE] [--guidance-scales 1,2,4,7.5]

Definitions (DESIGN.md, "Evaluation definitions"):
- CLIP score = 100 · cos(image embedding, prompt embedding) per image–prompt pair, averaged and floored at 0, as
  torchmetrics' CLIPScore computes it; prompts are truncated to the judge's context keeping end-of-text.
- FD = Fréchet distance between Gaussian fits (float64) of the judge's unit-norm image embeddings of generated and
  reference images: ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁Σ₂)^½, the trace from the eigenvalues of Σ₁Σ₂.
- Retrieval: for each generated image, the judge ranks every candidate text (by default every distinct prompt of
  the set); top-k accuracy is the fraction of images whose own prompt is among the k best. The judge's own quality
  is the same measure on real captioned images (text→image: each distinct caption ranks every image).
- Oracle accuracy on shapes prompts (GenEval rules): object (the shape is there), colour (in its colour), position
  (in its colour at the named place: left, right, top, bottom, center), count (exactly n of that shape in that
  colour — GenEval counts the class alone; our count prompts name the colour), colour binding (both objects of a
  two-object prompt, each in its own colour) and relation (such a pair in the stated relation: GenEval's
  "position"), and their mean. The oracle needs ≥ 64 px images to be reliable (see README).
Each image's seed depends on its prompt's index and its own, so the numbers do not depend on how many
processes split the prompts.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.oracle import read_scene, relation_between
from ..data.shapes import Scene
from ..models import pooled

ORACLE_TASKS = ("object", "colour", "position", "count", "colour_binding", "relation")


# 1. Prompts ---------------------------------------------------------------------------------------------------------

@dataclass
class Prompt:
    text: str
    scene: dict | None = None
    group: str | None = None  # "seen" / "unseen" for a shapes data set with held-out pairs


def load_prompts(source: str | Path, text_column: str = "text") -> tuple[list[Prompt], object | None]:
    """Prompts from a .txt (one a line), a .jsonl/.csv with a `text` column, or a data set folder (first caption of
    each row, with its `scene` when there is one); also returns that data set, for reference images."""
    path = Path(source)
    if path.is_file() and path.suffix == ".txt":
        return [Prompt(line.strip()) for line in path.read_text().splitlines() if line.strip()], None
    if path.is_file() and path.suffix in (".jsonl", ".csv"):
        rows = ([json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.suffix == ".jsonl"
                else list(csv.DictReader(path.open())))
        if rows and text_column not in rows[0]:
            raise ValueError(f"prompts file {source} has no {text_column!r} column; its columns are {list(rows[0])}")
        scene = lambda r: json.loads(r["scene"]) if isinstance(r.get("scene"), str) else r.get("scene")  # noqa: E731
        return [Prompt(first_caption(r[text_column]), scene(r)) for r in rows], None
    if path.is_dir():
        from ..data.loader import open_dataset

        dataset = open_dataset(path)
        scenes = dataset["scene"] if "scene" in dataset.column_names else [None] * len(dataset)
        return [Prompt(first_caption(t), s) for t, s in zip(dataset[text_column], scenes)], dataset
    raise ValueError(f"prompts must be a .txt, .jsonl or .csv file or a data set folder, got {str(source)!r}")


def unseen_prompts(source: str | Path) -> list[Prompt]:
    """A shapes data set's prompts with held-out colour-shape pairs (its split record's unseen.jsonl), or []."""
    from ..data.shapes import read_split

    path = Path(source)
    split = read_split(path) if path.is_dir() else None
    if not split:
        return []
    rows = [json.loads(line) for line in (path / split["unseen_prompts"]).read_text().splitlines() if line.strip()]
    return [Prompt(first_caption(r["text"]), r["scene"], "unseen") for r in rows]


def first_caption(caption) -> str:
    return caption if isinstance(caption, str) else caption[0]


# 2. Judges ------------------------------------------------------------------------------------------------------------

class Judge:
    """A CLIP that embeds images and prompts: a transformers CLIP folder (the model's own clip/ by default) or an
    open_clip model with a local checkpoint, `open_clip:ARCH:CHECKPOINT_FILE`."""

    def __init__(self, spec: str | Path, device: str | torch.device = "cpu"):
        self.spec, self.device = str(spec), torch.device(device)
        if self.spec.startswith("open_clip:"):
            import open_clip

            _, arch, checkpoint = self.spec.split(":", 2)
            model, _, self.preprocess = open_clip.create_model_and_transforms(arch, pretrained=checkpoint)
            self.model, self.tokenizer = model.eval().to(self.device), open_clip.get_tokenizer(arch)
            self.kind = "open_clip"
        else:
            from transformers import CLIPModel, CLIPProcessor

            if not (Path(self.spec) / "config.json").is_file():
                raise ValueError(f"judge must be a CLIP folder or open_clip:ARCH:CHECKPOINT, got {self.spec!r}")
            model = CLIPModel.from_pretrained(self.spec, use_safetensors=True, dtype=torch.float32)  # not as stored
            self.model = model.eval().to(self.device)
            self.processor = CLIPProcessor.from_pretrained(self.spec)
            self.kind = "transformers"

    @torch.no_grad()
    def image_features(self, images: list[Image.Image], batch_size: int = 64) -> torch.Tensor:
        """Unit-norm image embeddings (N, P), float32."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = [im.convert("RGB") for im in images[i: i + batch_size]]
            if self.kind == "open_clip":
                features = self.model.encode_image(torch.stack([self.preprocess(im) for im in chunk]).to(self.device))
            else:
                pixels = self.processor(images=chunk, return_tensors="pt")["pixel_values"].to(self.device)
                features = pooled(self.model.get_image_features(pixel_values=pixels))
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_features(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-norm prompt embeddings (N, P); prompts longer than the context keep their end-of-text token."""
        out = []
        for i in range(0, len(texts), batch_size):
            chunk = texts[i: i + batch_size]
            if self.kind == "open_clip":
                features = self.model.encode_text(self.tokenizer(chunk).to(self.device))
            else:
                tokens = self.processor.tokenizer(chunk, padding=True, truncation=True, return_tensors="pt",
                                                  max_length=self.model.config.text_config.max_position_embeddings)
                features = pooled(self.model.get_text_features(input_ids=tokens.input_ids.to(self.device),
                                                                attention_mask=tokens.attention_mask.to(self.device)))
            out.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu())
        return torch.cat(out)


# 3. Metrics -----------------------------------------------------------------------------------------------------------

def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """100 · cos per pair, averaged, floored at 0 (torchmetrics' CLIPScore)."""
    return max(float((100 * (image_features * text_features).sum(-1)).mean()), 0.0)


def retrieval_accuracy(queries: torch.Tensor, candidates: torch.Tensor, query_labels: list, candidate_labels: list,
                       ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k retrieval accuracy: the fraction of queries (N, D) for which one of the k candidates (M, D) most
    similar to it (cosine; the features are unit-norm) carries the query's label. Candidates with equal labels are
    interchangeable (two emoji named alike, one caption on several images)."""
    if len(queries) == 0 or len(candidates) == 0:
        raise ValueError(f"retrieval needs queries and candidates, got {len(queries)} and {len(candidates)}")
    if len(query_labels) != len(queries) or len(candidate_labels) != len(candidates):
        raise ValueError(f"retrieval needs one label per query and per candidate, got {len(query_labels)} labels for "
                         f"{len(queries)} queries and {len(candidate_labels)} for {len(candidates)} candidates")
    ids = {label: i for i, label in enumerate(dict.fromkeys([*candidate_labels, *query_labels]))}
    target = torch.tensor([ids[label] for label in query_labels])
    owner = torch.tensor([ids[label] for label in candidate_labels])
    similarity = queries.float().cpu() @ candidates.float().cpu().T
    top = similarity.topk(min(max(ks), len(candidates)), dim=1).indices
    hit = owner[top] == target[:, None]  # (N, k): does the i-th retrieved candidate carry the query's label
    return {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}


def two_way_retrieval(image_features: torch.Tensor, captions: list[str], text_features: torch.Tensor) -> dict:
    """Image→text over the distinct captions and text→image from each distinct caption over every image, top 1
    and top 5. `captions` has one entry per image; `text_features` one row per distinct caption, in the order of
    `list(dict.fromkeys(captions))`: a repeated wrong caption must not take two of an image's top-k places."""
    distinct = list(dict.fromkeys(captions))
    if len(text_features) != len(distinct):
        raise ValueError(f"two_way_retrieval needs one text feature per distinct caption ({len(distinct)}), "
                         f"got {len(text_features)}")
    result = {}
    for name, args in (("image_to_text", (image_features, text_features, captions, distinct)),
                       ("text_to_image", (text_features, image_features, distinct, captions))):
        result.update({f"{name}_{k}": v for k, v in retrieval_accuracy(*args).items()})
    return result


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N, D), in float64 (Heusel et al. 2017, eq. 6)."""
    a, b = features_a.double(), features_b.double()
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"FD needs at least 2 samples on each side, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = torch.cov(a.T), torch.cov(b.T)
    # tr (Σ_a Σ_b)^½ = Σ √λ over the eigenvalues of Σ_a Σ_b, which are real and ≥ 0 up to round-off
    root_trace = torch.linalg.eigvals(sigma_a @ sigma_b).sqrt().real.sum()
    distance = float((mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * root_trace)
    return max(distance, 0.0)  # round-off can leave −1e-7 for identical sets


def inception_fid(generated: list[Image.Image], reference: list[Image.Image], weights: str | Path) -> float:
    """Classic FID (Inception-v3 pool features) with the user's own weights file, through torchmetrics."""
    if not Path(weights).is_file():
        raise ValueError(f"--inception-weights must be an existing weights file, got {str(weights)!r}")
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(weights))
    except ModuleNotFoundError as error:
        raise ValueError(f"Inception FID needs torch-fidelity (pip install torch-fidelity): {error}") from error
    for images, real in ((reference, True), (generated, False)):
        for start in range(0, len(images), 64):  # Inception runs on 299 px: small batches keep memory bounded
            chunk = [im.convert("RGB").resize((299, 299), Image.BICUBIC) for im in images[start: start + 64]]
            fid.update(torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in chunk]), real=real)
    return float(fid.compute())


def check_inception_available() -> None:
    try:
        import torch_fidelity  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError("--inception-weights needs torch-fidelity (pip install torch-fidelity)") from None


def oracle_scores(scene: dict, image: Image.Image) -> dict[str, bool]:
    """The GenEval-style checks that apply to this scene's task."""
    truth, read = Scene.from_dict(scene), read_scene(image)
    def found(o):
        return [r for r in read.objects if r.shape == o.shape and r.colour == o.colour]
    if truth.task == "single":
        o = truth.objects[0]
        return {"object": any(r.shape == o.shape for r in read.objects), "colour": bool(found(o)),
                "position": any(r.position == o.position for r in found(o))}
    if truth.task == "count":
        o = truth.objects[0]
        return {"count": read.count(o.shape, o.colour) == len(truth.objects)}
    a, b = truth.objects
    # GenEval: any detected pair of the two named objects in the stated relation counts. Our relation prompts name
    # colours too, so the objects are matched by shape and colour (and relation can never beat colour binding).
    pairs = [(ra, rb) for ra in found(a) for rb in found(b)]
    return {"colour_binding": bool(pairs), "relation": any(relation_between(ra, rb) == truth.relation for ra, rb in pairs)}


def oracle_accuracy(checks: list[dict[str, bool]]) -> dict[str, float]:
    """Per task, the fraction of its checks that passed; "mean" over the tasks present."""
    return oracle_from_table(oracle_table(checks)) if checks else {}


def bootstrap_interval(statistic, samples: int, resamples: int = 1000, seed: int = 0, level: float = 0.95,
                       clusters: np.ndarray | None = None) -> list[float] | None:
    """Percentile bootstrap interval of `statistic(indices)` over `samples` items drawn with replacement (Efron &
    Tibshirani 1993, §13.3); None with fewer than 2 items. With `clusters` (a label per item, e.g. its prompt), whole
    clusters are drawn, so that correlated items (several images of one prompt) do not narrow the interval."""
    if samples < 2:
        return None
    rng = np.random.default_rng(seed)
    if clusters is None:
        draws = (rng.integers(0, samples, samples) for _ in range(resamples))
    else:
        members = [np.flatnonzero(clusters == c) for c in np.unique(clusters)]
        draws = (np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
                 for _ in range(resamples))
    values = np.array([statistic(indices) for indices in draws], dtype=np.float64)
    values = values[np.isfinite(values)]
    if not len(values):
        return None
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return [float(low), float(high)]


def oracle_table(checks: list[dict[str, bool]]) -> np.ndarray:
    """(images, tasks) array of 1/0 per check, NaN where a task does not apply (ORACLE_TASKS order)."""
    return np.array([[float(c[t]) if t in c else np.nan for t in ORACLE_TASKS] for c in checks], dtype=np.float64)


def oracle_from_table(table: np.ndarray, tasks: tuple[str, ...] | None = None) -> dict[str, float]:
    """Oracle accuracy of the checks in an `oracle_table` (per task over the images it applies to; "mean" over
    the tasks present, or over `tasks`, NaN when one of them has no check: a bootstrap resample that misses a task
    must not turn the mean into another statistic)."""
    result = {}
    for k, task in enumerate(ORACLE_TASKS):
        column = table[:, k][~np.isnan(table[:, k])]
        if len(column):
            result[task] = float(column.mean())
    if tasks is not None:
        result["mean"] = (sum(result[t] for t in tasks) / len(tasks)) if all(t in result for t in tasks) else np.nan
    elif result:
        result["mean"] = sum(result.values()) / len(result)
    return result


def layout(image: Image.Image) -> tuple:
    """The layout of a shapes image as the oracle reads it: every object's shape, colour, size and the cell of a
    4 × 4 grid its centre is in; two images with the same layout show the same scene up to a few pixels."""
    read, size = read_scene(image), image.size[0]
    return tuple(sorted((o.shape, o.colour, o.size, min(3, int(4 * (o.box[0] + o.box[2]) / 2 / size)),
                         min(3, int(4 * (o.box[1] + o.box[3]) / 2 / size))) for o in read.objects))


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    """A seed for one image, independent across (seed, prompt, image): runs with other --seed share no image."""
    return int(np.random.SeedSequence([seed, prompt_index, image_index]).generate_state(1)[0])


@torch.no_grad()
def round_trip_oracle(vae, images: list[Image.Image], scenes: list[dict], device="cpu", batch_size: int = 50) -> dict:
    """Oracle accuracy of real shapes scenes and of the same scenes through the VAE and back (the posterior's mode,
    decoded): the ceiling that VAE sets for any U-Net trained on its latents."""
    real, round_trip = [], []
    for start in range(0, len(images), batch_size):
        chunk = [im.convert("RGB") for im in images[start: start + batch_size]]
        pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in chunk]))
        pixels = pixels.permute(0, 3, 1, 2).to(device, dtype=vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample.float().clamp(-1, 1)
        arrays = ((decoded.permute(0, 2, 3, 1).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
        for image, array, scene in zip(chunk, arrays, scenes[start: start + batch_size]):
            real.append(oracle_scores(scene, image))
            round_trip.append(oracle_scores(scene, Image.fromarray(array)))
    return {"scenes": len(images), "real": oracle_accuracy(real), "round_trip": oracle_accuracy(round_trip)}
