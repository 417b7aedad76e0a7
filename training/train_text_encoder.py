"""Teach the text encoder to state the scene, not the words: `python training/train_text_encoder.py --help`."""

import sys

from latentdiff.argparsing import run_guarded
from latentdiff.training.text_encoder import main

if __name__ == "__main__":
    sys.exit(run_guarded("train_text_encoder.py", main, sys.argv[1:]))
