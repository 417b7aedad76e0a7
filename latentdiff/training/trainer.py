"""What the three training scripts share: flags, the accelerate set-up, the data split, and the training loop.

The loop gives every script the same behaviour: gradient accumulation, mixed precision, gradient clipping,
warm-up + cosine/constant learning rate, EMA, a tqdm bar (loss, lr, it/s), tensorboard logs through accelerate's
trackers, atomic checkpoints of the whole accelerate state (models, optimizer, scheduler, RNG, EMA, step) that a
later run resumes exactly — the data position included — and non-finite losses skipped and counted (ten in a
row stop the run). It runs the same on one CPU and under `accelerate launch` on many GPUs. A run that spans several
sittings records each one (when, on what hardware, which steps, how long) in its checkpoints and its summary.

A checkpoint is accelerate's `save_state` (models as safetensors; optimizer, scheduler and RNG states, which
accelerate reloads with torch's restricted `weights_only` unpickler) plus our own `progress.json` and EMA weights
as `ema.safetensors` + `ema.json`, kept out of accelerate's custom-object files, which it unpickles unrestricted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from .. import argparsing
from ..files import write_atomically
from ..data.loader import ImageCaptionDataset, collate, open_dataset

logger = logging.getLogger(__name__)
MAX_BAD_STEPS_IN_A_ROW = 10


def add_common_args(parser: argparse.ArgumentParser, lr: float, batch_size: int, max_steps: int) -> None:
    """Flags every training script takes (run settings; the architecture comes from a preset or a model folder)."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=True, help="imagefolder, save_to_disk folder, or data set name (online)")
    group.add_argument("--image-column", default=None, help="the image column (default: found by name)")
    group.add_argument("--caption-column", default=None, help="the caption column (default: found by name)")
    group.add_argument("--resolution", type=int, default=None, help="default: the preset's / model's")
    group.add_argument("--random-crop", action="store_true", help="random instead of centre crops")
    group.add_argument("--random-flip", action="store_true", help="off by default: captions say left and right")
    group.add_argument("--holdout", type=int, default=64, help="images held out for evaluation (default: 64)")
    group.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    group = parser.add_argument_group("optimisation")
    group.add_argument("--max-steps", type=int, default=max_steps, help=f"optimizer steps (default: {max_steps})")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"per process (default: {batch_size})")
    group.add_argument("--learning-rate", type=float, default=lr, help="peak AdamW learning rate")
    group.add_argument("--lr-scheduler", choices=("cosine", "constant"), default="cosine",
                       help="after warm-up: cosine decay to 0 at --max-steps, or constant")
    group.add_argument("--lr-warmup-steps", type=int, default=100, help="linear warm-up steps")
    group.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    group.add_argument("--gradient-accumulation-steps", type=int, default=1,
                       help="batches per optimizer step")
    group.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, slower")
    group.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default=None,
                       help="default: what `accelerate launch` / accelerate config says, else no")
    group.add_argument("--seed", type=argparsing.training_seed, default=0,
                       help="seed of initial weights, data order and noise")
    group = parser.add_argument_group("run")
    group.add_argument("--output-dir", required=True, help="run folder: checkpoints, logs, samples")
    group.add_argument("--checkpointing-steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    group.add_argument("--checkpoints-total-limit", type=int, default=3, help="checkpoints kept (older ones deleted)")
    group.add_argument("--resume-from-checkpoint", default=None, help="'latest' or a checkpoint folder (default: start fresh)")
    group.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                       help="end this sitting at the first optimizer step after MINUTES of training, with a "
                            "checkpoint, and save the model as at --max-steps; the same command run again (with "
                            "--resume-from-checkpoint latest) trains on. For machines lent for a fixed time "
                            "(default: none, train to --max-steps)")
    group.add_argument("--report-to", default="tensorboard", help="accelerate tracker, or 'none'")
    group.add_argument("--log-every", type=int, default=10, help="log the loss every N steps")


