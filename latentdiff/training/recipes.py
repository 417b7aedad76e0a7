"""Recipes: one TOML file per data set that chains data → CLIP (→ text) → VAE → U-Net (→ decoder) with the
settings that made a model. The optional text stage trains the text encoder alone to state the scene a caption
describes (`train_text_encoder.py`), on the CLIP stage's encoder, before the U-Net learns to read it. The optional
decoder stage fine-tunes the VAE's decoder with its encoder frozen (`train_vae --finetune-decoder`): the U-Net's
latents stay valid, so it can run after the U-Net, or beside it.

    latentdiff run-recipe pipelines/emoji64.toml --out runs/emoji64

Layout of OUT: data/ (the data set), model/ (the pipeline folder, filled stage by stage, with recipe.json: the recipe
and the stage records), runs/STAGE/ (checkpoints, logs, samples), stages/STAGE.json (written when a stage finishes:
its summary, the wall time and hardware of the command that finished it, and, for a training stage, every sitting
it took in the summary's `sittings`, with `train_seconds` their total).
Running the same command again skips finished stages and resumes an unfinished one from its latest checkpoint.

The optional eval stage runs `latentdiff eval` on the finished model (prompts: the recipe's data set; report in
OUT/eval). A stage may name gates, values of its summary (for eval: of its report) that must reach a bound:

    gates = [{ metric = "round_trip_oracle.round_trip.mean", min = 0.97 }]

A dotted path walks dicts by key and lists by index ("scales.1.oracle.mean"). Every gate's value is written into the
stage record. A stage that misses a gate is recorded in stages/STAGE.failed.json, not marked done, and the recipe
stops there: raise its --max-steps and run the recipe again to train on from its last checkpoint.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from ..files import write_atomically
from .trainer import hardware

STAGES = ("data", "clip", "text", "vae", "unet", "decoder", "distill", "eval")


# Keys a section may hold, and the flags run-recipe itself gives each stage: its inputs and outputs, which a recipe
# may not redirect (a recipe's outputs stay inside --out). Abbreviations of them are refused too (argparse takes
# `--output` for `--output-dir`).
STAGE_KEYS = {"data": {"kind", "args", "path", "gates"}, **{s: {"args", "gates"} for s in STAGES if s != "data"}}
# The parts of the model folder a training stage writes; `from = "MODEL"` takes them (and the stage's record) from
# a model folder an earlier recipe made instead of training them again.
STAGE_PARTS = {"clip": ("tokenizer", "text_encoder", "clip"), "vae": ("vae",), "unet": ("unet", "scheduler")}
for _stage in STAGE_PARTS:
    STAGE_KEYS[_stage] = STAGE_KEYS[_stage] | {"from"}
# `init = "MODEL"` on the U-Net stage: train on from another recipe's U-Net (its unet/ and scheduler/ start the
# stage; its record is kept in this one's as `initialized_from`) instead of from --preset's random weights.
STAGE_KEYS["unet"] = STAGE_KEYS["unet"] | {"init"}
TRAINING_STAGES = ("clip", "text", "vae", "decoder", "unet", "distill")
RESERVED_FLAGS = {
    "data": ("--out", "--overwrite"),
    "clip": ("--data", "--output-dir", "--model-dir", "--resume-from-checkpoint"),
    "text": ("--data", "--output-dir", "--model-dir", "--model", "--resume-from-checkpoint"),
    "vae": ("--data", "--output-dir", "--model-dir", "--resume-from-checkpoint"),
    "decoder": ("--data", "--output-dir", "--model-dir", "--resume-from-checkpoint", "--finetune-decoder"),
    "unet": ("--data", "--output-dir", "--model-dir", "--model", "--resume-from-checkpoint", "--cache-dir"),
    "distill": ("--data", "--output-dir", "--model-dir", "--model", "--resume-from-checkpoint", "--cache-dir"),
    "eval": ("--model", "--prompts", "--out"),
}
DATA_KINDS = ("shapes", "emoji", "folder")
# Flags whose values are files or folders, resolved against the recipe file's folder; MAYBE_PATH_FLAGS only when
# the value looks like a path (a preset may be a name, a judge an open_clip name).
PATH_FLAGS = ("--font", "--tokenizer", "--reference", "--inception-weights", "--candidates")
MAYBE_PATH_FLAGS = ("--preset", "--judge")


def load_recipe(path: str | Path) -> dict:
    """Read and check a whole recipe before any stage runs: sections, keys, value types, gates, and every stage's
    flags (parsed by the stage's own parser). A `[data] path` is resolved against the recipe file's folder."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"recipe must be a TOML file, got {str(path)!r}")
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"recipe {path}: not valid TOML: {error}") from None
    unknown = set(recipe) - set(STAGES) - {"name", "description"}
    if unknown:
        raise ValueError(f"recipe {path}: unknown sections {sorted(unknown)}; sections are {list(STAGES)}")
    for key in ("name", "description"):
        if key in recipe and not isinstance(recipe[key], str):
            raise ValueError(f"recipe {path}: {key} must be a string, got {recipe[key]!r}")
    if "data" not in recipe:
        raise ValueError(f"recipe {path}: a [data] section is required")
    for stage in STAGES:
        if stage not in recipe:
            continue
        section = recipe[stage]
        if not isinstance(section, dict):
            raise ValueError(f"recipe {path}: {stage} must be a [{stage}] table, got {section!r}")
        extra = set(section) - STAGE_KEYS[stage]
        if extra:
            raise ValueError(f"recipe {path}: [{stage}] unknown keys {sorted(extra)}; its keys are "
                             f"{sorted(STAGE_KEYS[stage])}")
        args = section.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise ValueError(f"recipe {path}: [{stage}] args must be a list of strings (each flag and value "
                             f"quoted), got {args!r}")
    data = recipe["data"]
    if data.get("kind") not in DATA_KINDS:
        raise ValueError(f"recipe {path}: [data] kind must be one of {list(DATA_KINDS)}, got {data.get('kind')!r}")
    if data["kind"] == "folder":
        if not isinstance(data.get("path"), str) or not data["path"]:
            raise ValueError(f"recipe {path}: [data] kind = \"folder\" needs path = \"DIR\" (the data set; relative "
                             f"to the recipe file), got {data.get('path')!r}")
        folder = (path.parent / data["path"]).resolve()
        if not folder.is_dir():
            raise ValueError(f"recipe {path}: [data] path {data['path']!r} is not a folder (looked for {folder})")
        recipe["data"] = {**data, "path": str(folder)}
    elif "path" in data:
        raise ValueError(f"recipe {path}: [data] path is only for kind = \"folder\"; kind {data['kind']!r} writes "
                         "its data set into OUT/data")
    _validate_gates(path, recipe)
    for stage in STAGE_PARTS:
        if "from" in recipe.get(stage, {}):
            recipe[stage] = {**recipe[stage], "from": str(_check_from(path, stage, recipe[stage]))}
    if "init" in recipe.get("unet", {}):
        recipe["unet"] = {**recipe["unet"], "init": str(_check_init(path, recipe["unet"]))}
    for stage in STAGES:
        if stage in recipe and "from" not in recipe[stage]:
            recipe[stage] = {**recipe[stage], "args": _resolve_paths(path.parent, recipe[stage].get("args", []))}
            _check_stage_args(path, stage, recipe)
    return recipe


