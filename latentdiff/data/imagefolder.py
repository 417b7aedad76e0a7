"""Write an image–caption data set as a `datasets` imagefolder: PNGs plus `metadata.jsonl` (file_name, text, …).

The folder is written under a staging name beside its destination and renamed into place when complete, so an
interrupted run never leaves a data set that looks finished.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from PIL import Image


def write_imagefolder(out_dir: str | Path, rows: Iterable[tuple[Image.Image, dict]], overwrite: bool = False) -> int:
    """Write (image, metadata) rows as 000000.png, 000001.png … and metadata.jsonl; return the number written.

    Each metadata dict must hold `text` (a caption or a list of captions); `file_name` is added.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise ValueError(f"out must be a new or empty folder, got {str(out_dir)!r}, which has files "
                             "(pass overwrite=True / --overwrite to replace it)")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    count = 0
    with open(staging / "metadata.jsonl", "w", encoding="utf-8") as index:
        for count, (image, meta) in enumerate(rows, start=1):
            name = f"{count - 1:06d}.png"
            image.save(staging / name, optimize=False)
            index.write(json.dumps({"file_name": name, **meta}, ensure_ascii=False) + "\n")
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return count
