"""Pipelines: text-to-image, img2img and inpainting, with guidance objects and traced inference."""
