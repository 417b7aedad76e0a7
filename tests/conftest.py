"""Shared fixtures: one tiny untrained model folder per test session (built in well under a second).

Tests run with torch traces as the compiled backend (bit-identical to eager calls, so they can compare images
exactly), and with OpenVINO's disk cache in a folder of their own; tests/test_openvino.py turns OpenVINO on."""

import os
import tempfile

import pytest
import torch

os.environ.setdefault("LATENTDIFF_BACKEND", "torch")
os.environ.setdefault("LATENTDIFF_CACHE", tempfile.mkdtemp(prefix="latentdiff-test-cache-"))

from latentdiff import LatentDiffusionPipeline, new_pipeline


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "tiny"
    new_pipeline("tiny", seed=0).save_pretrained(path)
    return path


@pytest.fixture
def tiny_pipe(tiny_dir):
    pipe = LatentDiffusionPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)
