"""The noise-aware classifier of classifier guidance (training/train_classifier.py): its labels from the data, and
that it learns: on held-out scenes it reads the colour of clean latents above chance, and less of it as t grows."""

import json

import pytest
import torch

from latentdiff.data.imagefolder import write_imagefolder
from latentdiff.data.loader import open_dataset
from latentdiff.data.shapes import shapes_rows
from latentdiff.training import classifier as classifier_training
from latentdiff.training import vae as vae_training
from latentdiff.training.classifier import NoisyLatentClassifier, labels_of

from test_training import QUIET  # noqa: F401


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    out = tmp_path_factory.mktemp("classifier") / "shapes"
    write_imagefolder(out, shapes_rows(1200, 32, seed=3))
    return out


def test_labels_come_from_scenes_whose_objects_agree_or_from_a_column(scenes):
    dataset = open_dataset(scenes)
    labels, classes = labels_of(dataset, "shapes:colour")
    assert len(classes) == 8 and min(labels) == -1 and max(labels) == 7
    for label, scene in zip(labels, dataset["scene"]):
        colours = {o["colour"] for o in scene["objects"]}
        assert (label == -1) == (len(colours) > 1)
        if label >= 0:
            assert classes[label] == colours.pop()
    with pytest.raises(ValueError, match="shapes:colour, shapes:shape or column:NAME"):
        labels_of(dataset, "colour")
    with pytest.raises(ValueError, match="no such column"):
        labels_of(dataset, "column:nope")


def test_the_classifier_learns_to_read_the_colour_of_noisy_latents(scenes, tmp_path):
    model = tmp_path / "model"
    vae_training.main(["--data", str(scenes), "--preset", "tiny", "--model-dir", str(model), "--max-steps", "200",
                       "--batch-size", "16", "--learning-rate", "2e-3", "--output-dir", str(tmp_path / "vae"),
                       "--holdout", "0", *QUIET])
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012}))
    summary = classifier_training.main(["--model", str(model), "--data", str(scenes), "--label", "shapes:colour",
                                        "--output-dir", str(tmp_path / "run"), "--max-steps", "600",
                                        "--batch-size", "64", "--holdout", "200", "--width", "32",
                                        "--lr-warmup-steps", "10", *QUIET])
    accuracy = summary["holdout_accuracy"]
    assert summary["chance"] == 1 / 8
    # ~145 labelled held-out scenes: at chance (1/8) the accuracy's standard deviation is 0.027, so 0.22 is 3.5 of
    # them above it (this short run reaches about 0.3; a real one trains far longer)
    assert accuracy["0"] > 0.22, accuracy
    assert accuracy["999"] < accuracy["0"], accuracy  # pure noise holds less of the colour
    loaded = NoisyLatentClassifier.from_pretrained(tmp_path / "run" / "classifier")
    assert loaded.config.classes[0] == summary["classes"][0] and len(loaded.config.classes) == 8
