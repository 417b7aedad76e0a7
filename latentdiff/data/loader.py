"""The one image–caption loader every training script uses.

Sources: an imagefolder (images + metadata.jsonl/csv), a `datasets.save_to_disk` folder, or a hub data set name
(online only). Columns are found by name (`image`/`img`, `text`/`caption`/`captions`/`prompt`) or given.
A caption may be a string or a list of strings (one is picked at random each time the image is drawn); an empty
string is the unconditional caption; a missing one is an error that names the row. Images are decoded here, not
by `datasets`, so that an unreadable file is skipped and counted instead of stopping training.
"""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)
IMAGE_COLUMNS = ("image", "img", "images", "pixel_values")
CAPTION_COLUMNS = ("text", "caption", "captions", "prompt", "sentence")
UNREADABLE = (OSError, ValueError, UnidentifiedImageError, SyntaxError, Image.DecompressionBombError)


def open_dataset(source: str | Path, split: str = "train") -> datasets.Dataset:
    """A `datasets.Dataset` from an imagefolder, a save_to_disk folder, or (online) a hub data set name."""
    path = Path(source).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"split {split!r} is not in {source}; its splits are {sorted(loaded)}")
                loaded = loaded[split]
            return loaded
        return datasets.load_dataset("imagefolder", data_dir=str(path), split=split)
    if path.exists():
        raise ValueError(f"data must be a folder or a data set name, got the file {str(source)!r}")
    if path.is_absolute() or str(source).startswith((".", "~")) or len(path.parts) > 2 or path.parent.is_dir() \
            and str(path.parent) != ".":
        raise ValueError(f"data folder {str(source)!r} does not exist")
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        raise ValueError(f"data {str(source)!r} is not a local folder, and hub data sets cannot be loaded offline "
                         "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)")
    try:
        return datasets.load_dataset(str(source), split=split)
    except Exception as error:  # not a folder, and not reachable as a hub name: say both
        raise ValueError(f"data {str(source)!r} is neither a local folder nor a data set that could be loaded "
                         f"({type(error).__name__}: {error})") from error


