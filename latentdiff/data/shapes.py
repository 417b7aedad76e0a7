"""Procedural shapes scenes with their ground truth, for training and for oracle scoring (GenEval-style tasks).

A scene is one of three tasks, each drawn in flat colours on a flat background, never overlapping:
  single    one object: shape, colour, size and position ("a small red circle on the left")
  count     two or three identical objects ("three blue stars")
  relation  two objects of different colours, one above/below/left of/right of the other
            ("a red circle above a blue square")
Every scene is captioned several ways and stored with its full ground truth (`Scene.to_dict`), so that
`latentdiff.data.oracle` can read any image back and score it.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field

from PIL import Image, ImageDraw

COLOURS = {  # object colours: far apart in RGB, none of them a background colour
    "red": (230, 25, 25), "green": (30, 170, 50), "blue": (30, 70, 230), "yellow": (250, 220, 30),
    "orange": (250, 140, 0), "purple": (140, 40, 200), "pink": (255, 120, 200), "cyan": (20, 210, 220),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128)}
SIZES = {"small": 0.2, "medium": 0.3, "large": 0.42}  # side of the object's box, as a fraction of the image side
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}  # box centres, as fractions of the image side
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                    "center": "in the center"}
RELATIONS = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}  # and its inverse
RELATION_PHRASES = {"above": "above", "below": "below", "left of": "to the left of", "right of": "to the right of"}
NUMBERS = {1: "one", 2: "two", 3: "three"}
PLURALS = {"cross": "crosses"}  # every other shape takes "s"
TASKS = ("single", "count", "relation")
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512


def a(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange star"."""
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def _normalised(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Stretch a polygon so that it spans the unit square exactly: every shape fills its box edge to edge."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in points]


def _star(points: int = 5, inner: float = 0.4) -> list[tuple[float, float]]:
    angles = [math.pi * k / points - math.pi / 2 for k in range(2 * points)]
    return _normalised([((1 if k % 2 == 0 else inner) * math.cos(a), (1 if k % 2 == 0 else inner) * math.sin(a))
                        for k, a in enumerate(angles)])


_THIRD = 1 / 3
POLYGONS = {  # in the unit square; "circle" and "square" are drawn as ellipse and rectangle
    "triangle": [(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)],
    "diamond": [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)],
    "star": _star(),
    "cross": [(_THIRD, 0), (2 * _THIRD, 0), (2 * _THIRD, _THIRD), (1, _THIRD), (1, 2 * _THIRD), (2 * _THIRD, 2 * _THIRD),
              (2 * _THIRD, 1), (_THIRD, 1), (_THIRD, 2 * _THIRD), (0, 2 * _THIRD), (0, _THIRD), (_THIRD, _THIRD)],
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    """Draw `shape` filling the pixel box (x0, y0, x1, y1), both corners inclusive."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + u * (x1 - x0), y0 + v * (y1 - y0)) for u, v in POLYGONS[shape]], fill=fill)


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    position: str
    box: tuple[int, int, int, int]  # pixels, corners inclusive


@dataclass
class Scene:
    task: str
    background: str
    objects: list[SceneObject] = field(default_factory=list)
    relation: str | None = None  # objects[0] <relation> objects[1]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(d["task"], d["background"], [SceneObject(**{**o, "box": tuple(o["box"])}) for o in d["objects"]],
                   d.get("relation"))

    def render(self, image_size: int) -> Image.Image:
        image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[self.background])
        draw = ImageDraw.Draw(image)
        for obj in self.objects:
            draw_shape(draw, obj.shape, obj.box, COLOURS[obj.colour])
        return image

    def captions(self) -> list[str]:
        """Several phrasings, the first the plainest; every one states the whole scene."""
        bg = f"on {a(self.background)} background"
        if self.task == "single":
            o = self.objects[0]
            where = POSITION_PHRASES[o.position]
            return [f"{a(f'{o.size} {o.colour} {o.shape}')} {where}", f"{a(f'{o.colour} {o.shape}')} {where} {bg}",
                    f"{where}, {a(f'{o.size} {o.colour} {o.shape}')}", f"{a(f'{o.size} {o.shape}')} in {o.colour} {where}"]
        if self.task == "count":
            o, n = self.objects[0], len(self.objects)
            shapes = PLURALS.get(o.shape, o.shape + "s")
            return [f"{NUMBERS[n]} {o.colour} {shapes}", f"{NUMBERS[n]} {o.colour} {shapes} {bg}",
                    f"{n} {o.colour} {shapes}", f"a picture of {NUMBERS[n]} {o.colour} {shapes}"]
        first, second = (a(f"{o.colour} {o.shape}") for o in self.objects)
        forward, backward = RELATION_PHRASES[self.relation], RELATION_PHRASES[RELATIONS[self.relation]]
        return [f"{first} {forward} {second}", f"{second} {backward} {first}", f"{first} {forward} {second} {bg}"]


def position_of(box: tuple[int, int, int, int], image_size: int) -> str:
    """The named position whose anchor is nearest the box centre."""
    cx, cy = (box[0] + box[2] + 1) / 2 / image_size, (box[1] + box[3] + 1) / 2 / image_size
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)


def size_of(box: tuple[int, int, int, int], image_size: int) -> str:
    side = max(box[2] - box[0] + 1, box[3] - box[1] + 1) / image_size
    return min(SIZES, key=lambda s: abs(SIZES[s] - side))


def _box(cx: float, cy: float, size: str, image_size: int) -> tuple[int, int, int, int]:
    side = max(3, round(SIZES[size] * image_size))
    x0 = min(max(round(cx * image_size - side / 2), 0), image_size - side)
    y0 = min(max(round(cy * image_size - side / 2), 0), image_size - side)
    return (x0, y0, x0 + side - 1, y0 + side - 1)


def _boxes_in_cells(rng: random.Random, n: int, size: str, image_size: int) -> list[tuple[int, int, int, int]]:
    """n boxes in n distinct cells of a 3 × 3 grid, each jittered inside its cell with a gap of ≥ 1 px (≥ 2 px from
    48 px up) to the cell's edge, so they never touch; a box larger than its cell allows is shrunk to fit."""
    edges = [round(k * image_size / 3) for k in range(4)]
    gap = 1 if image_size < 48 else 2
    boxes = []
    for cell in rng.sample(range(9), n):
        (x0, x1), (y0, y1) = [(edges[i] + gap, edges[i + 1] - 1 - gap) for i in (cell % 3, cell // 3)]
        side = max(1, min(round(SIZES[size] * image_size), x1 - x0 + 1, y1 - y0 + 1))
        x, y = rng.randint(x0, x1 - side + 1), rng.randint(y0, y1 - side + 1)
        boxes.append((x, y, x + side - 1, y + side - 1))
    return boxes


def sample_scene(rng: random.Random, image_size: int, task: str | None = None) -> Scene:
    """One random scene; `task` fixes the kind (default: 40% single, 30% count, 30% relation)."""
    task = task or rng.choices(TASKS, weights=(4, 3, 3))[0]
    scene = Scene(task=task, background=rng.choice(list(BACKGROUNDS)))
    jitter = lambda: rng.uniform(-0.04, 0.04)  # noqa: E731
    if task == "single":
        shape, colour, size, position = (rng.choice(list(x)) for x in (SHAPES, COLOURS, SIZES, POSITIONS))
        cx, cy = POSITIONS[position]
        box = _box(cx + jitter(), cy + jitter(), size, image_size)
        scene.objects.append(SceneObject(shape, colour, size, position, box))
    elif task == "count":
        shape, colour, size = rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(["small", "medium"])
        boxes = _boxes_in_cells(rng, rng.choice([2, 3]), size, image_size)
        scene.objects += [SceneObject(shape, colour, size_of(b, image_size), position_of(b, image_size), b)
                          for b in boxes]
    else:
        relation = rng.choice(list(RELATIONS))
        colour_a, colour_b = rng.sample(list(COLOURS), 2)
        near, far, side = 0.27, 0.73, lambda: rng.uniform(0.3, 0.7)  # noqa: E731
        centres = {"above": ((side(), near), (side(), far)), "below": ((side(), far), (side(), near)),
                   "left of": ((near, side()), (far, side())), "right of": ((far, side()), (near, side()))}[relation]
        for (cx, cy), colour in zip(centres, (colour_a, colour_b)):
            size = rng.choice(["small", "medium"])
            box = _box(cx, cy, size, image_size)
            scene.objects.append(SceneObject(rng.choice(SHAPES), colour, size, position_of(box, image_size), box))
        scene.relation = relation
    return scene


def shapes_rows(n: int, image_size: int = 64, seed: int = 0):
    """Yield n (image, metadata) rows: metadata holds the captions (`text`) and the ground truth (`scene`).
    Deterministic for a seed."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size!r}")
    rng = random.Random(seed)
    for _ in range(n):
        scene = sample_scene(rng, image_size)
        yield scene.render(image_size), {"text": scene.captions(), "scene": scene.to_dict()}
