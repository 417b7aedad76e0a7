"""Pipelines: text-to-image, img2img and inpainting, with guidance objects and traced inference."""

MAX_SIZE_FACTOR = 8  # height and width up to 8× the model's native size: beyond, memory, not quality, is the limit
