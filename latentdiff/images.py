"""Small image utilities shared by the CLI, training validation and evaluation."""

from __future__ import annotations

import math

from PIL import Image


def image_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2, fill=(255, 255, 255)) -> Image.Image:
    """Tile equally sized images row by row (`cols` defaults to the smallest square that holds them all)."""
    if not images:
        raise ValueError("image_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), fill)
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return grid
