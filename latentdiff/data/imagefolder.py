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


def write_imagefolder(out_dir: str | Path, rows: Iterable[tuple[Image.Image, dict]], overwrite: bool = False,
                      extra_files: dict[str, str] | None = None) -> int:
    """Write (image, metadata) rows as 000000.png, 000001.png … and metadata.jsonl; return the number written.

    Each metadata dict must hold `text` (a caption or a list of captions); `file_name` is added. `extra_files`
    ({name: text}, e.g. a split record) are written into the folder with it, before it appears.
    """
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise ValueError(f"out must be a folder, got the file {str(out_dir)!r}")
    if out.exists() and any(out.iterdir()):
        if not (out / "metadata.jsonl").is_file():
            raise ValueError(f"out must be a new or empty folder, or a data set to replace, got {str(out_dir)!r}, "
                             "which has files but no metadata.jsonl")
        if not overwrite:
            raise ValueError(f"out {str(out_dir)!r} already holds a data set (pass overwrite=True / --overwrite "
                             "to replace it)")
    staging = out.with_name(f".{out.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        count = 0
        with open(staging / "metadata.jsonl", "w", encoding="utf-8") as index:
            for count, (image, meta) in enumerate(rows, start=1):
                name = f"{count - 1:06d}.png"
                image.save(staging / name, optimize=False)
                index.write(json.dumps({"file_name": name, **meta}, ensure_ascii=False) + "\n")
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text, encoding="utf-8")
        if out.exists():
            out.rename(old := out.with_name(f".{out.name}.old"))
            staging.rename(out)
            shutil.rmtree(old)
        else:
            staging.rename(out)
        return count
    finally:
        shutil.rmtree(staging, ignore_errors=True)
