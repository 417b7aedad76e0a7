"""Sharded image–caption data: WebDataset tar shards, written from any source and read as a stream.

A shard is a tar of samples, each a group of files with one key: the image as it was stored (`.png`, `.jpg`, …),
its caption (`.txt`) and its metadata (`.json`; a list of captions goes there as "captions"). `index.json` beside
the shards lists them with their sample counts, so that a reader knows every epoch's length without opening them.
Shards written by img2dataset (`{00000..N}.tar` with `.jpg`/`.txt`/`.json`) read as they are: their counts come
from img2dataset's `*_stats.json`, or from the tars' headers.

`ShardStream` reads them for training. Each epoch deals the shards, in an order drawn from (seed, epoch), to the
readers, one per data-loader worker of each process, so no sample is read twice in an epoch; every reader yields
the same number of batches (the least any of them can fill), as distributed training needs; a resumed epoch skips
the batches already consumed without decoding their images. The caption drawn and the crop and flip of sample i in
epoch e depend on (seed, e, i) alone, exactly as in the map-style loader, so a sample's pixels are the same whether
read from shards or from its imagefolder.
"""

from __future__ import annotations

import functools
import io
import itertools
import json
import logging
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .loader import UNREADABLE, item_generator, load_pixels, pick_caption, resolve_columns

logger = logging.getLogger(__name__)
INDEX = "index.json"
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")


@dataclass(frozen=True)
class Shard:
    url: str  # a path (local) or anything webdataset opens
    samples: int
    first: int  # the global index of its first sample: shards in order number the samples 0, 1, …


# Writing --------------------------------------------------------------------------------------------------------

def write_shards(source: str | Path, out: str | Path, shard_size: int = 10_000, image_column: str | None = None,
                 caption_column: str | None = None, overwrite: bool = False) -> dict:
    """Shards of any image–caption source `open_dataset` reads (imagefolder, save_to_disk, the built-in sets),
    `shard_size` samples each, in its row order, images stored as they were (not re-encoded); returns the index."""
    import datasets
    import webdataset as wds

    from ..files import write_atomically
    from .loader import open_dataset

    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"--out {str(out)!r} is not empty; pass --overwrite to replace the shards in it")
    dataset = open_dataset(source)
    image_column, caption_column = resolve_columns(dataset, image_column, caption_column)
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.tar")) + [out / INDEX]:
        if old.exists():
            old.unlink()
    extra = [c for c in dataset.column_names if c not in (image_column, caption_column)]
    written: list[str] = []
    with wds.ShardWriter(str(out / "%06d.tar"), maxcount=shard_size, verbose=0,
                         post=lambda name: written.append(Path(name).name)) as sink:
        for i, row in enumerate(dataset):
            data, ext = _image_bytes(row[image_column], i)
            caption = row[caption_column]
            if caption is None:
                raise ValueError(f"row {i} has no caption in column {caption_column!r}")
            meta = {k: row[k] for k in extra if _jsonable(row[k])}
            if isinstance(caption, list):
                meta["captions"] = caption
            sample = {"__key__": f"{i:09d}", ext: data, "txt": caption if isinstance(caption, str) else caption[0],
                      "json": json.dumps(meta, ensure_ascii=False).encode()}
            sink.write(sample)
    counts = [min(shard_size, len(dataset) - k * shard_size) for k in range(len(written))]
    index = {"format": "webdataset", "samples": len(dataset), "source": str(source),
             "shards": [{"url": name, "samples": n} for name, n in zip(written, counts)]}
    write_atomically(out / INDEX, json.dumps(index, indent=2) + "\n")
    return index


def _image_bytes(value, row: int) -> tuple[bytes, str]:
    """An image cell's stored bytes and the extension of their format."""
    from PIL import Image

    if isinstance(value, dict) and value.get("bytes"):
        data = value["bytes"]
    elif isinstance(value, dict) and value.get("path"):
        data = Path(value["path"]).read_bytes()
    elif isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise ValueError(f"row {row}: the image cell holds {type(value).__name__}, not an image")
    try:
        kind = (Image.open(io.BytesIO(data)).format or "png").lower()
    except UNREADABLE:
        kind = "png"  # stored anyway: training skips and counts unreadable images, as for an imagefolder
    return data, {"jpeg": "jpg", "tiff": "tif"}.get(kind, kind)


def _jsonable(value) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# Finding shards -------------------------------------------------------------------------------------------------

def is_shards(spec: str | Path) -> bool:
    """Whether `--data` names shards: a folder with index.json or tars, a brace pattern, or a .tar file."""
    text = str(spec)
    if re.search(r"\{\d+\.\.\d+\}", text) or text.endswith(".tar"):
        return True
    path = Path(spec)
    return path.is_dir() and ((path / INDEX).is_file() or
                              (any(path.glob("*.tar")) and not any(path.glob("metadata.*"))))


