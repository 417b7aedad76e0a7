"""The noise-aware classifier of classifier guidance (training/train_classifier.py): its labels from the data, and
that it learns: on held-out scenes it reads the colour of clean latents above chance, and less of it as t grows.
Then classifier guidance in sampling: the gradient and its scale against closed forms, the pipeline's loop against
one written from the pieces (after classifier-free guidance), its effect on the classifier's belief, the CLI."""

import json
import re

import numpy as np
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


@pytest.fixture(scope="module")
def model(scenes, tmp_path_factory):
    """A tiny VAE trained briefly on the scenes, with a DDPM schedule: what a classifier is trained against."""
    tmp_path = tmp_path_factory.mktemp("classifier-model")
    model = tmp_path / "model"
    vae_training.main(["--data", str(scenes), "--preset", "tiny", "--model-dir", str(model), "--max-steps", "200",
                       "--batch-size", "16", "--learning-rate", "2e-3", "--output-dir", str(tmp_path / "vae"),
                       "--holdout", "0", *QUIET])
    (model / "scheduler").mkdir()
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "beta_end": 0.012}))
    return model


def test_cached_latents_train_the_same_classifier_as_encoding_every_step(model, scenes, tmp_path):
    from safetensors.torch import load_file

    weights = []
    for name, extra in (("each-step", []), ("cached", ["--cache-latents"])):
        classifier_training.main(["--model", str(model), "--data", str(scenes), "--label", "shapes:colour",
                                  "--output-dir", str(tmp_path / name), "--max-steps", "4", "--batch-size", "16",
                                  "--holdout", "0", "--width", "16", *extra, *QUIET])
        weights.append(load_file(next((tmp_path / name / "classifier").glob("*.safetensors"))))
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        torch.testing.assert_close(weights[1][key], weights[0][key], msg=key)
    with pytest.raises(ValueError, match="--cache-latents stores one encoding per image: drop --random-crop"):
        classifier_training.main(["--model", str(model), "--data", str(scenes), "--label", "shapes:colour",
                                  "--output-dir", str(tmp_path / "flip"), "--cache-latents", "--random-flip", *QUIET])


def test_the_classifier_learns_to_read_the_colour_of_noisy_latents(model, scenes, tmp_path):
    summary = classifier_training.main(["--model", str(model), "--data", str(scenes), "--label", "shapes:colour",
                                        "--output-dir", str(tmp_path / "run"), "--max-steps", "600",
                                        "--batch-size", "64", "--holdout", "200", "--width", "32",
                                        "--lr-warmup-steps", "10", "--cache-latents", *QUIET])
    accuracy = summary["holdout_accuracy"]
    assert summary["chance"] == 1 / 8
    # ~145 labelled held-out scenes: at chance (1/8) the accuracy's standard deviation is 0.027, so 0.22 is 3.5 of
    # them above it (this short run reaches about 0.3; a real one trains far longer)
    assert accuracy["0"] > 0.22, accuracy
    assert accuracy["999"] < accuracy["0"], accuracy  # pure noise holds less of the colour
    loaded = NoisyLatentClassifier.from_pretrained(tmp_path / "run" / "classifier")
    assert loaded.config.classes[0] == summary["classes"][0] and len(loaded.config.classes) == 8


# Classifier guidance in sampling ---------------------------------------------------------------------------------

def _classifier(pipe, classes=("red", "green", "blue"), seed=0):
    torch.manual_seed(seed)
    return NoisyLatentClassifier(pipe.unet.config.in_channels, 16, classes,
                                 len(pipe.scheduler.alphas_cumprod)).eval()