def check_args(args) -> None:
    for name in ("max_steps", "batch_size", "gradient_accumulation_steps", "checkpointing_steps", "log_every"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1, got {value}")
    if not args.learning_rate > 0:
        raise ValueError(f"--learning-rate must be positive, got {args.learning_rate}")
    if args.holdout < 0:
        raise ValueError(f"--holdout must be ≥ 0, got {args.holdout}")
    if getattr(args, "time_limit", None) is not None and not args.time_limit > 0:
        raise ValueError(f"--time-limit must be a positive number of minutes, got {args.time_limit}")


def make_accelerator(args, project: str) -> Accelerator:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # One process may run several stages in turn (recipes, tests), each with its own mixed precision, which
        # accelerate otherwise fixes for the life of the process. (A distributed run keeps its process group.)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    # With no GPU, ask for the CPU explicitly: processes started by `accelerate launch --multi_gpu` (torchrun) then
    # form a gloo group; a plain Accelerator() in them would each train alone. (accelerate's --cpu flag itself
    # always starts a single process.)
    accelerator = Accelerator(
        cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=str(Path(args.output_dir, "logs"))),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        step_scheduler_with_optimizer=False,
    )
    set_seed(args.seed)  # the same on every process: models start identical
    if args.report_to != "none":
        config = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers(project, config=config)
    accelerator.print(f"{project}: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, "
                      f"{accelerator.device}, mixed precision {accelerator.mixed_precision}")
    return accelerator


def start(args, project: str) -> tuple[Accelerator, Path]:
    """Set up accelerate for a stage whose flags its `check_args` has checked (the common ones through
    `trainer.check_args`); returns it and the model folder the stage writes to."""
    return make_accelerator(args, project), Path(args.model_dir or Path(args.output_dir) / "model")


def split_dataset(args, resolution: int):
    """(train, holdout): the last --holdout rows (at most a fifth) are held out, a fixed, seed-independent split.
    From an imagefolder or save_to_disk folder both are ImageCaptionDatasets; from shards (`latentdiff data
    shard`, img2dataset, a brace pattern) train is a ShardStream read by this process alone, and the held-out
    tail is read into memory as an ImageCaptionDataset."""
    from ..data import shards

    kw = dict(resolution=resolution, image_column=args.image_column, caption_column=args.caption_column)
    if shards.is_shards(args.data):
        import datasets
        from accelerate import PartialState

        found = shards.list_shards(args.data)
        total = sum(s.samples for s in found)
        holdout = min(args.holdout, total // 5)
        state = PartialState()
        train = shards.ShardStream(found, resolution, args.batch_size, seed=args.seed, random_crop=args.random_crop,
                                   random_flip=args.random_flip, end=total - holdout, rank=state.process_index,
                                   world=state.num_processes, workers=args.num_workers)
        held = None
        if holdout:
            rows = datasets.Dataset.from_dict(shards.read_samples(found, total - holdout, total))
            held = ImageCaptionDataset(rows.cast_column("image", datasets.Image(decode=False)), resolution)
        return train, held
    dataset = open_dataset(args.data)
    holdout = min(args.holdout, len(dataset) // 5)
    train = ImageCaptionDataset(dataset.select(range(len(dataset) - holdout)), random_crop=args.random_crop,
                                random_flip=args.random_flip, seed=args.seed, **kw)
    held = ImageCaptionDataset(dataset.select(range(len(dataset) - holdout, len(dataset))), **kw) if holdout else None
    return train, held


def make_loader(dataset, args, shuffle: bool = True, batch_size: int | None = None, collate_fn=collate):
    """A DataLoader with its own generator: creating an iterator (each epoch, and once more on resume) then draws
    no number from the global RNG, so a resumed run sees exactly the noise an uninterrupted one would. A ShardStream
    batches itself: its loader takes its batches as they come."""
    from ..data.shards import ShardStream

    if isinstance(dataset, ShardStream):
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=args.num_workers,
                                           generator=torch.Generator().manual_seed(args.seed))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size or args.batch_size, shuffle=shuffle,
                                       collate_fn=collate_fn, num_workers=args.num_workers, drop_last=shuffle,
                                       generator=torch.Generator().manual_seed(args.seed))