def list_shards(spec: str | Path) -> list[Shard]:
    """The shards `spec` names, in order, with their sample counts (index.json, img2dataset's stats, or the tars
    themselves, in that order of preference)."""
    import braceexpand

    path = Path(spec)
    known: dict[str, int] = {}
    if path.is_dir():
        index = path / INDEX
        if index.is_file():
            entries = json.loads(index.read_text())["shards"]
            urls = [str(path / e["url"]) for e in entries]
            known = {u: e["samples"] for u, e in zip(urls, entries)}
        else:
            urls = [str(p) for p in sorted(path.glob("*.tar"))]
        if not urls:
            raise ValueError(f"--data {str(spec)!r} holds no .tar shards")
    else:
        urls = list(braceexpand.braceexpand(str(spec)))
        missing = [u for u in urls if not Path(u).is_file()]
        if missing:
            raise ValueError(f"--data {str(spec)!r}: {len(missing)} of its {len(urls)} shards do not exist, e.g. "
                             f"{missing[0]!r}")
        parent_index = Path(urls[0]).parent / INDEX
        if parent_index.is_file():
            entries = json.loads(parent_index.read_text())["shards"]
            known = {str(parent_index.parent / e["url"]): e["samples"] for e in entries}
    shards, first = [], 0
    for url in urls:
        samples = known.get(url)
        if samples is None:
            samples = _counted(Path(url))
        shards.append(Shard(url, samples, first))
        first += samples
    return shards


def _counted(tar: Path) -> int:
    """Samples in a tar: img2dataset's stats file when it wrote one, else the distinct keys in its headers."""
    stats = tar.with_name(tar.stem + "_stats.json")
    if stats.is_file():
        try:
            return int(json.loads(stats.read_text())["successes"])
        except (ValueError, KeyError, TypeError):
            pass
    keys = set()
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.isfile():
                name = member.name.rsplit("/", 1)
                keys.add((name[0] if len(name) == 2 else "", name[-1].split(".", 1)[0]))
    return len(keys)


# Reading --------------------------------------------------------------------------------------------------------

