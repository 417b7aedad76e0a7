"""Evaluate a model (CLIP score, FD, oracle accuracy, guidance sweep): `python training/evaluate.py --help`, or under
`accelerate launch` to split the prompts over processes."""

import sys

from latentdiff.argparsing import run_guarded
from latentdiff.evaluation.job import main

if __name__ == "__main__":
    sys.exit(run_guarded("evaluate.py", main, sys.argv[1:]))
