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

    `labels` writes a caption under each image (wrapped between words, up to four lines); `zoom` enlarges every image by an integer factor
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
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines = [wrap_label(text, w, measure, font) for text in labels] if labels else []
    strip = 14 * max(len(t) for t in lines) if labels else 0
    grid = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * (h + strip) + (rows - 1) * pad), fill)
    draw = ImageDraw.Draw(grid)
    for i, image in enumerate(images):
        x, y = (i % cols) * (w + pad), (i // cols) * (h + strip + pad)
        grid.paste(image.convert("RGB").resize((w, h), Image.NEAREST), (x, y))
        for k, line in enumerate(lines[i] if labels else ()):
            draw.text((x + (w - draw.textlength(line, font=font)) / 2, y + h + 1 + 14 * k), line, fill=(0, 0, 0),
                      font=font)
    return grid


def wrap_label(text: str, width: float, draw: ImageDraw.ImageDraw, font, max_lines: int = 4) -> list[str]:
    """The label in lines of at most `width` pixels, broken between words (a word too long for a line is shortened
    with "…", and so is a last line when more than `max_lines` would be needed)."""
    def fit(line: str) -> str:
        while len(line) > 1 and draw.textlength(line, font=font) > width:
            line = line.removesuffix("…")[:-1] + "…"
        return line

    lines: list[str] = []
    for word in text.split() or [""]:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [" ".join(lines[max_lines - 1:])]
    return [fit(line) for line in lines]


# How an image was made, inside the PNG -------------------------------------------------------------------------------

PARAMETERS_KEY, JSON_KEY = "parameters", "latentdiff"  # AUTOMATIC1111's text chunk, and ours (JSON)
A1111_SAMPLERS = {"DDIMScheduler": "DDIM", "DDPMScheduler": "DDPM", "DPMSolverMultistepScheduler": "DPM++ 2M",
                  "EulerDiscreteScheduler": "Euler", "EulerAncestralDiscreteScheduler": "Euler a",
                  "LMSDiscreteScheduler": "LMS", "PNDMScheduler": "PLMS", "HeunDiscreteScheduler": "Heun",
                  "LCMScheduler": "LCM", "UniPCMultistepScheduler": "UniPC"}


def parameters_text(params: dict) -> str:
    """AUTOMATIC1111's `parameters` text: the prompt, `Negative prompt: …`, then `Steps: N, Sampler: …, CFG scale:
    S, Seed: K, Size: WxH, Model: …, Version: …` (what A1111, ComfyUI and civitai read)."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    fields = {"Steps": params["steps"], "Sampler": A1111_SAMPLERS.get(params["scheduler"], params["scheduler"]),
              "CFG scale": params["guidance_scale"],
              **({"Rescale CFG": params["guidance_rescale"]} if params.get("guidance_rescale") else {}),
              **({"Guidance interval": "{:g}-{:g}".format(*params["guidance_interval"])}
                 if params.get("guidance_interval") else {}),
              "Seed": params["seed"],
              "Size": f"{params['width']}x{params['height']}", "Model": params["model"],
              **({"Denoising strength": params["strength"]} if params.get("strength") is not None else {}),
              "Version": params["version"]}
    lines.append(", ".join(f"{k}: {v}" for k, v in fields.items()))
    return "\n".join(lines)


def save_image(image: Image.Image, path, params: dict | None = None) -> None:
    """Save `image`; a PNG also carries `params` as A1111's `parameters` chunk and as JSON (`latentdiff`)."""
    from pathlib import Path

    if params is None or Path(path).suffix.lower() != ".png":
        image.save(path)
        return
    image.save(path, pnginfo=png_info(params))


def png_info(params: dict):
    """The PNG text chunks that carry `params`: A1111's `parameters` and latentdiff's JSON."""
    import json

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_itxt(PARAMETERS_KEY, parameters_text(params))
    info.add_itxt(JSON_KEY, json.dumps(params, ensure_ascii=False))
    return info


def read_parameters(path) -> dict:
    """The generation parameters a PNG written by latentdiff carries (ValueError naming the file otherwise)."""
    import json

    try:
        with Image.open(path) as image:
            text = image.text.get(JSON_KEY) if hasattr(image, "text") else None
    except OSError as error:
        raise ValueError(f"{path} is not a readable image: {error}") from None
    if text is None:
        raise ValueError(f"{path} carries no latentdiff parameters (a PNG written by `latentdiff generate` does)")
    try:
        return json.loads(text)
    except ValueError:
        raise ValueError(f"{path}: its latentdiff parameters are not valid JSON") from None
