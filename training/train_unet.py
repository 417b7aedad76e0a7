"""Train or fine-tune the U-Net (stage 3): `python training/train_unet.py --help`, or under `accelerate launch`."""

import sys

from latentdiff.argparsing import run_guarded
from latentdiff.training.unet import main

if __name__ == "__main__":
    sys.exit(run_guarded("train_unet.py", main, sys.argv[1:]))