def prepare(accelerator: Accelerator, *objects, loader):
    """`accelerator.prepare(*objects, loader)`, except that a loader over a ShardStream, which reads only this
    process's shards already, is not sharded again: its batches are only moved to the device. Returns the
    prepared objects, then the loader."""
    from ..data.shards import DeviceLoader, ShardStream

    if isinstance(loader.dataset, ShardStream):
        prepared = accelerator.prepare(*objects)
        prepared = list(prepared) if isinstance(prepared, (list, tuple)) else [prepared]
        return (*prepared, DeviceLoader(loader, accelerator.device))
    return accelerator.prepare(*objects, loader)


def make_lr_scheduler(optimizer, args):
    from diffusers.optimization import get_scheduler

    name = "cosine" if args.lr_scheduler == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=args.max_steps)


class Progress:
    """Optimizer steps done, where the data stands (epoch, batches of it consumed), the skip tallies and the
    sittings; saved in every checkpoint as progress.json. The data position is counted, not derived from the step:
    accumulation windows cut short at an epoch's end and skipped batches would make a derived one wrong.

    A sitting is one run of the loop: {"started" (UTC), "hardware", "processes", "from_step", "to_step", "seconds"},
    brought up to date at each checkpoint and at the end, so the time of steps a killed run lost is not counted.
    The seconds are the loop's: loading models and building a latent cache before it are not in them."""

    FIELDS = ("step", "epoch", "batches_in_epoch", "bad_steps", "skipped_images")

    def __init__(self):
        self.step = self.epoch = self.batches_in_epoch = self.bad_steps = self.skipped_images = 0
        self.sittings: list[dict] = []
        self._clock = None
        self.stopped_at_time_limit = False

    def seconds_this_sitting(self) -> float:
        return 0.0 if self._clock is None else time.monotonic() - self._clock

    def state_dict(self) -> dict:
        return {**{k: getattr(self, k) for k in self.FIELDS}, "sittings": self.sittings}

    def load_state_dict(self, state: dict) -> None:
        for k in self.FIELDS:
            setattr(self, k, state[k])
        self.sittings = list(state.get("sittings", []))  # checkpoints written before sittings were recorded have none

    def begin_sitting(self, processes: int) -> None:
        self._clock = time.monotonic()
        self.sittings.append({"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hardware": hardware(),
                              "processes": processes, "from_step": self.step, "to_step": self.step, "seconds": 0.0})

    def update_sitting(self) -> None:
        if self._clock is not None:
            self.sittings[-1].update(to_step=self.step, seconds=round(time.monotonic() - self._clock, 1))

    def summary(self) -> dict:
        """What a training script reports: steps, skips, and the sittings with their total time. Steps before the
        first recorded sitting (from checkpoints that predate the record) are counted in `unrecorded_steps`."""
        return {"steps": self.step, "skipped_steps": self.bad_steps, "skipped_images": self.skipped_images,
                "train_seconds": round(sum(s["seconds"] for s in self.sittings), 1),
                "unrecorded_steps": self.sittings[0]["from_step"] if self.sittings else self.step,
                "sittings": self.sittings,
                **({"stopped_at_time_limit": True} if self.stopped_at_time_limit else {})}


def hardware() -> dict:
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": device,
            "torch": torch.__version__}


