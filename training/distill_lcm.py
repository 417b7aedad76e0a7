"""Distil a pipeline's U-Net into a few-step LCM student: `python training/distill_lcm.py --help`, or under
`accelerate launch`."""

import sys

from latentdiff.argparsing import run_guarded
from latentdiff.training.lcm import main

if __name__ == "__main__":
    sys.exit(run_guarded("distill_lcm.py", main, sys.argv[1:]))
