"""Evaluation: metrics (CLIP score, retrieval, FD, the shapes oracle, bootstrap intervals) and the eval job."""

from .metrics import *  # noqa: F401,F403 - `latentdiff.evaluation.clip_score` and the rest, as before the move