def _check_from(path: Path, stage: str, section: dict) -> Path:
    """`from`: a model folder (relative to the recipe file) holding the stage's parts and, in its recipe.json, the
    record of the stage that made them."""
    source = section["from"]
    if not isinstance(source, str) or not source:
        raise ValueError(f"recipe {path}: [{stage}] from must be a model folder, got {source!r}")
    if section.get("args") or section.get("gates"):
        raise ValueError(f"recipe {path}: [{stage}] takes its parts from {source!r}: it trains nothing, so it may "
                         "not have args or gates")
    folder = (path.parent / source).resolve()
    missing = [part for part in STAGE_PARTS[stage] if part != "clip" and not (folder / part).is_dir()]
    if missing:
        raise ValueError(f"recipe {path}: [{stage}] from {source!r}: {folder} has no {', '.join(missing)}/")
    if _source_record(folder, stage) is None:
        raise ValueError(f"recipe {path}: [{stage}] from {source!r}: {folder / 'recipe.json'} holds no record of a "
                         f"{stage} stage (only parts a recipe made can be taken)")
    return folder


def _check_init(path: Path, section: dict) -> Path:
    """`init`: a model folder (relative to the recipe file) whose U-Net, made by a recipe, this stage trains on."""
    source = section["init"]
    if not isinstance(source, str) or not source:
        raise ValueError(f"recipe {path}: [unet] init must be a model folder, got {source!r}")
    if "from" in section:
        raise ValueError(f"recipe {path}: [unet] has both from (take a U-Net as it is) and init (train one on); "
                         "keep one")
    folder = (path.parent / source).resolve()
    missing = [part for part in STAGE_PARTS["unet"] if not (folder / part / "config.json").is_file()
               and not (folder / part / "scheduler_config.json").is_file()]
    if missing:
        raise ValueError(f"recipe {path}: [unet] init {source!r}: {folder} has no {', '.join(missing)}/")
    if _source_record(folder, "unet") is None:
        raise ValueError(f"recipe {path}: [unet] init {source!r}: {folder / 'recipe.json'} holds no record of a "
                         "unet stage (only a U-Net a recipe made can be trained on)")
    return folder


