"""Train a noise-aware classifier on a model's latents (classifier guidance): `python training/train_classifier.py
--help`, or under `accelerate launch`."""

import sys

from latentdiff.argparsing import run_guarded
from latentdiff.training.classifier import main

if __name__ == "__main__":
    sys.exit(run_guarded("train_classifier.py", main, sys.argv[1:]))
