"""Presets: every shipped preset builds consistent parts; bad presets are named."""

import json

import pytest

from latentdiff.model_folder import vae_scale_factor
from latentdiff.models import build_unet, build_vae, count_parameters, load_preset, preset_names


def test_the_three_presets_exist():
    assert {"tiny", "small", "base"} <= set(preset_names())


@pytest.mark.parametrize("name,resolution", [("tiny", 32), ("small", 64), ("base", 256)])
def test_presets_are_consistent(name, resolution):
    preset = load_preset(name)
    assert preset["resolution"] == resolution
    assert preset["unet"]["sample_size"] * vae_scale_factor(preset["vae"]) == resolution


def test_small_preset_sizes():
    """The sizes the small preset's description states."""
    preset = load_preset("small")
    assert round(count_parameters(build_unet(preset)) / 1e6, 1) == 9.0
    assert round(count_parameters(build_vae(preset)) / 1e6, 1) == 2.7


def test_unknown_preset_lists_the_choices():
    with pytest.raises(ValueError, match=r"preset must be one of \['base', 'small', 'tiny'\].*'huge'"):
        load_preset("huge")


def test_inconsistent_preset_is_named(tmp_path):
    preset = load_preset("tiny")
    preset["unet"]["cross_attention_dim"] = 64
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(preset))
    with pytest.raises(ValueError, match=r"unet.cross_attention_dim must equal clip.text_config.hidden_size \(32\), got 64"):
        load_preset(path)
