"""Train the tokenizer and the CLIP (stage 1): `python training/train_clip.py --help`, or under `accelerate launch`."""

import sys

from latentdiff.clip_training import main

if __name__ == "__main__":
    main(sys.argv[1:])
