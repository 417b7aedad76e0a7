"""Read a shapes scene back from pixels: what a generated image shows, for oracle scoring (GenEval-style).

Generated images are blurred and anti-aliased, so the reading works on regions, not single pixels:
1. The background colour is the median of the image border.
2. Foreground is whatever stands clearly apart from it; its 8-connected regions are candidate objects.
3. A region's colour is the palette colour nearest its core (its most saturated pixels); a region whose core holds
   two colours (two touching objects) is split between them.
4. Each object's mask is where the pixels are at least halfway from the background to that colour, which puts a
   blurred edge where the sharp edge was; shape is the template (drawn by the same `draw_shape`, softened by a few
   blur widths) that overlaps the soft mask best; size and position follow from the mask's box.
Two objects of the same colour that touch read as one: counting assumes objects apart, as the data set draws them.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy import ndimage

from .shapes import BACKGROUNDS, COLOURS, SHAPES, Scene, SceneObject, draw_shape, position_of, sample_scene, size_of

PALETTE_NAMES = list(COLOURS) + list(BACKGROUNDS)
PALETTE = np.array([COLOURS.get(n) or BACKGROUNDS[n] for n in PALETTE_NAMES], dtype=np.float32)  # (K, 3)
OBJECT_PALETTE = PALETTE[: len(COLOURS)]
_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class ReadScene:
    background: str | None
    objects: list[SceneObject]

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour) for o in self.objects)


def shape_mask(shape: str, width: int, height: int, blur: float = 0.0) -> np.ndarray:
    """How much `shape` covers each pixel when drawn to fill a width × height box, softened by a Gaussian of
    `blur` pixels: (height, width) float in [0, 1]."""
    pad = int(np.ceil(3 * blur))
    canvas = Image.new("L", (width + 2 * pad, height + 2 * pad), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (pad, pad, pad + width - 1, pad + height - 1), 255)
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, dtype=np.float32)[pad: pad + height, pad: pad + width] / 255


def classify_shape(coverage: np.ndarray, blurs: tuple[float, ...] = (0.0, 0.6, 1.2)) -> tuple[str, float]:
    """The shape whose (possibly softened) drawing best overlaps a soft mask (h, w) in [0, 1], and that soft IoU."""
    h, w = coverage.shape
    best, best_score = SHAPES[0], -1.0
    for shape in SHAPES:
        for blur in blurs:
            template = shape_mask(shape, w, h, blur)
            score = float(np.minimum(coverage, template).sum() / max(np.maximum(coverage, template).sum(), 1e-6))
            if score > best_score:
                best, best_score = shape, score
    return best, best_score


def read_scene(image: Image.Image | np.ndarray, min_area_fraction: float = 0.004,
               foreground_distance: float = 45.0) -> ReadScene:
    """The background colour and every object (shape, colour, size, position, box) visible in an RGB image."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.max() <= 1.0:  # float images in [0, 1]
        pixels = pixels * 255
    size = pixels.shape[0]
    # 1. background from the border
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    bg = np.median(border, axis=0)
    background = PALETTE_NAMES[int(np.linalg.norm(PALETTE - bg, axis=1).argmin())]
    # 2. foreground regions
    offset = pixels - bg  # (H, W, 3)
    distance = np.linalg.norm(offset, axis=-1)
    regions, _ = ndimage.label(distance > foreground_distance, structure=_EIGHT)
    # how far each pixel is along the way from the background to each object colour: (H, W, C)
    directions = OBJECT_PALETTE - bg  # (C, 3)
    progress = offset @ directions.T / np.maximum((directions**2).sum(1), 1e-6)
    min_area, objects = max(4, min_area_fraction * size * size), []
    for index, found in enumerate(ndimage.find_objects(regions), start=1):
        inside = regions[found] == index
        if inside.sum() < min_area:
            continue
        # 3. colours of the region's core, the pixels farthest from the background
        core = inside & (distance[found] >= 0.8 * distance[found][inside].max())
        nearest = np.linalg.norm(pixels[found][core][:, None] - OBJECT_PALETTE[None], axis=-1).argmin(1)
        counts = np.bincount(nearest, minlength=len(COLOURS))
        present = [c for c in np.flatnonzero(counts) if counts[c] >= 0.15 * counts.sum()]
        share = progress[found][..., present].argmax(-1)  # which present colour each pixel leans to
        for k, colour_index in enumerate(present):
            # 4. the colour's soft mask; each part at least halfway to the colour is one object (two objects that
            # blur into one low-threshold region are still apart at the halfway level)
            coverage = np.where(inside & (share == k), np.clip(progress[found][..., colour_index], 0, 1), 0)
            parts, _ = ndimage.label(coverage >= 0.5, structure=_EIGHT)
            for part_index, part in enumerate(ndimage.find_objects(parts), start=1):
                mask = parts[part] == part_index
                if mask.sum() < min_area:
                    continue
                y0, x0 = found[0].start + part[0].start, found[1].start + part[1].start
                box = (x0, y0, x0 + mask.shape[1] - 1, y0 + mask.shape[0] - 1)
                shape, _ = classify_shape(np.where(mask, coverage[part], 0))
                objects.append(SceneObject(shape, PALETTE_NAMES[colour_index], size_of(box, size),
                                           position_of(box, size), box))
    objects.sort(key=lambda o: (o.box[1], o.box[0]))
    return ReadScene(background, objects)


