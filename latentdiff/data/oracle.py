"""Read a shapes scene back from pixels: what a generated image shows, for oracle scoring (GenEval-style).

1. Every pixel takes the nearest palette colour (object colours and backgrounds), or none if it is far from all.
2. The background is the commonest colour on the image border.
3. Each object colour's connected regions (8-connected, above a minimum area) are the objects.
4. A region's shape is the one whose drawing into the region's box overlaps the region best (IoU), using the
   very `draw_shape` that renders the data set; its size and position follow from the box as when sampling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from .shapes import BACKGROUNDS, COLOURS, SHAPES, SIZES, SceneObject, draw_shape, position_of, size_of

PALETTE_NAMES = list(COLOURS) + list(BACKGROUNDS)
PALETTE = np.array([COLOURS.get(n) or BACKGROUNDS[n] for n in PALETTE_NAMES], dtype=np.float32)  # (K, 3)


@dataclass
class ReadScene:
    background: str | None
    objects: list[SceneObject]

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (colour is None or o.colour == colour) for o in self.objects)


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """The pixels `shape` covers when drawn to fill a width × height box: (height, width) bool."""
    canvas = Image.new("1", (width, height), 0)
    draw_shape(ImageDraw.Draw(canvas), shape, (0, 0, width - 1, height - 1), 1)
    return np.asarray(canvas, dtype=bool)


def classify_shape(region: np.ndarray) -> tuple[str, float]:
    """The shape whose drawing best overlaps a cropped region mask (h, w), and that IoU."""
    h, w = region.shape
    scores = {}
    for shape in SHAPES:
        template = shape_mask(shape, w, h)
        scores[shape] = (region & template).sum() / max((region | template).sum(), 1)
    best = max(scores, key=scores.get)
    return best, float(scores[best])


def read_scene(image: Image.Image | np.ndarray, max_colour_distance: float = 90.0,
               min_area_fraction: float = 0.004) -> ReadScene:
    """The background colour and every object (shape, colour, size, position, box) visible in an RGB image."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if pixels.max() <= 1.0:  # float images in [0, 1]
        pixels = pixels * 255
    size = pixels.shape[0]
    # 1. nearest palette colour per pixel (H, W); -1 where none is close
    distances = np.linalg.norm(pixels[:, :, None, :] - PALETTE[None, None], axis=-1)  # (H, W, K)
    labels = distances.argmin(-1)
    labels[distances.min(-1) > max_colour_distance] = -1
    # 2. background: the commonest label on the border
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    border = border[border >= 0]
    background = PALETTE_NAMES[np.bincount(border).argmax()] if len(border) else None
    # 3–4. objects: connected regions of each object colour
    objects, min_area = [], max(4, min_area_fraction * size * size)
    for k, colour in enumerate(PALETTE_NAMES):
        if colour == background or colour not in COLOURS:
            continue
        regions, n = ndimage.label(labels == k, structure=np.ones((3, 3), dtype=bool))
        for index, found in enumerate(ndimage.find_objects(regions), start=1):
            mask = regions[found] == index
            if mask.sum() < min_area:
                continue
            ys, xs = found
            box = (xs.start, ys.start, xs.stop - 1, ys.stop - 1)
            shape, _ = classify_shape(mask)
            objects.append(SceneObject(shape, colour, size_of(box, size), position_of(box, size), box))
    objects.sort(key=lambda o: (o.box[1], o.box[0]))
    return ReadScene(background, objects)


def relation_between(a: SceneObject, b: SceneObject) -> str:
    """Where a is relative to b along the axis on which their box centres differ most."""
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    if abs(ay - by) >= abs(ax - bx):
        return "above" if ay < by else "below"
    return "left of" if ax < bx else "right of"


__all__ = ["ReadScene", "read_scene", "classify_shape", "shape_mask", "relation_between", "SIZES"]
