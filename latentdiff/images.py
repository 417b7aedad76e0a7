"""Small image utilities shared by the CLI, training validation and evaluation."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont


def label_font(size: int = 11) -> ImageFont.ImageFont:
    """DejaVu Sans (it ships with matplotlib and covers accented names such as "piñata"), else Pillow's own."""
    try:
        from matplotlib import font_manager

        return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default()


def image_grid(images: list[Image.Image], cols: int | None = None, pad: int = 2, fill=(255, 255, 255),
               labels: list[str] | None = None, zoom: int = 1) -> Image.Image:
    """Tile equally sized images row by row (`cols` defaults to the smallest square that holds them all).

    `labels` writes a caption under each image (shortened to fit); `zoom` enlarges every image by an integer factor
    with nearest-neighbour sampling, so the pixels shown are the pixels generated.
    """
    if not images:
        raise ValueError("image_grid needs at least one image")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"image_grid needs one label per image, got {len(labels)} labels for {len(images)} images")
    if isinstance(zoom, bool) or not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"zoom must be an integer ≥ 1, got {zoom!r}")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size[0] * zoom, images[0].size[1] * zoom
    font = label_font() if labels else None
    strip = 14 if labels else 0
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * (h + strip) + (rows - 1) * pad), fill)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * (w + pad), (i // cols) * (h + strip + pad)
        grid.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        if labels:
            text = labels[i]
            while len(text) > 1 and draw.textlength(text, font=font) > w:
                text = text.removesuffix("…")[:-1] + "…"
            draw.text((x + (w - draw.textlength(text, font=font)) / 2, y + h + 1), text, fill=(0, 0, 0), font=font)
    return grid