def relation_between(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b along the axis on which their box centres differ most."""
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(ay - by) >= abs(ax - bx):
        return "above" if ay < by else "below"
    return "left of" if ax < bx else "right of"





# Robustness self-check: `python -m latentdiff.data.oracle` ------------------------------------------------------

DAMAGES = ("clean", "antialias", "blur", "downscale", "jpeg")


def damaged_render(scene: Scene, size: int, damage: str) -> Image.Image:
    """The scene as a generator might draw it: anti-aliased (drawn at 4x, downsampled), blurred (σ = 1 px),
    downscaled 2x and back, or JPEG-compressed (quality 75)."""
    if damage == "antialias":
        big = Scene.from_dict({**scene.to_dict(), "objects": [
            {**o, "box": [4 * o["box"][0], 4 * o["box"][1], 4 * o["box"][2] + 3, 4 * o["box"][3] + 3]}
            for o in scene.to_dict()["objects"]]})
        return big.render(4 * size).resize((size, size), Image.LANCZOS)
    image = scene.render(size)
    if damage == "blur":
        return image.filter(ImageFilter.GaussianBlur(1))
    if damage == "downscale":
        return image.resize((size // 2, size // 2), Image.BILINEAR).resize((size, size), Image.BICUBIC)
    if damage == "jpeg":
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=75)
        return Image.open(io.BytesIO(buffer.getvalue()))
    if damage != "clean":
        raise ValueError(f"damage must be one of {DAMAGES}, got {damage!r}")
    return image


def robustness(n: int = 300, size: int = 64, damage: str = "clean", seed: int = 0) -> dict[str, float]:
    """Fraction of n random scenes read entirely right: object count, then every object's shape, colour,
    position and size (objects matched in reading order), and the background."""
    rng, hits = random.Random(seed), dict.fromkeys(("count", "shape", "colour", "position", "size", "background"), 0)
    for _ in range(n):
        scene = sample_scene(rng, size)
        read = read_scene(damaged_render(scene, size, damage))
        truth = sorted(scene.objects, key=lambda o: (o.box[1], o.box[0]))
        hits["background"] += read.background == scene.background
        if len(read.objects) == len(truth):
            hits["count"] += 1
            for attribute in ("shape", "colour", "position", "size"):
                hits[attribute] += all(getattr(r, attribute) == getattr(t, attribute) for r, t in zip(read.objects, truth))
    return {k: v / n for k, v in hits.items()}


if __name__ == "__main__":
    print("| size | damage | " + " | ".join(("count", "shape", "colour", "position", "size", "background")) + " |")
    print("|---" * 8 + "|")
    for image_size in (32, 64):
        for kind in DAMAGES:
            result = robustness(300, image_size, kind)
            print(f"| {image_size} | {kind} | " + " | ".join(f"{v:.3f}" for v in result.values()) + " |", flush=True)
