"""Recipes chain the stages, skip finished ones on a rerun, and the shipped recipes' flags are all valid."""

import json
from pathlib import Path

import pytest

from latentdiff import LatentDiffusionPipeline
from latentdiff.training import clip as clip_training, unet as unet_training, vae as vae_training
from latentdiff.cli import main
from latentdiff.training.recipes import load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY = """
name = "tiny"
[data]
kind = "shapes"
args = ["--n", "40", "--size", "32"]
[clip]
args = ["--preset", "tiny", "--max-steps", "3", "--batch-size", "8", "--holdout", "8", "--report-to", "none"]
[vae]
args = ["--preset", "tiny", "--max-steps", "3", "--batch-size", "8", "--holdout", "8", "--report-to", "none"]
[unet]
args = ["--preset", "tiny", "--max-steps", "4", "--batch-size", "8", "--holdout", "8", "--report-to", "none",
        "--cache-latents", "--validation-prompts", "a red circle", "--checkpointing-steps", "2"]
[decoder]
args = ["--max-steps", "2", "--batch-size", "8", "--holdout", "8", "--report-to", "none"]
"""


def test_a_recipe_runs_every_stage_and_a_rerun_skips_finished_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # the latent cache goes under ~/.cache
    from test_training import kill_after_checkpoint

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY)
    kill_after_checkpoint(monkeypatch, 2)  # only the U-Net checkpoints at step 2 (CLIP and VAE: at their last, 3)
    assert main(["run-recipe", str(recipe), "--out", str(tmp_path / "run")]) == 130  # interrupted, as by Ctrl-C
    assert "latentdiff run-recipe: interrupted" in capsys.readouterr().err
    stages = sorted(p.stem for p in (tmp_path / "run" / "stages").glob("*.json"))
    assert stages == ["clip", "data", "vae"], "the killed U-Net stage is not marked done"
    capsys.readouterr()
    assert main(["run-recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "[clip] already done" in out and "[vae] already done" in out and "[unet] running" in out
    assert "resumed from" in out and "at step 2" in out  # the unfinished stage continued from its checkpoint
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "run" / "model")
    assert pipe.clip is not None and pipe.vae.config.scaling_factor != 0.18215
    import json

    summary = json.loads((tmp_path / "run" / "stages" / "unet.json").read_text())["summary"]
    assert summary["steps"] == 4 and summary["unrecorded_steps"] == 0
    # the killed sitting counts up to its checkpoint, the second one from there; each says where it ran
    assert [(s["from_step"], s["to_step"]) for s in summary["sittings"]] == [(0, 2), (2, 4)]
    assert all(s["seconds"] > 0 and s["hardware"]["cpu_count"] and s["processes"] == 1 for s in summary["sittings"])
    assert summary["train_seconds"] == pytest.approx(sum(s["seconds"] for s in summary["sittings"]), abs=0.2)
    provenance = json.loads((tmp_path / "run" / "model" / "recipe.json").read_text())
    assert list(provenance["stages"]) == ["data", "clip", "vae", "unet", "decoder"]
    assert provenance["recipe"]["name"] == "tiny"
    assert all(r["wall_seconds"] >= 0 and r["hardware"]["cpu_count"] for r in provenance["stages"].values())


@pytest.mark.parametrize("recipe", sorted((REPO / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe, tmp_path):
    parsed = load_recipe(recipe)
    required = ["--data", "d", "--output-dir", str(tmp_path)]
    for stage, module in (("clip", clip_training), ("vae", vae_training)):
        if "from" in parsed[stage]:  # taken from a model folder an earlier recipe made
            assert (Path(parsed[stage]["from"]) / ("text_encoder" if stage == "clip" else "vae")).is_dir()
        else:
            module.build_parser().parse_args([*required, *parsed[stage]["args"]])
    if "init" in parsed["unet"]:  # trains on from another model's U-Net
        assert (Path(parsed["unet"]["init"]) / "unet").is_dir()
    unet_training.build_parser().parse_args([*required, "--model", "m", *parsed["unet"]["args"]])
    if "decoder" in parsed:
        vae_training.build_parser().parse_args([*required, "--finetune-decoder", *parsed["decoder"]["args"]])
    if "eval" in parsed:
        from latentdiff.evaluation.job import build_parser

        build_parser().parse_args(["--prompts", "p", "--out", "o", *parsed["eval"]["args"]])


GATED = """
name = "gated"
[data]
kind = "shapes"
args = ["--n", "40", "--size", "32", "--holdout", "red circle", "--unseen-prompts", "4"]
[vae]
args = ["--preset", "tiny", "--max-steps", "2", "--batch-size", "8", "--holdout", "8", "--report-to", "none"]
gates = [{ metric = "round_trip_oracle.real.mean", min = 1.0 }, { metric = "round_trip_oracle.round_trip.mean", min = %s }]
"""


def test_a_stage_that_misses_its_gate_stops_the_recipe_and_says_which(tmp_path, capsys):
    recipe = tmp_path / "gated.toml"
    recipe.write_text(GATED % "1.01")  # no VAE reaches more than every scene
    assert main(["run-recipe", str(recipe), "--out", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert "[vae] missed its gate: round_trip_oracle.round_trip.mean = " in err and "(needs ≥ 1.01)" in err
    assert "real.mean" not in err.split("missed its gate")[1]  # the gate it passed is not named as missed
    stages = tmp_path / "run" / "stages"
    assert (stages / "vae.failed.json").is_file() and not (stages / "vae.json").exists()
    failed = json.loads((stages / "vae.failed.json").read_text())
    assert [g["passed"] for g in failed["gates"]] == [True, False]
    # the model folder says that a stage missed its gate, as its recipe.json is written anyway
    provenance = json.loads((tmp_path / "run" / "model" / "recipe.json").read_text())
    assert "vae" not in provenance["stages"] and provenance["missed_gates"]["vae"]["gates"][1]["passed"] is False
    recipe.write_text(GATED % "0.0")  # a rerun resumes from the last checkpoint and now passes
    assert main(["run-recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert not (stages / "vae.failed.json").exists()
    record = json.loads((stages / "vae.json").read_text())
    assert all(g["passed"] for g in record["gates"]) and record["gates"][1]["value"] >= 0


def test_gate_metrics_walk_dicts_and_lists_and_bad_gates_are_named(tmp_path):
    from latentdiff.training.recipes import check_gates, metric_value

    report = {"scales": [{"oracle": {"mean": 0.5}}, {"oracle": {"mean": 0.92}}]}
    assert metric_value(report, "scales.1.oracle.mean") == 0.92 and metric_value(report, "scales.2.oracle") is None
    assert [g["passed"] for g in check_gates("eval", [{"metric": "scales.-1.oracle.mean", "min": 0.9},
                                                      {"metric": "scales.0.oracle.mean", "min": 0.9},
                                                      {"metric": "scales.0.nothing", "max": 1}], report)] == \
        [True, False, False]
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nkind = "shapes"\n[vae]\nargs = []\ngates = [{ metric = "x" }]\n')
    with pytest.raises(ValueError, match=r"\[vae\] gates must be a list of"):
        load_recipe(bad)


def test_bad_recipes_are_named(tmp_path):
    from latentdiff.training.recipes import run_recipe

    good = tmp_path / "tiny.toml"
    good.write_text(TINY)
    with pytest.raises(ValueError, match=r"--stages: 'decodr' is not a section of"):
        run_recipe(good, tmp_path / "run", ["decodr"])
    with pytest.raises(ValueError, match="recipe must be a TOML file"):
        load_recipe(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('[data]\nkind = "shapes"\n[train]\nargs = []\n')
    with pytest.raises(ValueError, match=r"unknown sections \['train'\]"):
        load_recipe(bad)
    bad.write_text(f'[data]\nkind = "shapes"\n[vae]\nfrom = "{tmp_path / "nowhere"}"\n')
    with pytest.raises(ValueError, match=r"\[vae\] from .*nowhere.* has no vae/"):
        load_recipe(bad)
    shipped = REPO / "latentdiff" / "assets" / "shapes-model"
    bad.write_text(f'[data]\nkind = "shapes"\n[vae]\nfrom = "{shipped}"\nargs = ["--max-steps", "3"]\n')
    with pytest.raises(ValueError, match=r"\[vae\] takes its parts from .*: it trains nothing, so it may not have args"):
        load_recipe(bad)
    unmade = tmp_path / "unmade"  # parts, but no recipe made them
    for part in ("tokenizer", "text_encoder", "unet", "scheduler"):
        (unmade / part).mkdir(parents=True)
    (unmade / "unet" / "config.json").write_text("{}")
    (unmade / "scheduler" / "scheduler_config.json").write_text("{}")
    bad.write_text(f'[data]\nkind = "shapes"\n[clip]\nfrom = "{unmade}"\n')
    with pytest.raises(ValueError, match=r"\[clip\] from .*holds no record of a clip stage"):
        load_recipe(bad)
    bad.write_text(f'[data]\nkind = "shapes"\n[clip]\nfrom = "{shipped}"\n')  # its CLIP missed its gate: taken so
    assert load_recipe(bad)["clip"]["from"] == str(shipped)
    bad.write_text(f'[data]\nkind = "shapes"\n[unet]\ninit = "{unmade}"\nargs = []\n')
    with pytest.raises(ValueError, match=r"\[unet\] init .*holds no record of a unet stage"):
        load_recipe(bad)
    bad.write_text(f'[data]\nkind = "shapes"\n[unet]\ninit = "{tmp_path}"\nargs = []\n')
    with pytest.raises(ValueError, match=r"\[unet\] init .*has no unet, scheduler/"):
        load_recipe(bad)
    bad.write_text(f'[data]\nkind = "shapes"\n[unet]\ninit = "{shipped}"\nfrom = "{shipped}"\n')
    with pytest.raises(ValueError, match=r"\[unet\] has both from .* and init .*keep one"):
        load_recipe(bad)
    bad.write_text(TINY.replace('"--max-steps", "4"', '"--max-steps", "4", "--time-limit", "0"'))
    with pytest.raises(ValueError, match=r"--time-limit must be a positive number of minutes, got 0"):
        load_recipe(bad)


def test_a_stage_stopped_by_its_time_limit_is_not_done_and_trains_on_and_parts_can_be_taken(tmp_path, capsys,
                                                                                             monkeypatch):
    """--time-limit ends a sitting with a checkpoint and a saved model; the recipe records the stage as partial, runs
    the next stages on its model, and trains on when run again. `from` takes a finished recipe's parts and records."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("HOME", str(tmp_path))
    first = tmp_path / "first.toml"
    first.write_text(TINY)
    assert main(["run-recipe", str(first), "--out", str(tmp_path / "first"), "--stages", "data,clip,vae"]) == 0
    source = tmp_path / "first" / "model"
    second = tmp_path / "second.toml"
    second.write_text(TINY.split("[clip]")[0] + f'''
[clip]
from = "{source}"
[vae]
from = "{source}"
[unet]
args = ["--preset", "tiny", "--max-steps", "50", "--time-limit", "0.00001", "--batch-size", "8", "--holdout", "8",
        "--report-to", "none", "--validation-prompts", "a red circle"]
''')
    run = tmp_path / "second"
    capsys.readouterr()
    assert main(["run-recipe", str(second), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "[clip] taken from" in out and "[vae] taken from" in out
    assert "--time-limit 1e-05 min reached at step 1 of 50" in out and "[unet] stopped at its --time-limit" in out
    stages = run / "stages"
    assert not (stages / "unet.json").exists() and (stages / "unet.partial.json").is_file()
    for part in ("vae", "text_encoder"):  # the taken parts are the source's, byte for byte
        name = "diffusion_pytorch_model.safetensors" if part == "vae" else "model.safetensors"
        a, b = load_file(source / part / name), load_file(run / "model" / part / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    provenance = json.loads((run / "model" / "recipe.json").read_text())
    assert provenance["stages"]["vae"]["taken_from"] == str(source)
    assert provenance["stages"]["vae"]["summary"]["steps"] == 3  # the record of the stage that made it
    assert provenance["partial_stages"]["unet"]["summary"]["stopped_at_time_limit"] is True
    assert LatentDiffusionPipeline.from_pretrained(run / "model").unet is not None  # the model was saved
    assert main(["run-recipe", str(second), "--out", str(run)]) == 0  # the same command trains on
    summary = json.loads((stages / "unet.partial.json").read_text())["summary"]
    assert summary["steps"] == 2 and [(s["from_step"], s["to_step"]) for s in summary["sittings"]] == [(0, 1), (1, 2)]
    # `init` trains a recipe's U-Net on (here the partial one just made), and run-recipe --time-limit ends the sitting
    third = tmp_path / "third.toml"
    third.write_text(TINY.split("[clip]")[0] + f'''
[clip]
from = "{run / 'model'}"
[vae]
from = "{run / 'model'}"
[unet]
init = "{run / 'model'}"
args = ["--max-steps", "50", "--learning-rate", "1e-12", "--batch-size", "8", "--holdout", "8", "--report-to", "none",
        "--validation-prompts", "a red circle"]
''')
    capsys.readouterr()
    assert main(["run-recipe", str(third), "--out", str(tmp_path / "third"), "--time-limit", "0.00001"]) == 0
    out = capsys.readouterr().out
    assert f"[unet] starts from the U-Net of {run / 'model'}" in out and "reached at step 1 of 50" in out
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(run / "model" / "unet" / name), load_file(tmp_path / "third" / "model" / "unet" / name)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)  # one step at lr 1e-12
    record = json.loads((tmp_path / "third" / "stages" / "unet.partial.json").read_text())
    assert record["args"][-2:] == ["--time-limit", "1e-05"]
    assert record["initialized_from"]["folder"] == str(run / "model")
    assert record["initialized_from"]["record"]["partial_at_source"] is True
    # the next sitting resumes its checkpoint: the source's U-Net is not copied in again, and the record of where the
    # stage started is the first sitting's even when the source has been replaced since (here: trained on)
    first_record = record["initialized_from"]
    assert main(["run-recipe", str(second), "--out", str(run)]) == 0
    assert json.loads((run / "model" / "recipe.json").read_text())["partial_stages"]["unet"]["summary"]["steps"] == 3
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # run-recipe runs here: the model's record holds paths relative to this folder
    assert main(["run-recipe", str(third), "--out", str(tmp_path / "third"), "--time-limit", "0.00001"]) == 0
    assert "starts from the U-Net" not in capsys.readouterr().out
    text = (tmp_path / "third" / "model" / "recipe.json").read_text()
    provenance = json.loads(text)
    assert str(tmp_path) not in text and provenance["recipe"]["unet"]["init"] == "second/model"
    assert provenance["partial_stages"]["unet"]["initialized_from"]["folder"] == "second/model"
    assert provenance["stages"]["vae"]["taken_from"] == "second/model"
    record = json.loads((tmp_path / "third" / "stages" / "unet.partial.json").read_text())
    assert [(s["from_step"], s["to_step"]) for s in record["summary"]["sittings"]] == [(0, 1), (1, 2)]
    assert record["initialized_from"]["folder"] == str(run / "model")
    assert record["initialized_from"] == first_record and first_record["record"]["summary"]["steps"] == 2
    with pytest.raises(SystemExit):
        main(["run-recipe", str(third), "--out", str(tmp_path / "third"), "--time-limit", "0"])
    assert "argument --time-limit: must be a number > 0, got '0'" in capsys.readouterr().err


def test_a_text_stage_trains_the_clip_stages_encoder_in_place_and_anchors_every_sitting_to_it(tmp_path, capsys,
                                                                                             monkeypatch):
    """[text] runs train_text_encoder on the model folder after CLIP: it replaces the text encoder there, records the
    paraphrase test, and a sitting after a --time-limit anchors to the encoder the first sitting started from, not
    to the one the last sitting wrote."""
    import torch
    from safetensors.torch import load_file

    monkeypatch.setenv("HOME", str(tmp_path))
    recipe = tmp_path / "text.toml"
    recipe.write_text(TINY.split("[vae]")[0].replace('"--n", "40"', '"--n", "60", "--holdout-fraction", "0.2"') + '''
[text]
args = ["--max-steps", "3", "--batch-size", "8", "--holdout", "8", "--report-to", "none", "--learning-rate", "1e-2",
        "--lr-warmup-steps", "0"]
gates = [{ metric = "paraphrase.after.holdout.opposite", min = 0 }]
''')
    run = tmp_path / "run"
    assert main(["run-recipe", str(recipe), "--out", str(run), "--stages", "data,clip"]) == 0
    weights = "model.safetensors"
    clip_states = load_file(run / "model" / "text_encoder" / weights)
    capsys.readouterr()
    assert main(["run-recipe", str(recipe), "--out", str(run), "--time-limit", "0.00001"]) == 0
    assert "[text] stopped at its --time-limit after 1 steps" in capsys.readouterr().out
    started = json.loads((run / "stages" / "text.partial.json").read_text())["summary"]["paraphrase"]["before"]
    first = load_file(run / "model" / "text_encoder" / weights)
    assert any(not torch.equal(first[k], clip_states[k]) for k in clip_states), "the text stage wrote its encoder"
    assert main(["run-recipe", str(recipe), "--out", str(run)]) == 0
    kept = load_file(run / "runs" / "text" / "reference_text_encoder" / weights)
    assert all(torch.equal(kept[k], clip_states[k]) for k in clip_states), "the anchor is the CLIP stage's encoder"
    record = json.loads((run / "stages" / "text.json").read_text())
    assert record["summary"]["steps"] == 3 and [(s["from_step"], s["to_step"])
                                                for s in record["summary"]["sittings"]] == [(0, 1), (1, 3)]
    assert set(record["summary"]["paraphrase"]["after"]) == {"holdout", "unseen"} and record["gates"][0]["passed"]
    # the second sitting's encoder before training is the first one's start, not what the first one wrote
    assert record["summary"]["paraphrase"]["before"] == started
    provenance = json.loads((run / "model" / "recipe.json").read_text())
    assert list(provenance["stages"]) == ["data", "clip", "text"]
    bad = tmp_path / "bad.toml"
    bad.write_text(recipe.read_text().replace('"--learning-rate"', '"--model", "x", "--learning-rate"'))
    with pytest.raises(ValueError, match=r"\[text\] args may not set --model"):
        load_recipe(bad)
