"""Precomputed latents and text states in shards, for U-Net training at scale (as MosaicML's SD2 and MicroDiT runs
did): `train_unet.py --cache-latents` on sharded `--data` encodes each training sample once, shard for shard, into
`--cache-dir`, keyed like the single-file cache (the VAE encoder's and text encoder's weights, the tokenizer, the
data and the resolution), and then streams them as the images would have been streamed.

A latent sample holds the VAE posterior's mean and std (`mean.npy`, `std.npy`, float32), the text encoder's states
of each of its captions (`text.npy`, (k, L, D)), whether its caption was a list (`meta.json`), and its sample's
global index in the source, which draws its caption exactly as the image loader would (`item_generator`)."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import torch

from ..data.loader import UNREADABLE, item_generator, load_pixels
from ..data.shards import INDEX, Shard, ShardStream, _image_and_caption, list_shards
from ..files import write_atomically

logger = logging.getLogger(__name__)


def shards_key(stream: ShardStream) -> str:
    """What identifies a sharded training set: its shards' names, counts and sizes, and where the held-out tail starts."""
    parts = [(Path(s.url).name, s.samples, Path(s.url).stat().st_size if Path(s.url).is_file() else None)
             for s in stream.shards]
    return json.dumps({"shards": parts, "end": stream.end})


@torch.no_grad()
def build_latent_shards(folder: Path, stream: ShardStream, vae, text_encoder, tokenizer, device,
                        batch_size: int = 32) -> dict:
    """Encode every training sample of `stream` (the shards in order, below its held-out tail) into `folder`, one
    latent shard per source shard; written to a temporary folder and renamed, so a half-built cache is never read."""
    import shutil

    import webdataset as wds

    from .clip import tokenize

    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    entries, skipped = [], 0
    for number, shard in enumerate(stream.shards):
        if shard.first >= stream.end:
            continue
        name = f"{number:06d}.tar"
        rows = stream._read([shard])  # streamed: a shard's images are never all in memory
        count = 0
        with wds.TarWriter(str(partial / name)) as sink:
            while chunk_rows := list(itertools.islice(rows, batch_size)):
                chunk, pixels = [], []
                for index, sample in chunk_rows:
                    image, caption = _image_and_caption(sample)
                    try:
                        if image is None:
                            raise OSError("the sample has no image file")
                        pixels.append(load_pixels(image, stream.resolution, False, False,
                                                  item_generator(stream.seed, 0, index)))
                    except UNREADABLE as error:
                        logger.warning("skipping unreadable image of sample %d: %s", index, error)
                        skipped += 1
                        continue
                    chunk.append((index, caption))
                if not chunk:
                    continue
                posterior = vae.encode(torch.stack(pixels).to(device)).latent_dist
                texts = [[c] if isinstance(c, str) else list(c) for _, c in chunk]
                states = text_encoder(tokenize(tokenizer, [t for group in texts for t in group], device))[0]
                offsets = np.cumsum([0] + [len(group) for group in texts])
                for k, (index, caption) in enumerate(chunk):
                    sink.write({"__key__": f"{index:09d}", "mean.npy": _npy(posterior.mean[k]),
                                "std.npy": _npy(posterior.std[k]),
                                "text.npy": _npy(states[offsets[k]:offsets[k + 1]]),
                                "meta.json": json.dumps({"index": index,
                                                         "is_list": not isinstance(caption, str)}).encode()})
                    count += 1
        entries.append({"url": name, "samples": count})
    index = {"format": "webdataset", "kind": "latents", "samples": sum(e["samples"] for e in entries),
             "skipped": skipped, "shards": entries}
    write_atomically(partial / INDEX, json.dumps(index, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return index


def _npy(tensor: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tensor.detach().float().cpu().numpy())
    return buffer.getvalue()


def _array(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.load(io.BytesIO(data)))


class LatentShardStream(ShardStream):
    """Batches {"mean", "std", "text" (B, L, D), "skipped"} from latent shards, dealt and resumed as ShardStream's;
    each sample's caption (of a list) drawn with its source index's generator, as CachedLatents draws it."""

    def __init__(self, shards: list[Shard], batch_size: int, seed: int = 0, shuffle_buffer: int = 1000,
                 rank: int = 0, world: int = 1, workers: int = 0):
        super().__init__(shards, 0, batch_size, seed=seed, shuffle_buffer=shuffle_buffer, rank=rank, world=world,
                         workers=workers)

    def _collate(self, chunk: list) -> dict:
        means, stds, texts = [], [], []
        for _, sample in chunk:
            meta = json.loads(sample["meta.json"])
            states = _array(sample["text.npy"])
            pick = 0
            if meta["is_list"]:
                pick = int(torch.randint(len(states), (), generator=item_generator(self.seed, self.epoch,
                                                                                     meta["index"])))
            means.append(_array(sample["mean.npy"]))
            stds.append(_array(sample["std.npy"]))
            texts.append(states[pick])
        return {"mean": torch.stack(means), "std": torch.stack(stds), "text": torch.stack(texts), "skipped": 0}


def latent_stream(accelerator, args, stream: ShardStream, fingerprint: str, vae, text_encoder, tokenizer,
                  cache_dir: Path) -> LatentShardStream:
    """The training set's latent shards (built by the main process when missing) as a stream for this process."""
    digest = hashlib.sha256(f"{fingerprint}|{shards_key(stream)}|{stream.resolution}".encode()).hexdigest()[:24]
    folder = cache_dir / f"latent-shards-{digest}"
    if accelerator.is_main_process and not (folder / INDEX).is_file():
        accelerator.print(f"encoding the training shards' latents and text states to {folder}")
        build_latent_shards(folder, stream, vae, text_encoder, tokenizer, accelerator.device)
    accelerator.wait_for_everyone()
    return LatentShardStream(list_shards(folder), stream.batch_size, seed=stream.seed, rank=stream.rank,
                             world=stream.world, workers=stream.workers)
