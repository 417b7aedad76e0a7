"""Train the VAE (stage 2): `python training/train_vae.py --help`, or under `accelerate launch`."""

import sys

from latentdiff.argparsing import run_guarded
from latentdiff.training.vae import main

if __name__ == "__main__":
    sys.exit(run_guarded("train_vae.py", main, sys.argv[1:]))