class ShardStream(torch.utils.data.IterableDataset):
    """Batches {"pixel_values", "captions", "indices", "skipped"} (`loader.collate`'s) from shards; see the module
    docstring. `rank`/`world` are the process's, `workers` the DataLoader's; samples with a global index ≥
    `end` (a held-out tail) are left out. Use with `DataLoader(stream, batch_size=None, num_workers=workers)`."""

    def __init__(self, shards: list[Shard], resolution: int, batch_size: int, seed: int = 0,
                 random_crop: bool = False, random_flip: bool = False, end: int | None = None,
                 shuffle_buffer: int = 1000, rank: int = 0, world: int = 1, workers: int = 0):
        super().__init__()
        self.shards, self.resolution, self.batch_size = shards, resolution, batch_size
        self.seed, self.random_crop, self.random_flip = seed, random_crop, random_flip
        self.end = sum(s.samples for s in shards) if end is None else end
        self.shuffle_buffer, self.rank, self.world, self.workers = shuffle_buffer, rank, world, workers
        self.epoch, self.skip = 0, 0
        readers = world * max(workers, 1)
        if len(shards) < readers:
            raise ValueError(f"--data has {len(shards)} shard(s), and {world} process(es) × {max(workers, 1)} "
                             f"data-loader worker(s) need at least {readers}, one each: write smaller shards "
                             "(latentdiff data shard --shard-size) or use fewer --num-workers")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @functools.cached_property
    def captions(self) -> list:
        """Every training caption (or caption list) in order, read from the shards once (a tokenizer's corpus)."""
        return captions(self.shards, self.end)

    def skip_batches(self, batches: int) -> None:
        """Resume this epoch after `batches` batches this process already trained on (none decoded again)."""
        self.skip = batches

    def assignment(self, epoch: int) -> list[list[Shard]]:
        """Each reader's shards in `epoch`: a permutation drawn from (seed, epoch), dealt round-robin."""
        readers = self.world * max(self.workers, 1)
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        dealt = [self.shards[i] for i in order.tolist()]
        return [dealt[r::readers] for r in range(readers)]

    def batches_per_reader(self, epoch: int | None = None) -> int:
        usable = [sum(max(0, min(s.first + s.samples, self.end) - s.first) for s in mine)
                  for mine in self.assignment(self.epoch if epoch is None else epoch)]
        return min(usable) // self.batch_size

    def __len__(self) -> int:
        return self.batches_per_reader() * max(self.workers, 1)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != max(self.workers, 1):
            raise RuntimeError(f"ShardStream was made for {self.workers} workers but runs in {workers}")
        # The DataLoader takes its workers' batches in turn, from worker 0. Batch b of an epoch is reader b mod W's,
        # so a resumed epoch (self.skip batches served) starts at reader skip mod W: worker 0 plays that reader.
        logical = (worker + self.skip) % workers
        reader = self.rank * workers + logical
        batches = self.batches_per_reader()
        skip = max(0, (self.skip - logical + workers - 1) // workers)  # the batches of this reader already served
        rows = self._rows(self.assignment(self.epoch)[reader], reader)
        for b in range(batches):
            chunk = list(itertools.islice(rows, self.batch_size))
            if len(chunk) < self.batch_size:  # a damaged tar held fewer samples than its count
                logger.warning("reader %d ran out of samples after %d of %d batches (a damaged shard?)", reader, b,
                               batches)
                return
            if b >= skip:
                yield self._collate(chunk)

    def _rows(self, shards: list[Shard], reader: int):
        """(global index, image bytes, caption or captions) of the reader's shards in a seeded shuffle-buffer order."""
        import random

        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 1_000_033 + reader)
        buffer = []
        for row in self._read(shards):
            buffer.append(row)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _read(self, shards: list[Shard]):
        """(global index, sample dict) of `shards` in order, below `end`."""
        for shard in shards:
            for index, sample in shard_samples(shard):
                if index >= self.end:
                    break  # the rest of this shard is held out
                yield index, sample

    def _collate(self, chunk: list) -> dict:
        pixels, captions, indices = [], [], []
        for index, sample in chunk:
            image, caption = _image_and_caption(sample)
            generator = item_generator(self.seed, self.epoch, index)
            try:
                if image is None:
                    raise OSError("the sample has no image file")
                pixels.append(load_pixels(image, self.resolution, self.random_crop, self.random_flip, generator))
            except UNREADABLE as error:
                logger.warning("skipping unreadable image of sample %d: %s", index, error)
                continue
            captions.append(pick_caption(caption, generator))
            indices.append(index)
        return {"pixel_values": torch.stack(pixels) if pixels else torch.empty(0, 3, 0, 0), "captions": captions,
                "indices": torch.tensor(indices, dtype=torch.long), "skipped": len(chunk) - len(pixels)}


def _image_and_caption(sample: dict) -> tuple[bytes | None, str | list[str]]:
    image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
    meta = {}
    if "json" in sample:
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            meta = {}
    captions = meta.get("captions") if isinstance(meta, dict) else None
    if isinstance(captions, list) and captions and all(isinstance(c, str) for c in captions):
        return image, captions
    return image, sample["txt"].decode("utf-8") if "txt" in sample else ""


def shard_samples(shard: Shard):
    """(global index, sample dict) of one shard, in its order (a damaged member is warned about and skipped)."""
    import webdataset as wds

    samples = wds.DataPipeline(wds.SimpleShardList([shard.url]), wds.tarfile_to_samples(handler=wds.warn_and_continue))
    for k, sample in enumerate(samples):
        yield shard.first + k, sample


def read_samples(shards: list[Shard], start: int, end: int) -> dict:
    """Samples start ≤ i < end as columns: "image" ({"bytes", "path"}), "text", and their metadata's keys (a held-out
    tail, for random access)."""
    rows = []
    for shard in shards:
        if shard.first + shard.samples <= start or shard.first >= end:
            continue
        for index, sample in shard_samples(shard):
            if start <= index < end:
                image, caption = _image_and_caption(sample)
                meta = json.loads(sample["json"]) if "json" in sample else {}
                rows.append({**(meta if isinstance(meta, dict) else {}), "image": {"bytes": image, "path": None},
                             "text": caption})
    keys = list(dict.fromkeys(k for row in rows for k in row if k != "captions"))
    return {k: [row.get(k) for row in rows] for k in keys}


def captions(shards: list[Shard], end: int) -> list:
    """Every caption (or caption list) of samples below `end`, in order (training a tokenizer on them)."""
    return [_image_and_caption(sample)[1] for shard in shards if shard.first < end
            for index, sample in shard_samples(shard) if index < end]


class DeviceLoader:
    """A DataLoader over a ShardStream, its tensors moved to `device`: what `accelerator.prepare` would give,
    without accelerate sharding a stream that shards itself."""

    def __init__(self, loader: torch.utils.data.DataLoader, device):
        self.loader, self.device, self.dataset = loader, device, loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def __iter__(self):
        for batch in self.loader:
            yield {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
