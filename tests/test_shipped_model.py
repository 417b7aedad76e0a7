"""The model shipped inside the package: within the size limits, loads with no argument and no network, and draws
"a tiger" so that its own CLIP picks "a tiger" among the names of every emoji."""

import json
import time
from pathlib import Path

import pytest
import torch

from latentdiff import LatentDiffusionPipeline
from latentdiff.data.emoji import captions, emoji_entries
from latentdiff.evaluation.metrics import Judge
from latentdiff.model_folder import SHIPPED_MODEL_DIR, SHIPPED_MODELS

MiB = 2**20


@pytest.fixture(scope="module")
def pipe():
    assert (SHIPPED_MODEL_DIR / "model_index.json").is_file(), f"no model ships in {SHIPPED_MODEL_DIR}"
    return LatentDiffusionPipeline.from_pretrained()


def test_the_shipped_model_fits_the_limits_and_says_how_it_was_made(pipe):
    files = [p for p in SHIPPED_MODEL_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert weights and not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert max(p.stat().st_size for p in files) <= 16 * MiB
    assert sum(p.stat().st_size for p in files) <= 60 * MiB
    assert (SHIPPED_MODEL_DIR / "recipe.json").is_file()
    assert pipe.clip is not None and pipe.unet.dtype == torch.float32  # stored in fp16, computed in fp32


def test_a_tiger_is_the_judges_top_5_pick_among_every_emoji_name(pipe):
    names = list(dict.fromkeys(captions(entry)[0] for entry in emoji_entries()))
    assert "a tiger" in names and len(names) > 3000
    started = time.time()
    images = pipe(["a tiger"] * 2, guidance_scale=7.5, num_inference_steps=20,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    assert time.time() - started < 60, "two images should take seconds on a CPU"
    judge = Judge(SHIPPED_MODEL_DIR / "clip")
    similarity = judge.image_features(images) @ judge.text_features(names).T  # (2 images, all names)
    ranks = [1 + int((row > row[names.index("a tiger")]).sum()) for row in similarity]
    assert max(ranks) <= 5, f"the judge ranks 'a tiger' {ranks} among {len(names)} names (seeds 0 and 1)"


def test_four_steps_use_the_few_step_weights_and_still_draw_a_tiger(pipe):
    """The shipped few-step weights (LCM-LoRA, the recipe's distill stage): 4 steps, one U-Net pass each."""
    assert pipe.few_step is not None and pipe.few_step_for(4) is pipe.few_step and pipe.few_step_for(20) is None
    assert "distill" in json.loads((SHIPPED_MODEL_DIR / "recipe.json").read_text())["stages"]
    student, rows = pipe.few_step.unet(pipe.unet), []
    hook = student.register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    images = pipe(["a tiger"] * 2, guidance_scale=7.5, num_inference_steps=4,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images
    hook.remove()
    assert rows == [2] * 4
    names = list(dict.fromkeys(captions(entry)[0] for entry in emoji_entries()))
    judge = Judge(SHIPPED_MODEL_DIR / "clip")
    similarity = judge.image_features(images) @ judge.text_features(names).T
    ranks = [1 + int((row > row[names.index("a tiger")]).sum()) for row in similarity]
    assert max(ranks) <= 5, f"the judge ranks 'a tiger' {ranks} among {len(names)} names at 4 steps"


SHAPES_DIR = SHIPPED_MODELS["shapes"]


def test_the_shapes_model_loads_by_name_within_its_limits_and_says_how_it_was_made():
    files = [p for p in SHAPES_DIR.rglob("*") if p.is_file()]
    assert files, f"no shapes model ships in {SHAPES_DIR}"
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
    assert max(p.stat().st_size for p in files) <= 16 * MiB and sum(p.stat().st_size for p in files) <= 30 * MiB
    recipe = json.loads((SHAPES_DIR / "recipe.json").read_text())
    assert (Path(__file__).parents[1] / "pipelines" / f"{recipe['recipe']['name']}.toml").is_file()  # the project's
    unet = recipe["stages"].get("unet") or recipe["partial_stages"]["unet"]  # a sitting may end at its --time-limit
    assert unet["summary"]["steps"] > 0
    for part in ("clip", "vae"):  # its stage record, or the record of the part taken; a missed gate: missed_gates
        record = recipe["stages"].get(part) or recipe["missed_gates"][part]
        assert record["summary"] and record["gates"]
    pipe = LatentDiffusionPipeline.from_pretrained("shapes")
    assert pipe.unet.dtype == torch.float32 and pipe.vae.config.sample_size == 64
    image = pipe("two red circles", num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
