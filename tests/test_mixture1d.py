"""The design notes' 1-D experiment (examples/mixture1d.py): a DDPM trained on 800 points of
½ N(−2, 0.5) + ½ N(2, 0.5) with T = 1000, sampled by DDPM, DDIM, the reverse SDE, the probability-flow ODE and
predictor–corrector: every sampler must find both modes, in equal weight, at their means, and match the mixture
within a Kolmogorov–Smirnov distance of 0.08 (2 000 samples against 2 000 fresh draws; the KS distance of two
samples of the same distribution exceeds 0.052 with probability 1 %)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import mixture1d  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return mixture1d.train(mixture1d.mixture(800, torch.Generator().manual_seed(0)), steps=1500)


STEPS = {"DDPM": 250, "DDIM": 50, "SDE": 500, "ODE": 250, "PC": 250}


@pytest.mark.parametrize("name", list(STEPS))
def test_every_sampler_finds_both_modes_of_the_mixture(model, name):
    scheduler, _ = mixture1d.samplers()[name]
    x = mixture1d.sample(model, scheduler, STEPS[name], 2000)
    stats = mixture1d.summary(x, mixture1d.mixture(2000, torch.Generator().manual_seed(1)))
    assert abs(stats["weight_left"] - 0.5) < 0.06, stats
    assert abs(stats["mean_left"] + 2) < 0.25 and abs(stats["mean_right"] - 2) < 0.25, stats
    assert 0.3 < stats["var_left"] < 0.8 and 0.3 < stats["var_right"] < 0.8, stats
    assert stats["ks"] < 0.08, stats


def test_an_untrained_model_fails_the_same_check():  # the check can fail
    scheduler, _ = mixture1d.samplers()["DDIM"]
    x = mixture1d.sample(mixture1d.EpsNet().eval(), scheduler, 50, 2000)
    assert mixture1d.summary(x, mixture1d.mixture(2000, torch.Generator().manual_seed(1)))["ks"] > 0.08