def resolve_columns(dataset: datasets.Dataset, image_column: str | None = None,
                    caption_column: str | None = None) -> tuple[str, str]:
    """The image and caption column names, checked; defaults are found by their usual names."""
    columns = list(dataset.column_names)

    def pick(given, candidates, what):
        if given is not None:
            if given not in columns:
                raise ValueError(f"{what}_column {given!r} is not a column of this data set; its columns are {columns}")
            return given
        found = next((c for c in candidates if c in columns), None)
        if what == "image" and found is None:
            found = next((c for c, f in dataset.features.items() if isinstance(f, datasets.Image)), None)
        if found is None:
            raise ValueError(f"no {what} column found (looked for {list(candidates)}); pass --{what}-column, "
                             f"one of {columns}")
        return found

    return pick(image_column, IMAGE_COLUMNS, "image"), pick(caption_column, CAPTION_COLUMNS, "caption")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited over white, 16/32-bit greyscale scaled down rather than clipped."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or image.mode == "P" and "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def preprocess(image: Image.Image, resolution: int, random_crop: bool = False, flip: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Resize the shorter side to `resolution`, crop a square (centre or random), optionally mirror, scale to [−1, 1].

    Returns (3, resolution, resolution) float32. Random choices come from `generator` (default: torch's global one).
    """
    image = to_rgb(ImageOps.exif_transpose(image))
    scale = resolution / min(image.size)
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))),
                         Image.BICUBIC, reducing_gap=3.0)
    dx, dy = image.width - resolution, image.height - resolution
    if random_crop:
        x, y = int(torch.randint(dx + 1, (), generator=generator)), int(torch.randint(dy + 1, (), generator=generator))
    else:
        x, y = dx // 2, dy // 2
    image = image.crop((x, y, x + resolution, y + resolution))
    if flip and torch.rand((), generator=generator) < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3) in [−1, 1]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Items {"pixel_values": (3, R, R) in [−1, 1], "caption": str, "index": int}, or None for an unreadable image.

    Use `collate` as the DataLoader's collate_fn: it drops the None items and counts them in "skipped"; the
    training loop adds those up (with DataLoader workers, `unreadable` only sees this process's own reads).
    `random_flip` is off by default because captions say "on the left"/"left of".
    The caption drawn and the crop and flip of row i in epoch e depend on (seed, e, i) alone, never on torch's
    global RNG: the same in every process, with any number of workers, and after a resume.
    """

    def __init__(self, dataset: datasets.Dataset, resolution: int, image_column: str | None = None,
                 caption_column: str | None = None, random_crop: bool = False, random_flip: bool = False,
                 seed: int = 0):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        self.image_column, self.caption_column = resolve_columns(dataset, image_column, caption_column)
        if isinstance(dataset.features[self.image_column], datasets.Image):
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset, self.resolution = dataset, resolution
        self.random_crop, self.random_flip = random_crop, random_flip
        self.captions = dataset[self.caption_column]
        for row, caption in enumerate(self.captions):
            if caption is None or isinstance(caption, list) and (not caption or any(c is None for c in caption)):
                raise ValueError(f"row {row} has no caption in column {self.caption_column!r} (an empty string is "
                                 "the unconditional caption and is allowed; a missing caption is not)")
        self.unreadable: set[int] = set()
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def generator(self, index: int) -> torch.Generator:
        return item_generator(self.seed, self.epoch, index)

    def caption(self, index: int) -> str:
        return pick_caption(self.captions[index], self.generator(index))

    def pixels(self, index: int) -> torch.Tensor | None:
        """The preprocessed image at `index`, or None (logged once) when it cannot be read or decoded."""
        try:
            return load_pixels(self.dataset[index][self.image_column], self.resolution, self.random_crop,
                               self.random_flip, self.generator(index))
        except UNREADABLE as error:
            if index not in self.unreadable:
                logger.warning("skipping unreadable image at row %d: %s", index, error)
            self.unreadable.add(index)
            return None

    def __getitem__(self, index: int) -> dict | None:
        pixels = self.pixels(index)
        if pixels is None:
            return None
        return {"pixel_values": pixels, "caption": self.caption(index), "index": index}


def caption_groups(dataset) -> list[list[str]]:
    """Each row's captions as a list (a row with one caption gives a list of one)."""
    return [[c] if isinstance(c, str) else list(c) for c in dataset.captions]


def pick_caption(caption: str | list[str], generator: torch.Generator) -> str:
    """A row's caption: itself, or one of its list drawn with the row's generator (`item_generator`)."""
    if isinstance(caption, str):
        return caption
    return caption[int(torch.randint(len(caption), (), generator=generator))]


def load_pixels(value, resolution: int, random_crop: bool, random_flip: bool,
                generator: torch.Generator) -> torch.Tensor:
    """An image (PIL, `datasets`' {"bytes", "path"}, raw bytes or a path) decoded and preprocessed, its crop and flip
    drawn from a stream of the row's generator apart from its caption's; one of UNREADABLE if it cannot be read."""
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, dict):
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    elif isinstance(value, (bytes, bytearray)):
        image = Image.open(io.BytesIO(value))
    else:
        image = Image.open(value)
    image.load()
    generator = torch.Generator().manual_seed(generator.initial_seed() + 1)
    return preprocess(image, resolution, random_crop, random_flip, generator)


def readable_batches(dataset: ImageCaptionDataset, batch_size: int = 32):
    """Yield (rows, pixels (B, 3, R, R)) over the whole data set in order, leaving out unreadable images."""
    for start in range(0, len(dataset), batch_size):
        rows = [(i, dataset.pixels(i)) for i in range(start, min(start + batch_size, len(dataset)))]
        rows = [(i, p) for i, p in rows if p is not None]
        if rows:
            yield [i for i, _ in rows], torch.stack([p for _, p in rows])


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one row in one epoch: reproducible without any shared RNG state."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1_000_000_007 + index * 2 & (2**62 - 1))


def collate(items: list[dict | None]) -> dict:
    """Stack the readable items; "skipped" counts the unreadable ones in this batch (which may be all of them:
    then "pixel_values" has 0 rows)."""
    good = [item for item in items if item is not None]
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in good]) if good else torch.empty(0, 3, 0, 0),
        "captions": [item["caption"] for item in good],
        "indices": torch.tensor([item["index"] for item in good], dtype=torch.long),
        "skipped": len(items) - len(good),
    }
