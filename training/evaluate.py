"""Evaluate a model (CLIP score, FD, oracle accuracy, guidance sweep): `python training/evaluate.py --help`, or under
`accelerate launch` to split the prompts over processes."""

import sys

from latentdiff.eval_job import main

if __name__ == "__main__":
    main(sys.argv[1:])