def _save_own_state(folder: Path, progress: Progress, ema) -> None:
    (folder / "progress.json").write_text(json.dumps(progress.state_dict()))
    if ema is not None:
        from safetensors.torch import save_file

        state = ema.state_dict()
        shadow = state.pop("shadow_params")
        save_file({f"shadow.{i}": p.detach().cpu().contiguous() for i, p in enumerate(shadow)}, folder / "ema.safetensors")
        (folder / "ema.json").write_text(json.dumps(state))


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from: missing, truncated or garbage files."""


def check_checkpoint(path: Path, ema, process_index: int = 0) -> bool:
    """Raise CheckpointError naming the first file of `path` that a resume could not use. Return whether the resume
    can be exact: False, with a loud warning, when only the RNG state is missing or unreadable (the resume then
    runs, but its random draws differ)."""
    from safetensors import SafetensorError, safe_open

    def damaged(name: str, problem: str) -> CheckpointError:
        earlier = sorted((c for c in path.parent.glob("checkpoint-*") if c.is_dir() and _step_of(c) < _step_of(path)),
                         key=_step_of)
        how = (f"resume from the previous one with --resume-from-checkpoint {earlier[-1]} (or move {path.name} out "
               "of the way and use 'latest')" if earlier else
               f"there is no earlier checkpoint: move {path} out of the way to start again")
        return CheckpointError(f"checkpoint {path} cannot be resumed from: {name} {problem}; {how}")

    if not path.is_dir() or not any(path.iterdir()):
        raise damaged("the folder", "is empty" if path.is_dir() else "does not exist")
    try:
        Progress().load_state_dict(json.loads((path / "progress.json").read_text()))
    except FileNotFoundError:
        raise damaged("progress.json", "is missing") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise damaged("progress.json", f"is unreadable ({type(error).__name__}: {error})") from None
    weights = sorted(path.glob("model*.safetensors")) + (
        [path / "ema.safetensors"] if ema is not None else [])
    if not any(p.name.startswith("model") for p in weights):
        raise damaged("model.safetensors", "is missing (no model weights)")
    for file in weights:
        if not file.is_file():
            raise damaged(file.name, "is missing (this run keeps an EMA of the weights)")
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise damaged(file.name, f"is truncated or not a safetensors file ({error})") from None
    if ema is not None:
        try:
            json.loads((path / "ema.json").read_text())["decay"]
        except FileNotFoundError:
            raise damaged("ema.json", "is missing") from None
        except (ValueError, KeyError, TypeError) as error:
            raise damaged("ema.json", f"is unreadable ({type(error).__name__}: {error})") from None
    for name in ("optimizer.bin", "scheduler.bin"):
        found = sorted(path.glob(name.replace(".bin", "*.bin")))
        if not found:
            raise damaged(name, "is missing")
        for file in found:
            try:
                torch.load(file, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 - whatever a damaged pickle raises
                raise damaged(file.name, f"is unreadable ({type(error).__name__}: {str(error)[:200]})") from None
    rng = path / f"random_states_{process_index}.pkl"
    try:
        torch.load(rng, map_location="cpu", weights_only=False)  # accelerate reads it so (numpy RNG state inside)
    except Exception as error:  # noqa: BLE001
        problem = "is missing" if not rng.exists() else f"is unreadable ({type(error).__name__})"
        logger.warning("RESUME NOT EXACT: %s %s in checkpoint %s; resuming with random states seeded from --seed "
                       "and the step, so noise, timesteps and caption dropout differ from an uninterrupted run",
                       rng.name, problem, path)
        return False
    return True


def _step_of(path: Path) -> int:
    return int(path.name.split("-")[1]) if re.fullmatch(r"checkpoint-\d+", path.name) else 1 << 62


def _load_own_state(folder: Path, progress: Progress, ema, device) -> None:
    progress.load_state_dict(json.loads((folder / "progress.json").read_text()))
    if ema is not None:
        from safetensors.torch import load_file

        shadow = load_file(folder / "ema.safetensors", device=str(device))
        state = json.loads((folder / "ema.json").read_text())
        ema.load_state_dict({**state, "shadow_params": [shadow[f"shadow.{i}"] for i in range(len(shadow))]})


def checkpoints(output_dir: str | Path) -> list[Path]:
    folder = Path(output_dir) / "checkpoints"
    found = [p for p in folder.glob("checkpoint-*") if re.fullmatch(r"checkpoint-\d+", p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator: Accelerator, output_dir: str | Path, progress: Progress, ema, total_limit: int) -> None:
    """The full state, written to a temporary folder and renamed: a killed run never leaves half a checkpoint."""
    folder = Path(output_dir) / "checkpoints"
    final, tmp = folder / f"checkpoint-{progress.step}", folder / f".checkpoint-{progress.step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_own_state(tmp, progress, ema)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in checkpoints(output_dir)[:-total_limit] if total_limit > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, args, progress: Progress, ema=None) -> bool:
    """Load the checkpoint named by --resume-from-checkpoint; False when there is none yet (a fresh start)."""
    if not args.resume_from_checkpoint:
        return False
    if args.resume_from_checkpoint == "latest":
        found = checkpoints(args.output_dir)
        if not found:
            logger.warning("--resume-from-checkpoint latest: no checkpoint in %s yet, starting fresh", args.output_dir)
            return False
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise ValueError(f"--resume-from-checkpoint must be 'latest' or a checkpoint folder, got {str(path)!r}")
    exact = check_checkpoint(path, ema, accelerator.process_index)
    try:
        accelerator.load_state(str(path))
    except Exception as error:  # noqa: BLE001 - what check_checkpoint could not foresee (a model of another shape)
        raise CheckpointError(f"checkpoint {path} cannot be resumed from: {type(error).__name__}: "
                              f"{' '.join(str(error).split())[:300]}") from error
    _load_own_state(path, progress, ema, accelerator.device)
    if not exact:  # each process its own stream again, and not the first sitting's
        set_seed((args.seed + progress.step) % 2**31, device_specific=True)
    accelerator.print(f"resumed from {path} at step {progress.step}")
    return True


def train(accelerator: Accelerator, args, models: list[torch.nn.Module], optimizer, lr_scheduler, loader,
          step_fn: Callable[[dict], tuple[torch.Tensor, dict]], ema=None, on_step: Callable[[int], None] | None = None,
          progress: Progress | None = None) -> Progress:
    """Run optimizer steps until --max-steps. `models`, `optimizer`, `lr_scheduler` and `loader` are already
    prepared; `step_fn(batch) → (loss, logs)`; `ema` (diffusers EMAModel) follows the models' parameters, in order; `on_step(step)`
    runs after each optimizer step (validation …)."""
    progress = progress or Progress()
    if not resume(accelerator, args, progress, ema):
        set_seed(args.seed, device_specific=True)  # from here each process draws its own noise and timesteps
    if progress.step < args.max_steps:  # a finished run resumed (killed while saving its model) adds no sitting
        progress.begin_sitting(accelerator.num_processes)
    if len(loader) == 0:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the training set: no full batch to train on")
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    bar = tqdm(total=args.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process,
               desc=Path(args.output_dir).name, dynamic_ncols=True)
    bad_in_a_row, running = 0, []
    while progress.step < args.max_steps:
        loader.set_epoch(progress.epoch)
        if hasattr(loader.dataset, "set_epoch"):  # caption, crop and flip draws depend on the epoch
            loader.dataset.set_epoch(progress.epoch)
        skip, readable = progress.batches_in_epoch, 0
        if hasattr(loader.dataset, "skip_batches"):  # a stream skips what it has served without decoding it
            loader.dataset.skip_batches(skip)
            batches = loader
        else:
            batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            progress.batches_in_epoch += 1
            progress.skipped_images += int(batch["skipped"])
            if not _all_true(accelerator, torch.tensor(_rows(batch) > 0)):  # no image of it (on some process) read
                accelerator.print(f"step {progress.step}: a batch with no readable image, skipped")
                continue
            readable += 1
            with accelerator.accumulate(*models):
                loss, logs = step_fn(batch)
                good = _all_true(accelerator, torch.isfinite(loss.detach()))
                if good:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:  # a finite loss can still give non-finite gradients
                        norm = accelerator.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
                        good = bool(torch.isfinite(norm))
                    if good or accelerator.scaler is not None:
                        optimizer.step()  # with fp16 the grad scaler skips a non-finite step and lowers its scale
                optimizer.zero_grad(set_to_none=True)
            if good and accelerator.sync_gradients and accelerator.optimizer_step_was_skipped:
                good = False
            if not good:
                progress.bad_steps += 1
                bad_in_a_row += 1
                accelerator.print(f"step {progress.step}: non-finite loss or gradients, skipped "
                                  f"({progress.bad_steps} so far)")
                if bad_in_a_row >= MAX_BAD_STEPS_IN_A_ROW:
                    raise RuntimeError(f"stopping: the loss or its gradients were NaN or infinite {bad_in_a_row} "
                                       f"times in a row at step {progress.step}; lower --learning-rate or check "
                                       f"the data (last checkpoint: {checkpoints(args.output_dir)[-1:] or 'none'})")
                continue
            running.append(loss.detach().float().item())
            if not accelerator.sync_gradients:
                continue
            bad_in_a_row = 0
            lr_scheduler.step()
            if ema is not None:
                ema.step([p for m in models for p in accelerator.unwrap_model(m).parameters()])
            progress.step += 1
            mean_loss = sum(running) / len(running)
            running.clear()
            bar.update(1)
            bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            if progress.step % args.log_every == 0 or progress.step == args.max_steps:
                accelerator.log({"train/loss": mean_loss, "train/lr": lr_scheduler.get_last_lr()[0], **logs},
                                step=progress.step)
            out_of_time = _time_is_up(accelerator, args, progress) and progress.step < args.max_steps
            if progress.step % args.checkpointing_steps == 0 or progress.step == args.max_steps or out_of_time:
                progress.update_sitting()
                save_checkpoint(accelerator, args.output_dir, progress, ema, args.checkpoints_total_limit)
            if out_of_time:
                progress.stopped_at_time_limit = True
                accelerator.print(f"--time-limit {args.time_limit:g} min reached at step {progress.step} of "
                                  f"{args.max_steps}; checkpoint saved, the same command trains on")
                break
            if on_step is not None and progress.step < args.max_steps:
                on_step(progress.step)
            if progress.step >= args.max_steps:
                break
        else:  # the epoch ran out
            if readable == 0 and skip == 0:
                raise ValueError(f"--data {args.data}: no batch of a whole epoch held a readable image "
                                 f"({progress.skipped_images} unreadable images skipped)")
            progress.epoch, progress.batches_in_epoch = progress.epoch + 1, 0
            continue
        break  # the last step, or the time limit
    bar.close()
    progress.update_sitting()
    if progress.skipped_images:
        accelerator.print(f"skipped {progress.skipped_images} unreadable images")
    if progress.bad_steps:
        accelerator.print(f"skipped {progress.bad_steps} steps with a non-finite loss or gradients")
    return progress


def _time_is_up(accelerator: Accelerator, args, progress: Progress) -> bool:
    """--time-limit has passed (on any process: they all stop at the same step)."""
    limit = getattr(args, "time_limit", None)
    if limit is None:
        return False
    flag = torch.tensor(progress.seconds_this_sitting() < limit * 60)
    return not _all_true(accelerator, flag)


def _rows(batch: dict) -> int:
    """The number of examples in a collated batch (0 when none of its images could be read)."""
    return next((len(v) for k, v in batch.items() if k != "skipped" and isinstance(v, (torch.Tensor, list))), 1)


def _all_true(accelerator: Accelerator, flag: torch.Tensor) -> bool:
    """True on every process (so that all of them skip a step together, as DDP needs)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    return accelerator.gather(flag.float().reshape(1).to(accelerator.device)).min().item() == 1


def write_summary(output_dir: str | Path, summary: dict) -> None:
    write_atomically(Path(output_dir) / "summary.json", json.dumps(summary, indent=2, default=str) + "\n")
