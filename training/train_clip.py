"""Train the tokenizer and the CLIP (stage 1): `python training/train_clip.py --help`, or under `accelerate launch`."""

import sys

from latentdiff.argparsing import run_guarded
from latentdiff.training.clip import main

if __name__ == "__main__":
    sys.exit(run_guarded("train_clip.py", main, sys.argv[1:]))