def test_classifier_guidance_is_the_gradient_of_log_p_y_scaled_as_in_algorithm_2():
    """A linear classifier, whose ∇_x log softmax(Wx)_y = W_y − Σ_k p_k W_k is known in closed form; v and x_0
    predictions are guided through ε."""
    from latentdiff import diffusion
    from latentdiff.pipelines.guidance import ClassifierGuidance

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(3, 2 * 4 * 4, generator=torch.Generator().manual_seed(1)))

        def forward(self, x, t):
            return x.flatten(1) @ self.weight.T

    torch.manual_seed(0)
    x_t, eps = torch.randn(2, 2, 4, 4), torch.randn(2, 2, 4, 4)
    alphas_cumprod = torch.linspace(0.999, 0.01, 1000)
    labels = torch.tensor([2, 0])
    guide = ClassifierGuidance(Linear(), labels, 3.0, alphas_cumprod)
    W = guide.classifier.weight.detach()
    p = torch.softmax(x_t.flatten(1) @ W.T, dim=1)
    expected = (W[labels] - p @ W).reshape(x_t.shape)
    torch.testing.assert_close(guide.gradient(x_t, 600), expected)
    alpha_bar = alphas_cumprod[600]
    torch.testing.assert_close(guide(eps, x_t, 600), eps - 3.0 * (1 - alpha_bar).sqrt() * expected)
    torch.testing.assert_close(guide(eps, x_t, 599.6), guide(eps, x_t, 600))  # a fractional t: its nearest ᾱ
    assert torch.equal(ClassifierGuidance(Linear(), labels, 0.0, alphas_cumprod)(eps, x_t, 600), eps)
    guided_eps = guide(eps, x_t, 600)
    for kind, to_output, to_eps in (
            ("v_prediction", lambda e: diffusion.predict_v(diffusion.predict_x0_from_eps(x_t, e, alpha_bar), e,
                                                           alpha_bar),
             lambda v: diffusion.predict_eps_from_v(x_t, v, alpha_bar)),
            ("sample", lambda e: diffusion.predict_x0_from_eps(x_t, e, alpha_bar),
             lambda x0: diffusion.predict_eps_from_x0(x_t, x0, alpha_bar))):
        guide.prediction_type = kind
        torch.testing.assert_close(to_eps(guide(to_output(eps), x_t, 600)), guided_eps, atol=1e-4, rtol=1e-4)


