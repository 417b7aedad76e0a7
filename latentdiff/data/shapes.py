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
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

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
TASK_WEIGHTS = (4, 3, 3)  # the default mix of TASKS, and always the mix of the unseen evaluation prompts
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 512
SPLIT_FILE = "split.json"  # a shapes data set's held-out pairs and where its unseen prompts are


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


def sample_scene(rng: random.Random, image_size: int, task: str | None = None,
                 task_weights: tuple[float, ...] = TASK_WEIGHTS) -> Scene:
    """One random scene; `task` fixes the kind, else it is drawn with `task_weights`, relative weights of TASKS
    (default: 40% single, 30% count, 30% relation)."""
    task = task or rng.choices(TASKS, weights=task_weights)[0]
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


# Held-out colour × shape pairs -----------------------------------------------------------------------------------

Pair = tuple[str, str]  # (colour, shape)


def parse_pairs(text: str) -> list[Pair]:
    """"red circle, blue star" → [("red", "circle"), ("blue", "star")]; every colour and shape must be known."""
    pairs = []
    for item in (t.strip() for t in text.split(",")):
        words = item.split()
        if len(words) != 2 or words[0] not in COLOURS or words[1] not in SHAPES:
            raise ValueError(f"--holdout must be comma-separated 'colour shape' pairs (colours {list(COLOURS)}, "
                             f"shapes {list(SHAPES)}), got {item!r} in {text!r}")
        pairs.append((words[0], words[1]))
    return list(dict.fromkeys(pairs))


