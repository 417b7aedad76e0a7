"""Reading training data: the map-style imagefolder loader against WebDataset shards streamed by ShardStream.

    python benchmarks/bench_shards.py [--n 4000] [--size 64] [--batch-size 64] [--workers 0,2]

Writes --n shapes scenes as an imagefolder and as shards (`latentdiff data shard`, 1 000 a shard), then times one
epoch of each loader (decoding, preprocessing and collating: what a training step waits for), per worker count.
Writes benchmarks/results/shards.json and .md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    from latentdiff.data.imagefolder import write_imagefolder
    from latentdiff.data.loader import ImageCaptionDataset, collate, open_dataset
    from latentdiff.data.shapes import shapes_rows
    from latentdiff.data.shards import ShardStream, list_shards, write_shards

    work = Path(tempfile.mkdtemp(prefix="bench-shards-"))
    write_imagefolder(work / "folder", shapes_rows(args.n, args.size, seed=0))
    started = time.perf_counter()
    write_shards(work / "folder", work / "shards", shard_size=1000)
    write_seconds = time.perf_counter() - started
    results = {}
    for workers in (int(w) for w in args.workers.split(",")):
        mapped = ImageCaptionDataset(open_dataset(work / "folder"), args.size)
        loaders = {
            "imagefolder (map-style, shuffled)": torch.utils.data.DataLoader(
                mapped, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collate,
                num_workers=workers, generator=torch.Generator().manual_seed(0)),
            "shards (ShardStream)": torch.utils.data.DataLoader(
                ShardStream(list_shards(work / "shards"), args.size, args.batch_size, workers=workers),
                batch_size=None, num_workers=workers),
        }
        for name, loader in loaders.items():
            started = time.perf_counter()
            samples = sum(len(batch["captions"]) for batch in loader)
            seconds = time.perf_counter() - started
            results[f"{name}, {workers} workers"] = {"samples": samples, "seconds": seconds,
                                                     "samples_per_s": samples / seconds}
    report = {"machine": machine(), "n": args.n, "size": args.size, "batch_size": args.batch_size,
              "shard_write_seconds": write_seconds, "results": results, "command": " ".join(sys.argv)}
    table = ["| loader | samples read | seconds | samples/s |", "|---|---|---|---|"]
    for name, r in results.items():
        table.append(f"| {name} | {r['samples']} | {r['seconds']:.2f} | {r['samples_per_s']:.0f} |")
    table.append(f"\n{args.n} shapes scenes at {args.size}x{args.size}, batches of {args.batch_size}, one epoch each; "
                 f"writing the shards took {write_seconds:.1f} s; {machine()}")
    write_report(Path(args.out), "shards", report, "\n".join(table))
    print("\n".join(table))
    return report


if __name__ == "__main__":
    main()
