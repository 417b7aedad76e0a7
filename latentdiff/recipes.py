"""Recipes: one TOML file per data set that chains data → CLIP → VAE → U-Net (→ decoder) with the settings that
made a model. The optional decoder stage fine-tunes the VAE's decoder with its encoder frozen (`train_vae
--finetune-decoder`): the U-Net's latents stay valid, so it can run after the U-Net, or beside it.

    latentdiff run-recipe pipelines/emoji64.toml --out runs/emoji64

Layout of OUT: data/ (the data set), model/ (the pipeline folder, filled stage by stage, with recipe.json: the recipe
and the stage records), runs/STAGE/ (checkpoints, logs, samples), stages/STAGE.json (written when a stage finishes:
its summary, the wall time and hardware of the command that finished it, and, for a training stage, every sitting
it took in the summary's `sittings`, with `train_seconds` their total).
Running the same command again skips finished stages and resumes an unfinished one from its latest checkpoint.
"""

from __future__ import annotations

import json
import os
import time
import tomllib
from pathlib import Path

from .trainer import hardware

STAGES = ("data", "clip", "vae", "unet", "decoder")


def load_recipe(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe must be a TOML file, got {str(path)!r}")
    recipe = tomllib.loads(path.read_text())
    unknown = set(recipe) - set(STAGES) - {"name", "description"}
    if unknown:
        raise ValueError(f"recipe {path}: unknown sections {sorted(unknown)}; sections are {list(STAGES)}")
    if recipe.get("data", {}).get("kind") not in ("shapes", "emoji", "folder"):
        raise ValueError(f"recipe {path}: [data] kind must be 'shapes', 'emoji' or 'folder'")
    return recipe


def _data_stage(recipe: dict, out: Path) -> dict:
    from .cli import main as cli_main

    data = recipe["data"]
    if data["kind"] == "folder":
        return {"data": data["path"]}
    if cli_main(["data", data["kind"], "--out", str(out / "data"), "--overwrite", *data.get("args", [])]) != 0:
        raise RuntimeError(f"the {data['kind']} data stage failed")
    return {"data": str(out / "data")}


def run_recipe(path: str | Path, out: str | Path, stages: list[str] | None = None) -> dict:
    """Run (or finish) every stage of a recipe; returns {stage: record}."""
    from . import clip_training, unet_training, vae_training

    recipe, out = load_recipe(path), Path(out)
    done_dir = out / "stages"
    done_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for stage in stages or []:
        if stage not in recipe:
            raise ValueError(f"--stages: {stage!r} is not a section of {path} (its stages: "
                             f"{[s for s in STAGES if s in recipe]})")
    for stage in stages or [s for s in STAGES if s in recipe]:
        marker = done_dir / f"{stage}.json"
        if marker.is_file():
            records[stage] = json.loads(marker.read_text())
            print(f"[{stage}] already done ({marker})")
            continue
        print(f"[{stage}] running")
        started = time.time()
        data = recipe["data"]["path"] if recipe["data"]["kind"] == "folder" else str(out / "data")
        common = ["--data", data, "--output-dir", str(out / "runs" / stage), "--resume-from-checkpoint", "latest"]
        args = recipe.get(stage, {}).get("args", [])
        if stage == "data":
            summary = _data_stage(recipe, out)
        elif stage == "clip":
            summary = clip_training.main([*common, "--model-dir", str(out / "model"), *args])
        elif stage == "vae":
            summary = vae_training.main([*common, "--model-dir", str(out / "model"), *args])
        elif stage == "decoder":
            summary = vae_training.main([*common, "--model-dir", str(out / "model"), "--finetune-decoder", *args])
        else:
            summary = unet_training.main([*common, "--model", str(out / "model"), "--model-dir", str(out / "model"),
                                          *args])
        record = {"stage": stage, "summary": summary, "wall_seconds": round(time.time() - started, 1),
                  "hardware": hardware(), "args": args}
        marker.write_text(json.dumps(record, indent=2, default=str) + "\n")
        records[stage] = record
    write_provenance(recipe, out)  # also when every stage was done already, or another process finished one
    return records


def write_provenance(recipe: dict, out: Path) -> None:
    """MODEL/recipe.json: the recipe and every finished stage's record (wall time, hardware, summary), so a model
    folder says how it was made wherever it is copied (`latentdiff export` carries it along)."""
    if not (out / "model").is_dir():
        return
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((out / "stages").glob("*.json"))}
    provenance = {"recipe": recipe, "stages": {s: stages[s] for s in STAGES if s in stages}}
    staging = out / "model" / f".recipe.json.{os.getpid()}"
    staging.write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    os.replace(staging, out / "model" / "recipe.json")
