"""Pipelines: text-to-image, img2img and inpainting, with guidance objects and traced inference."""

import contextlib
import logging

MAX_SIZE_FACTOR = 8  # height and width up to 8× the model's native size: beyond, memory, not quality, is the limit


@contextlib.contextmanager
def _without_log_records(logger_name: str, text: str):
    """Drop one library's log records that contain `text`, for the duration of the block."""
    drop = lambda record: text not in record.getMessage()  # noqa: E731
    target = logging.getLogger(logger_name)
    target.addFilter(drop)
    try:
        yield
    finally:
        target.removeFilter(drop)