def _source_record(folder: Path, stage: str) -> dict | None:
    """The record of `stage` in a model folder's recipe.json: a finished stage's, or one that missed its gate or
    stopped at its --time-limit (then marked so)."""
    try:
        provenance = json.loads((folder / "recipe.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(provenance, dict):
        return None
    marks = {"stages": {}, "missed_gates": {"missed_gate_at_source": True},
             "partial_stages": {"partial_at_source": True}}
    for key, mark in marks.items():
        record = (provenance.get(key) or {}).get(stage)
        if isinstance(record, dict):
            return {**record, **mark}
    return None


def _copy_parts(stage: str, source: Path, out: Path) -> None:
    """Copy the stage's parts from `source` into OUT/model, each whole or not at all."""
    import shutil

    for part in STAGE_PARTS[stage]:
        if (source / part).is_dir():
            target = out / "model" / part
            staging = target.with_name(f".{part}.taking")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(source / part, staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)


def _take_stage(stage: str, source: Path, out: Path) -> dict:
    """Copy the stage's parts from `source` into OUT/model; the stage's record there, with where it came from."""
    _copy_parts(stage, source, out)
    return {**_source_record(source, stage), "taken_from": str(source)}


def _resolve_paths(folder: Path, args: list[str]) -> list[str]:
    """Relative file and folder values of stage flags, made absolute against the recipe file's folder."""
    out, previous = [], None
    for token in args:
        flag, eq, value = token.partition("=") if token.startswith("--") and "=" in token else (previous, "", token)
        if flag in PATH_FLAGS or flag in MAYBE_PATH_FLAGS and ("/" in value or value.endswith(".json")) \
                and not value.startswith("open_clip:"):
            if value and not Path(value).expanduser().is_absolute():
                value = str((folder / value).resolve())
            token = f"{flag}={value}" if eq else value
        out.append(token)
        previous = token if token.startswith("--") and "=" not in token else None
    return out


def _check_stage_args(path: Path, stage: str, recipe: dict) -> None:
    """The stage's args parse with its own parser, and set none of the flags run-recipe sets."""
    import contextlib
    import io

    args = recipe[stage].get("args", [])
    for token in args:
        flag = token.split("=", 1)[0]
        if len(flag) > 2 and flag.startswith("--"):
            hit = [f for f in RESERVED_FLAGS[stage] if f.startswith(flag)]
            if hit:
                raise ValueError(f"recipe {path}: [{stage}] args may not set {hit[0]} ({token!r}): run-recipe sets "
                                 "it, so that a recipe reads and writes only inside --out")
    if stage == "data":
        if recipe["data"]["kind"] == "folder":
            if args:
                raise ValueError(f"recipe {path}: [data] args are for the built-in data sets, not kind = \"folder\"")
            return
        from ..data.build import data_parser

        parser, argv = data_parser(), ["data", recipe["data"]["kind"], "--out", "OUT", *args]
    elif stage == "eval":
        from ..evaluation.job import build_parser

        parser, argv = build_parser(), ["--prompts", "DATA", "--out", "OUT", *args]
    else:
        from . import clip as clip_training, lcm, text_encoder, unet as unet_training, vae as vae_training

        module = {"clip": clip_training, "text": text_encoder, "vae": vae_training, "decoder": vae_training,
                  "unet": unet_training, "distill": lcm}[stage]
        parser = module.build_parser()
        argv = ["--data", "DATA", "--output-dir", "OUT",
                *(["--model", "MODEL"] if stage in ("text", "unet", "distill") else []), *args]
    messages = io.StringIO()
    try:
        with contextlib.redirect_stderr(messages):
            parsed = parser.parse_args(argv)
    except SystemExit:
        reason = messages.getvalue().strip().splitlines()[-1:] or ["bad arguments"]
        reason = reason[0].split(": error: ", 1)[-1].rsplit(" (see ", 1)[0]
        raise ValueError(f"recipe {path}: [{stage}] args: {reason}") from None
    try:  # the flags' own rules (ranges, combinations), as the stage would check them when it starts
        if stage == "data":
            from ..data.build import check_data_args

            check_data_args(parsed)
        elif stage == "eval":
            from ..evaluation.job import check_args

            check_args(parsed, prompts_written=False)
            data = recipe.get("data", {})
            held = any(a.split("=")[0] in ("--holdout", "--holdout-fraction") for a in data.get("args", []))
            if parsed.hard_negatives and (data.get("kind") == "emoji" or data.get("kind") == "shapes" and not held):
                raise ValueError("--hard-negatives needs the recipe's data set to be shapes with held-out pairs "
                                 f"([data] kind = \"shapes\" with --holdout or --holdout-fraction), got kind = "
                                 f"{data.get('kind')!r} with args {data.get('args', [])}")
        else:
            module.check_args(parsed)
    except ValueError as error:
        raise ValueError(f"recipe {path}: [{stage}] args: {error}") from None


class GateMissed(RuntimeError):
    """A stage finished without reaching one of its recipe gates (the CLI exits with status 3)."""

    exit_code = 3


def metric_value(record: dict, path: str):
    """The value at a dotted path ("scales.1.oracle.mean") of a summary or report, or None where it has none."""
    value = record
    for part in path.split("."):
        if isinstance(value, list) and part.lstrip("-").isdigit() and -len(value) <= int(part) < len(value):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None
    return value


def check_gates(stage: str, gates: list, summary: dict) -> list[dict]:
    """Each gate with the value the stage reached and whether it passed (a missing value fails)."""
    results = []
    for gate in gates:
        value = metric_value(summary, gate["metric"])
        passed = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            ("min" not in gate or value >= gate["min"]) and ("max" not in gate or value <= gate["max"])
        results.append({**gate, "value": value, "passed": passed})
    return results


def _validate_gates(path: Path, recipe: dict) -> None:
    for stage in STAGES:
        gates = recipe.get(stage, {}).get("gates", [])
        if not isinstance(gates, list) or not all(
                isinstance(g, dict) and isinstance(g.get("metric"), str) and ("min" in g or "max" in g)
                and set(g) <= {"metric", "min", "max"} for g in gates):
            raise ValueError(f"recipe {path}: [{stage}] gates must be a list of {{metric = 'a.b', min = x and/or "
                             f"max = y}} tables, got {gates!r}")


def _data_stage(recipe: dict, out: Path) -> dict:
    from ..data.build import data_parser, make_data

    data = recipe["data"]
    if data["kind"] == "folder":
        return {"data": data["path"]}
    print(make_data(data_parser().parse_args(["data", data["kind"], "--out", str(out / "data"), "--overwrite",
                                               *data.get("args", [])])))
    return {"data": str(out / "data")}


def run_recipe(path: str | Path, out: str | Path, stages: list[str] | None = None,
               time_limit: float | None = None) -> dict:
    """Run (or finish) every stage of a recipe; returns {stage: record}. `time_limit` (minutes) ends each training
    stage of this sitting as its --time-limit would (it overrides the recipe's)."""
    from . import clip as clip_training, lcm, text_encoder, unet as unet_training, vae as vae_training
    from ..evaluation import job as eval_job

    recipe, out = load_recipe(path), Path(out)
    done_dir = out / "stages"
    done_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for stage in stages or []:
        if stage not in recipe:
            raise ValueError(f"--stages: {stage!r} is not a section of {path} (its stages: "
                             f"{[s for s in STAGES if s in recipe]})")
    try:
        for stage in stages or [s for s in STAGES if s in recipe]:
            marker = done_dir / f"{stage}.json"
            if marker.is_file():
                records[stage] = json.loads(marker.read_text())
                print(f"[{stage}] already done ({marker})")
                continue
            if "from" in recipe.get(stage, {}):
                record = _take_stage(stage, Path(recipe[stage]["from"]), out)
                print(f"[{stage}] taken from {recipe[stage]['from']}")
                write_atomically(marker, json.dumps(record, indent=2, default=str) + "\n")
                records[stage] = record
                continue
            print(f"[{stage}] running")
            started = time.time()
            data = recipe["data"]["path"] if recipe["data"]["kind"] == "folder" else str(out / "data")
            common = ["--data", data, "--output-dir", str(out / "runs" / stage), "--resume-from-checkpoint", "latest"]
            args = recipe.get(stage, {}).get("args", [])
            if time_limit is not None and stage in TRAINING_STAGES:
                args = [*args, "--time-limit", f"{time_limit:g}"]
            init = recipe.get(stage, {}).get("init")
            partial = done_dir / f"{stage}.partial.json"
            # where an earlier sitting started from, as it was then (the source may have been replaced since)
            started_from = json.loads(partial.read_text()).get("initialized_from") if partial.is_file() else None
            # a checkpoint, once there, carries on (the copy would be overwritten by it, but it is not made either)
            if init and not any((out / "runs" / stage / "checkpoints").glob("checkpoint-*")):
                _copy_parts(stage, Path(init), out)
                print(f"[{stage}] starts from the U-Net of {init}")
            if stage == "data":
                summary = _data_stage(recipe, out)
            elif stage == "clip":
                summary = clip_training.main([*common, "--model-dir", str(out / "model"), *args])
            elif stage == "text":  # the model folder's text encoder, replaced in place
                summary = text_encoder.main([*common, "--model", str(out / "model"), "--model-dir", str(out / "model"),
                                             *args])
            elif stage == "vae":
                summary = vae_training.main([*common, "--model-dir", str(out / "model"), *args])
            elif stage == "decoder":
                summary = vae_training.main([*common, "--model-dir", str(out / "model"), "--finetune-decoder", *args])
            elif stage == "distill":
                summary = lcm.main([*common, "--model", str(out / "model"), "--model-dir", str(out / "model"), *args])
            elif stage == "eval":
                summary = eval_job.main(["--model", str(out / "model"), "--prompts", data, "--out", str(out / "eval"),
                                         *args])
            else:
                summary = unet_training.main([*common, "--model", str(out / "model"), "--model-dir", str(out / "model"),
                                              *args])
            record = {"stage": stage, "summary": summary, "wall_seconds": round(time.time() - started, 1),
                      "hardware": hardware(), "args": args}
            if init:
                record["initialized_from"] = started_from or {"folder": init,
                                                              "record": _source_record(Path(init), stage)}
            gates = check_gates(stage, recipe.get(stage, {}).get("gates", []), summary or {})
            if gates:
                record["gates"] = gates
            missed = [g for g in gates if not g["passed"]]
            if missed:
                failed = done_dir / f"{stage}.failed.json"
                write_atomically(failed, json.dumps(record, indent=2, default=str) + "\n")
                raise GateMissed(f"[{stage}] missed its gate: " + "; ".join(
                    f"{g['metric']} = {g['value']} (needs {'≥ ' + str(g['min']) if 'min' in g else ''}"
                    f"{' and ' if 'min' in g and 'max' in g else ''}{'≤ ' + str(g['max']) if 'max' in g else ''})"
                    for g in missed) + f"; the recipe stops here (record: {failed}). " + (
                        "Raise the stage's --max-steps and run the recipe again to train on from its last checkpoint."
                        if stage != "data" and stage != "eval" else "Train the stage before it further, then rerun."))
            (done_dir / f"{stage}.failed.json").unlink(missing_ok=True)
            records[stage] = record
            if (summary or {}).get("stopped_at_time_limit"):  # not done: running the recipe again trains on
                write_atomically(done_dir / f"{stage}.partial.json", json.dumps(record, indent=2, default=str) + "\n")
                print(f"[{stage}] stopped at its --time-limit after {summary['steps']} steps: not marked done; run the "
                      f"recipe again to train on (the later stages use its model as it is now)")
                continue
            (done_dir / f"{stage}.partial.json").unlink(missing_ok=True)
            write_atomically(marker, json.dumps(record, indent=2, default=str) + "\n")
    finally:  # also when a stage missed its gate (the model folder says so), or every stage was done already
        write_provenance(recipe, out)
    return records


def write_provenance(recipe: dict, out: Path) -> None:
    """MODEL/recipe.json: the recipe and every finished stage's record (wall time, hardware, summary), and under
    "missed_gates" the record of any stage that missed its gate, so a model folder says how it was made wherever it
    is copied (`latentdiff export` carries it along)."""
    if not (out / "model").is_dir():
        return
    stages = {p.stem: json.loads(p.read_text()) for p in sorted((out / "stages").glob("*.json"))}
    provenance = {"recipe": recipe, "stages": {s: stages[s] for s in STAGES if s in stages}}
    missed = {s: stages[f"{s}.failed"] for s in STAGES if f"{s}.failed" in stages}
    if missed:  # a stage that missed its gate, and whose parts the later stages were then run on by hand
        provenance["missed_gates"] = missed
    partial = {s: stages[f"{s}.partial"] for s in STAGES if f"{s}.partial" in stages and s not in stages}
    if partial:  # a stage stopped by its --time-limit, whose model the later stages used as it was
        provenance["partial_stages"] = partial
    provenance["paths"] = "a relative path is relative to the folder run-recipe ran in"
    write_atomically(out / "model" / "recipe.json",
                     json.dumps(_portable(provenance, Path.cwd()), indent=2, default=str) + "\n")


def _portable(value, base: Path):
    """`value` with every absolute path inside `base` written relative to it, so that a model folder's record
    does not carry the layout of the machine that made it (a shipped model is copied everywhere)."""
    if isinstance(value, dict):
        return {key: _portable(item, base) for key, item in value.items()}
    if isinstance(value, list):
        return [_portable(item, base) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        if path.is_relative_to(base):
            return str(path.relative_to(base))
    return value