def sample_holdout(fraction: float, seed: int = 0) -> list[Pair]:
    """round(fraction · 48) colour × shape pairs, chosen by `seed` so that every colour and every shape keeps as many
    seen pairs as it can: pairs are drawn a Latin-square diagonal at a time (each shape once, no colour twice), so a
    held-out pair is always a new combination of a colour and a shape that were both seen (with other partners)."""
    if not 0 < fraction <= 0.5:
        raise ValueError(f"--holdout-fraction must be in (0, 0.5] (each colour and shape must stay seen), got {fraction}")
    count = max(1, round(fraction * len(COLOURS) * len(SHAPES)))
    rng = random.Random(seed)
    colours, shapes = list(COLOURS), list(SHAPES)
    rng.shuffle(colours), rng.shuffle(shapes)
    # Diagonal d pairs shape i with colour (i + offset_d) mod 8. The offsets 0, 6, 4, 2, 1, 7, 5, 3 are distinct (so
    # are the diagonals' pairs), and each diagonal starts at the colour where the one before stopped: every colour is
    # held out once before any twice, and so on (6 shapes, 8 colours: 4 diagonals use each colour 3 times).
    n_colours, n_shapes = len(colours), len(shapes)
    offsets = [(d * n_shapes + d // 4) % n_colours for d in range(n_colours)]
    pairs = [(colours[(i + offset) % n_colours], shapes[i]) for offset in offsets for i in range(n_shapes)]
    return pairs[:count]


def scene_pairs(scene: Scene) -> set[Pair]:
    return {(o.colour, o.shape) for o in scene.objects}


def parse_task_weights(text: str) -> tuple[float, ...]:
    """"2,3,5" → (2.0, 3.0, 5.0): one weight ≥ 0 per task of TASKS, in that order, not all 0."""
    try:
        weights = tuple(float(w) for w in text.split(","))
    except ValueError:
        weights = ()
    if len(weights) != len(TASKS) or not all(w >= 0 for w in weights) or not sum(weights) > 0:
        raise ValueError(f"--task-weights must be {len(TASKS)} comma-separated weights ≥ 0, not all 0, for "
                         f"{', '.join(TASKS)} in that order (e.g. '4,3,3'), got {text!r}")
    return weights


def _sample_scenes(n: int, image_size: int, seed: int, keep,
                   task_weights: tuple[float, ...] = TASK_WEIGHTS) -> Iterator[Scene]:
    rng = random.Random(seed)
    made = 0
    while made < n:
        scene = sample_scene(rng, image_size, task_weights=task_weights)
        if keep(scene):
            made += 1
            yield scene


def _check_size(n: int, image_size: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) \
            or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"size must be an integer from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, got {image_size!r}")


def shapes_rows(n: int, image_size: int = 64, seed: int = 0, holdout: Iterable[Pair] = (),
                task_weights: tuple[float, ...] = TASK_WEIGHTS):
    """Yield n (image, metadata) rows: metadata holds the captions (`text`) and the ground truth (`scene`).
    Deterministic for a seed. No scene holds a `holdout` (colour, shape) pair, so no image or caption shows one
    (scenes that would are skipped, and the rest keep their draws). `task_weights` sets the mix of tasks."""
    _check_size(n, image_size)
    held = set(holdout)
    for scene in _sample_scenes(n, image_size, seed, lambda s: not scene_pairs(s) & held, task_weights):
        yield scene.render(image_size), {"text": scene.captions(), "scene": scene.to_dict()}


def unseen_prompts(n: int, holdout: Iterable[Pair], image_size: int = 64, seed: int = 0) -> list[dict]:
    """n evaluation prompts ({text, scene}) whose scenes each hold at least one `holdout` pair: the combinations a
    model trained on `shapes_rows(..., holdout=...)` never saw. Same scene distribution otherwise."""
    _check_size(n, image_size)
    held = set(holdout)
    if not held:
        raise ValueError("unseen prompts need at least one held-out pair")
    return [{"text": s.captions(), "scene": s.to_dict()}
            for s in _sample_scenes(n, image_size, seed, lambda s: bool(scene_pairs(s) & held))]


# Hard negatives: captions that differ from a true one only in binding, order or one attribute ---------------------

SHAPE_PLURALS = [PLURALS.get(shape, shape + "s") for shape in SHAPES]
WORD_GROUPS = (tuple(COLOURS), SHAPES, tuple(SHAPE_PLURALS), tuple(SIZES), ("two", "three"), ("2", "3"))
OPPOSITES = {"above": "below", "below": "above", "left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def _fix_articles(words: list[str]) -> str:
    """ "a orange star" → "an orange star": a negative must not give itself away by its grammar."""
    out = list(words)
    for i, word in enumerate(out[:-1]):
        if word in ("a", "an"):
            out[i] = "an" if out[i + 1][:1] in "aeiou" else "a"
    return " ".join(out)


def hard_negatives(caption: str) -> dict[str, list[str]]:
    """Captions one edit away from `caption`, by kind (NegCLIP-style, Yuksekgonul et al. 2023):
      swap     two words of one kind trade places (colours: "a red circle above a blue square" → "a blue circle
               above a red square"; shapes likewise): the same words, bound the other way
      opposite a relation or position word turned round ("above" → "below", "left" → "right")
      replace  one colour, shape, size or number word replaced by another of its kind
    Each list is distinct and never holds the caption itself."""
    # words are matched without trailing punctuation ("on the left, a small red circle"), which an edit keeps
    tails = [w[len(w.rstrip(",.;:")):] for w in caption.split()]
    words = [w.rstrip(",.;:") for w in caption.split()]

    def text(edited: list[str]) -> str:
        return _fix_articles([w + tail for w, tail in zip(edited, tails)])

    found: dict[str, list[str]] = {"swap": [], "opposite": [], "replace": []}
    for group in WORD_GROUPS:
        where = [i for i, w in enumerate(words) if w in group]
        for x, i in enumerate(where):
            for j in where[x + 1:]:
                if words[i] != words[j]:
                    swapped = list(words)
                    swapped[i], swapped[j] = words[j], words[i]
                    found["swap"].append(text(swapped))
            for other in group:
                if other != words[i]:
                    found["replace"].append(text(words[:i] + [other] + words[i + 1:]))
    for i, word in enumerate(words):
        if word in OPPOSITES:
            found["opposite"].append(text(words[:i] + [OPPOSITES[word]] + words[i + 1:]))
    return {kind: [c for c in dict.fromkeys(texts) if c != caption] for kind, texts in found.items()}


def caption_pairs(caption: str) -> set[Pair]:
    """The (colour, shape) pairs a caption names: "red circle(s)", and "circle in red" (a single-object phrasing)."""
    words, pairs = caption.split(), set()
    singular = dict(zip(SHAPE_PLURALS, SHAPES)) | {s: s for s in SHAPES}
    for i, word in enumerate(words[:-1]):
        if word in COLOURS and words[i + 1] in singular:
            pairs.add((word, singular[words[i + 1]]))
        if word in singular and words[i + 1] == "in" and i + 2 < len(words) and words[i + 2] in COLOURS:
            pairs.add((words[i + 2], singular[word]))
    return pairs


def read_split(data_dir) -> dict | None:
    """A shapes data set's split record (held-out pairs, unseen prompts), or None when it has none."""
    import json
    from pathlib import Path

    path = Path(data_dir) / SPLIT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def held_out_pairs(data_dir) -> set[Pair]:
    """The (colour, shape) pairs a shapes data set's split record holds out (none for other data)."""
    split = read_split(data_dir) if Path(data_dir).is_dir() else None
    return {tuple(p.split()) for p in split["holdout"]} if split else set()


def all_first_captions() -> list[str]:
    """The plainest caption (`Scene.captions()[0]`) of every scene this world can draw, up to jitter and background:
    single objects (shape × colour × size × position), counts (2–3 × colour × shape) and relations (two distinct
    colours × two shapes × relation). The candidate set for judge retrieval on shapes prompts."""
    texts = [f"{a(f'{size} {colour} {shape}')} {POSITION_PHRASES[position]}"
             for shape in SHAPES for colour in COLOURS for size in SIZES for position in POSITIONS]
    texts += [f"{NUMBERS[n]} {colour} {plural}" for n in (2, 3) for colour in COLOURS for plural in SHAPE_PLURALS]
    texts += [f"{a(f'{ca} {sa}')} {RELATION_PHRASES[relation]} {a(f'{cb} {sb}')}"
              for ca in COLOURS for cb in COLOURS if ca != cb for sa in SHAPES for sb in SHAPES for relation in RELATIONS]
    return texts