def test_the_pipeline_applies_classifier_guidance_after_cfg_each_step(tiny_pipe):
    """The pipeline's images equal a loop written here from the pieces: CFG, then ε − s √(1 − ᾱ_t) ∇ log p(y | x_t)
    with the gradient through the classifier at the scaled input; scale 0 is the unguided call."""
    from latentdiff import diffusion
    from latentdiff.schedulers import DDIMScheduler

    pipe = tiny_pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    classifier = _classifier(pipe)
    kwargs = dict(num_inference_steps=4, guidance_scale=3.0, output_type="latent")
    plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    unguided = pipe("a red circle", generator=torch.Generator().manual_seed(0), classifier=classifier,
                    classifier_label="blue", classifier_scale=0.0, **kwargs).images
    assert torch.equal(plain, unguided)
    guided = pipe("a red circle", generator=torch.Generator().manual_seed(0), classifier=classifier,
                  classifier_label="blue", classifier_scale=20.0, **kwargs).images
    assert not torch.allclose(guided, plain, atol=1e-3)

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    latents = torch.randn(plain.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt("a red circle", "cpu", 1, True)
    for t in scheduler.timesteps:
        with torch.no_grad():
            out = pipe.unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps = diffusion.classifier_free_guidance(*out.chunk(2), 3.0)
        x = latents.clone().requires_grad_(True)
        log_p = torch.log_softmax(classifier(x, t.float().reshape(1).expand(1)), dim=1)[:, 2].sum()
        (grad,) = torch.autograd.grad(log_p, x)
        eps = diffusion.classifier_guidance(eps, grad, scheduler.alphas_cumprod[t], 20.0)
        latents = scheduler.step(eps, t, latents).prev_sample
    torch.testing.assert_close(guided, latents, atol=1e-4, rtol=1e-4)


def test_classifier_guidance_raises_the_classifiers_belief_in_its_label(tiny_pipe):
    """Guided toward a class, the final latents score higher for it under the classifier than unguided ones: the
    sign and size of the step are right (a sign error lowers it)."""
    pipe = tiny_pipe
    classifier = _classifier(pipe, seed=1)
    prompts = ["a red circle"] * 8

    def log_p(scale):
        latents = pipe(prompts, num_inference_steps=10, guidance_scale=1.0, output_type="latent",
                       generator=torch.Generator().manual_seed(0), classifier=classifier, classifier_label="green",
                       classifier_scale=scale).images
        with torch.no_grad():
            return torch.log_softmax(classifier(latents, torch.zeros(len(latents))), dim=1)[:, 1].mean().item()

    assert log_p(30.0) > log_p(0.0) + 0.1


def test_bad_classifier_arguments_are_named(tiny_pipe, tmp_path):
    pipe, classifier = tiny_pipe, _classifier(tiny_pipe)
    call = dict(num_inference_steps=2, output_type="latent")
    with pytest.raises(ValueError, match=r"classifier_label is required with a classifier: one of its classes "
                                         r"\['red', 'green', 'blue'\]"):
        pipe("a red circle", classifier=classifier, **call)
    with pytest.raises(ValueError, match=r"classifier_label must name one of the classifier's classes .* got 'pink'"):
        pipe("a red circle", classifier=classifier, classifier_label="pink", **call)
    with pytest.raises(ValueError, match=r"got 3"):
        pipe("a red circle", classifier=classifier, classifier_label=3, **call)
    with pytest.raises(ValueError, match=r"one label or one per prompt \(2\), got 3"):
        pipe(["a", "b"], classifier=classifier, classifier_label=["red", "red", "blue"], **call)
    with pytest.raises(ValueError, match=r"classifier_scale must be a finite number ≥ 0, got -1"):
        pipe("a red circle", classifier=classifier, classifier_label="red", classifier_scale=-1, **call)
    with pytest.raises(ValueError, match=r"no config.json there"):
        pipe("a red circle", classifier=str(tmp_path), classifier_label="red", **call)
    wrong = NoisyLatentClassifier(pipe.unet.config.in_channels + 1, 16, ("a", "b"), 1000)
    with pytest.raises(ValueError, match=r"classifier reads 5-channel latents; this model's have 4"):
        pipe("a red circle", classifier=wrong, classifier_label="a", **call)
    classifier.save_pretrained(tmp_path / "classifier")  # a folder works as well as the module
    a = pipe("a red circle", classifier=tmp_path / "classifier", classifier_label=["blue"], classifier_scale=5,
             generator=torch.Generator().manual_seed(0), **call).images
    b = pipe("a red circle", classifier=classifier, classifier_label=2, classifier_scale=5,
             generator=torch.Generator().manual_seed(0), **call).images
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # fp32 round trip: equal up to conv rounding


def test_generate_takes_a_classifier_folder_and_records_it(tiny_pipe, tiny_dir, tmp_path, capsys):
    from PIL import Image

    from latentdiff.cli import main
    from latentdiff.images import read_parameters

    _classifier(tiny_pipe).save_pretrained(tmp_path / "classifier")
    out = tmp_path / "guided.png"
    flags = ["--model", str(tiny_dir), "--steps", "3", "--guidance-scale", "2", "--scheduler", "ddim"]
    assert main(["generate", "a red circle", *flags, "--out", str(out), "--classifier", str(tmp_path / "classifier"),
                 "--classifier-label", "green", "--classifier-scale", "50"]) == 0
    params = read_parameters(out)
    assert (params["classifier_label"], params["classifier_scale"]) == ("green", 50.0)
    assert main(["generate", "a red circle", *flags, "--out", str(tmp_path / "plain.png")]) == 0
    guided, plain = (np.asarray(Image.open(p)) for p in (out, tmp_path / "plain.png"))
    assert np.abs(guided.astype(int) - plain).max() > 0  # the classifier moved the image
    assert main(["generate", "--from-png", str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), guided)  # --from-png guides again
    capsys.readouterr()
    for extra, message in (
            (["--classifier-scale", "2"], "--classifier-label and --classifier-scale need --classifier"),
            (["--classifier", str(tmp_path)], "--classifier must be a classifier folder"),
            (["--classifier", str(tmp_path / "classifier")], r"--classifier needs --classifier-label, the class to "
                                                              r"steer toward: one of \['red', 'green', 'blue'\]"),
            (["--classifier", str(tmp_path / "classifier"), "--classifier-label", "pink"],
             r"must be one of the classifier's classes \['red', 'green', 'blue'\] \(or an index\), got 'pink'"),
            (["--classifier", str(tmp_path / "classifier"), "--classifier-label", "red", "--classifier-scale", "-1"],
             "--classifier-scale must be a finite number ≥ 0, got -1")):
        assert main(["generate", "a red circle", *flags, "--out", str(tmp_path / "x.png"), *extra]) == 2
        assert re.search(message, capsys.readouterr().err), (extra, message)
