"""`latentdiff data shapes|emoji|shard`: the built-in data sets' flags, their checks, and the writing of the set (the CLI
and recipes' data stage share them)."""

from __future__ import annotations

import argparse

from .. import argparsing
from ..argparsing import positive_int, seed


def add_data_commands(data: argparse.ArgumentParser) -> None:
    """The `shapes` and `emoji` subcommands, with their flags, under a `data` parser."""
    kinds = data.add_subparsers(dest="kind", required=True)
    shapes = kinds.add_parser("shapes", formatter_class=argparsing.HelpFormatter, help="procedural shapes scenes with ground truth (for the oracle)")
    shapes.add_argument("--n", type=positive_int, default=20000, help="number of scenes (default: 20000)")
    shapes.add_argument("--size", type=positive_int, default=64, help="image side, 16 to 512 (default: 64)")
    shapes.add_argument("--seed", type=seed, default=0, help="seed of the scenes")
    shapes.add_argument("--out", required=True, help="folder to write the data set into")
    shapes.add_argument("--overwrite", action="store_true", help="replace an existing data set at --out")
    held = shapes.add_mutually_exclusive_group()
    held.add_argument("--holdout", default=None, metavar="PAIRS",
                      help="colour-shape pairs no training scene or caption may hold, e.g. 'red circle,blue star' (default: none held out)")
    held.add_argument("--holdout-fraction", type=float, default=None, metavar="F",
                      help="hold out this fraction of the 48 colour-shape pairs, chosen by --holdout-seed (default: none)")
    shapes.add_argument("--holdout-seed", type=seed, default=0, help="seed of the --holdout-fraction draw (default: 0)")
    shapes.add_argument("--task-weights", default="4,3,3", metavar="S,C,R",
                        help="relative weights of single-object, count and relation scenes in the set; the unseen "
                             "prompts keep the default mix, so evaluations of sets with other mixes compare "
                             "(default: 4,3,3)")
    shapes.add_argument("--unseen-prompts", type=positive_int, default=600,
                        help="evaluation prompts with held-out pairs, written to OUT/unseen.jsonl (default: 600)")
    emoji = kinds.add_parser("emoji", formatter_class=argparsing.HelpFormatter, help="every emoji the colour font can draw, captioned with its names")
    emoji.add_argument("--size", type=positive_int, default=64, help="image side (default: 64)")
    emoji.add_argument("--out", required=True, help="folder to write the data set into")
    emoji.add_argument("--font", default=None, help="colour emoji font (default: Noto Color Emoji from the OS)")
    emoji.add_argument("--background", default=None,
                       help="a colour name or 'random' (default: white, not mentioned in captions)")
    emoji.add_argument("--random-placement", action="store_true", help="random size and position, captioned")
    emoji.add_argument("--per-emoji", type=positive_int, default=1, help="images per emoji (default: 1)")
    emoji.add_argument("--seed", type=seed, default=0, help="seed of backgrounds and placement")
    emoji.add_argument("--overwrite", action="store_true", help="replace an existing data set at --out")


    shard = kinds.add_parser("shard", formatter_class=argparsing.HelpFormatter,
                             help="write any image-caption source as WebDataset tar shards (streamed by training)")
    shard.add_argument("source", help="an imagefolder or save_to_disk folder (e.g. one `latentdiff data shapes` wrote)")
    shard.add_argument("--out", required=True, help="folder to write the shards and index.json into")
    shard.add_argument("--shard-size", type=positive_int, default=10000, help="samples per shard (default: 10000)")
    shard.add_argument("--image-column", default=None, help="default: found by name (image, img, …)")
    shard.add_argument("--caption-column", default=None, help="default: found by name (text, caption, …)")
    shard.add_argument("--overwrite", action="store_true", help="replace the shards in a non-empty --out")


def data_parser() -> argparse.ArgumentParser:
    """A parser of `data KIND …` argument lists alone (what a recipe's data stage passes)."""
    parser = argparsing.parser("latentdiff")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=argparsing.ArgumentParser)
    add_data_commands(commands.add_parser("data", formatter_class=argparsing.HelpFormatter))
    return parser


def check_data_args(args) -> None:
    """The data flags' own rules, before anything is drawn (recipes check them before any stage runs)."""
    if args.kind != "shapes":
        return
    from . import shapes

    if not shapes.MIN_IMAGE_SIZE <= args.size <= shapes.MAX_IMAGE_SIZE:
        raise ValueError(f"--size must be from {shapes.MIN_IMAGE_SIZE} to {shapes.MAX_IMAGE_SIZE}, got {args.size}")
    shapes.parse_task_weights(args.task_weights)
    if args.holdout is not None:
        shapes.parse_pairs(args.holdout)
    elif args.holdout_fraction is not None:
        shapes.sample_holdout(args.holdout_fraction, args.holdout_seed)


def make_data(args) -> str:
    from .imagefolder import write_imagefolder

    check_data_args(args)
    if args.kind == "shard":
        from .shards import write_shards

        index = write_shards(args.source, args.out, args.shard_size, args.image_column, args.caption_column,
                             args.overwrite)
        return (f"wrote {index['samples']} samples as {len(index['shards'])} shards to {args.out} "
                f"(index.json lists them)")
    if args.kind == "shapes":
        import json

        from . import shapes

        holdout = (shapes.parse_pairs(args.holdout) if args.holdout is not None
                   else shapes.sample_holdout(args.holdout_fraction, args.holdout_seed)
                   if args.holdout_fraction is not None else [])
        extra = {}
        if holdout:  # the split travels with the data set; the unseen prompts use a seed no training scene uses
            split = {"holdout": [" ".join(p) for p in holdout], "holdout_fraction": args.holdout_fraction,
                     "holdout_seed": args.holdout_seed if args.holdout_fraction is not None else None,
                     "seed": args.seed, "task_weights": list(shapes.parse_task_weights(args.task_weights)),
                     "unseen_prompts": "unseen.jsonl", "unseen_seed": args.seed + 1}
            unseen = shapes.unseen_prompts(args.unseen_prompts, holdout, args.size, args.seed + 1)
            extra = {shapes.SPLIT_FILE: json.dumps(split, indent=2) + "\n",
                     "unseen.jsonl": "".join(json.dumps(row) + "\n" for row in unseen)}
        rows = shapes.shapes_rows(args.n, args.size, args.seed, holdout, shapes.parse_task_weights(args.task_weights))
        n = write_imagefolder(args.out, rows,
                              overwrite=args.overwrite, extra_files=extra)
        held = f"; held out {len(holdout)} pairs ({', '.join(' '.join(p) for p in holdout)})" if holdout else ""
        return f"wrote {n} shapes scenes ({args.size}x{args.size}) to {args.out}{held}"
    from .emoji import render_emoji_set

    skipped = []

    def rows():
        skipped.extend((yield from render_emoji_set(args.size, args.font, args.background, args.random_placement,
                                                    args.per_emoji, args.seed)))

    n = write_imagefolder(args.out, rows(), overwrite=args.overwrite)
    return (f"wrote {n} emoji images ({args.size}x{args.size}) to {args.out}; skipped {len(skipped)} emoji "
            "sequences the font does not draw as one glyph")
