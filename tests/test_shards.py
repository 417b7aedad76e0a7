"""Sharded data (`latentdiff data shard`, WebDataset tars): written from an imagefolder, read back sample for
sample, dealt to processes and workers without overlap, resumed mid-epoch, img2dataset's layout, and the three
training stages streaming from shards."""

import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.data.imagefolder import write_imagefolder
from latentdiff.data.loader import ImageCaptionDataset, open_dataset
from latentdiff.data.shapes import shapes_rows
from latentdiff.data.shards import ShardStream, is_shards, list_shards, write_shards
from latentdiff.training import clip as clip_training
from latentdiff.training import trainer
from latentdiff.training import unet as unet_training
from latentdiff.training import vae as vae_training

from test_training import LAUNCH_TWO, QUIET, REPO, kill_after_checkpoint  # noqa: F401


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "shapes"
    write_imagefolder(out, shapes_rows(64, 32, seed=1))
    return out


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards") / "tars"
    write_shards(folder, out, shard_size=8)
    return out


def read_all(stream, workers=0):
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers)
    return [batch for batch in loader]


def test_shards_hold_every_sample_and_read_back_as_the_imagefolder_does(folder, shards):
    index = json.loads((shards / "index.json").read_text())
    assert index["samples"] == 64 and [s["samples"] for s in index["shards"]] == [8] * 8
    assert is_shards(shards) and not is_shards(folder)
    found = list_shards(shards)
    assert [s.first for s in found] == list(range(0, 64, 8))
    stream = ShardStream(found, 32, 4, seed=5, random_crop=True, shuffle_buffer=1)
    stream.set_epoch(2)
    mapped = ImageCaptionDataset(open_dataset(folder), 32, seed=5, random_crop=True)
    mapped.set_epoch(2)
    batches = read_all(stream)
    assert sorted(int(i) for b in batches for i in b["indices"]) == list(range(64))
    for batch in batches:
        for index, pixels, caption in zip(batch["indices"].tolist(), batch["pixel_values"], batch["captions"]):
            item = mapped[index]
            torch.testing.assert_close(pixels, item["pixel_values"], rtol=0, atol=0)
            assert caption == item["caption"]
    with tarfile.open(shards / "000000.tar") as tar:  # the image stored as it was, its metadata beside it
        names = tar.getnames()
        assert set(names[:3]) == {"000000000.png", "000000000.txt", "000000000.json"}
        assert tar.extractfile("000000000.png").read() == (folder / open_dataset(folder)[0]["image"].filename
                                                           .split("/")[-1]).read_bytes()
        assert "scene" in json.loads(tar.extractfile("000000000.json").read())


def test_an_epoch_resumed_mid_way_yields_the_rest_of_the_same_batches(shards):
    found = list_shards(shards)
    whole = ShardStream(found, 32, 4, seed=2, workers=2, shuffle_buffer=5)
    whole.set_epoch(1)
    batches = read_all(whole, workers=2)
    assert len(batches) == len(whole) == 16
    for skip in (3, 8):
        resumed = ShardStream(found, 32, 4, seed=2, workers=2, shuffle_buffer=5)
        resumed.set_epoch(1)
        resumed.skip_batches(skip)
        rest = read_all(resumed, workers=2)
        assert [b["indices"].tolist() for b in rest] == [b["indices"].tolist() for b in batches[skip:]]
        torch.testing.assert_close(rest[0]["pixel_values"], batches[skip]["pixel_values"])
    other = ShardStream(found, 32, 4, seed=2, workers=2, shuffle_buffer=5)
    other.set_epoch(2)
    assert [b["indices"].tolist() for b in read_all(other, workers=2)] != [b["indices"].tolist() for b in batches]


def test_two_processes_with_two_workers_each_never_read_a_sample_twice(shards):
    result = subprocess.run([*LAUNCH_TWO, str(REPO / "tests" / "dist_shards.py")], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1", "SHARDS": str(shards)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK epoch 0: 64 distinct samples" in result.stdout and "OK epoch 1: 64 distinct" in result.stdout


def test_too_few_shards_for_the_readers_is_a_clear_error(shards):
    with pytest.raises(ValueError, match="8 shard.*2 process.*× 5 data-loader worker.*at least 10"):
        ShardStream(list_shards(shards), 32, 4, world=2, workers=5)


def test_img2dataset_shards_read_as_they_are(tmp_path):
    for k, n in enumerate((3, 2)):
        with tarfile.open(tmp_path / f"{k:05d}.tar", "w") as tar:
            for i in range(n):
                key = f"{k:05d}{i:04d}"
                image = io.BytesIO()
                Image.new("RGB", (40, 30), (200, 10 * i, 0)).save(image, format="JPEG")
                for ext, data in (("jpg", image.getvalue()), ("txt", f"photo {key}".encode()),
                                  ("json", json.dumps({"key": key, "caption": f"photo {key}"}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        if k == 0:  # img2dataset writes a stats file per shard; the other is counted from its headers
            (tmp_path / f"{k:05d}_stats.json").write_text(json.dumps({"successes": n}))
    found = list_shards(str(tmp_path / "{00000..00001}.tar"))
    assert [(s.samples, s.first) for s in found] == [(3, 0), (2, 3)]
    batch = read_all(ShardStream(found, 16, 5))[0]
    assert batch["pixel_values"].shape == (5, 3, 16, 16)
    assert sorted(batch["captions"]) == sorted(["photo 000000000", "photo 000000001", "photo 000000002",
                                                "photo 000010000", "photo 000010001"])
    with pytest.raises(ValueError, match="1 of its 3 shards do not exist"):
        list_shards(str(tmp_path / "{00000..00002}.tar"))


def test_an_unreadable_image_in_a_shard_is_skipped_and_counted(shards, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("000000.tar", "000001.tar"):
        with tarfile.open(shards / name) as source, tarfile.open(broken / name, "w") as tar:
            for member in source.getmembers():
                data = source.extractfile(member).read()
                if member.name == "000000003.png":
                    data = data[:40]  # cut short: not a readable PNG
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    batches = read_all(ShardStream(list_shards(broken), 32, 4, shuffle_buffer=1))
    assert sum(b["skipped"] for b in batches) == 1 and sum(len(b["captions"]) for b in batches) == 15


def test_the_three_stages_train_from_shards(shards, tmp_path):
    model = tmp_path / "model"
    common = ["--data", str(shards), "--preset", "tiny", "--model-dir", str(model), "--max-steps", "3",
              "--batch-size", "4", "--holdout", "8", *QUIET]
    clip = clip_training.main([*common, "--output-dir", str(tmp_path / "clip")])
    vae = vae_training.main([*common, "--output-dir", str(tmp_path / "vae")])
    unet = unet_training.main([*common, "--model", str(model), "--output-dir", str(tmp_path / "unet"),
                               "--validation-prompts", "x"])
    assert clip["steps"] == vae["steps"] == unet["steps"] == 3
    assert "holdout_psnr" in vae and "round_trip_oracle" in vae  # the held-out tail came from the last shard
    cached = unet_training.main([*common, "--model", str(model), "--output-dir", str(tmp_path / "cached"),
                                 "--cache-latents", "--cache-dir", str(tmp_path / "cache")])
    assert cached["steps"] == 3
    built = list((tmp_path / "cache").glob("latent-shards-*"))
    assert len(built) == 1 and json.loads((built[0] / "index.json").read_text())["samples"] == 56  # 8 held out


def test_latent_shards_hold_what_the_single_file_cache_holds(folder, shards, tmp_path):
    from latentdiff.training.latent_shards import LatentShardStream, build_latent_shards
    from latentdiff.training.unet import CachedLatents, build_cache

    from latentdiff.models import new_pipeline

    pipe = new_pipeline("tiny", seed=0)
    vae, text_encoder, tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
    build_cache(tmp_path / "cache.safetensors", ImageCaptionDataset(open_dataset(folder), 32), vae, text_encoder,
                tokenizer, "cpu")
    single = CachedLatents(tmp_path / "cache.safetensors")
    stream = ShardStream(list_shards(shards), 32, 4, end=48)
    index = build_latent_shards(tmp_path / "latents", stream, vae, text_encoder, tokenizer, "cpu")
    assert index["samples"] == 48 and [e["samples"] for e in index["shards"]] == [8] * 6
    latent = LatentShardStream(list_shards(tmp_path / "latents"), 4, shuffle_buffer=1)
    batches = read_all(latent)
    assert len(batches) == 12
    first = batches[0]  # shards are dealt in a seeded order: find which samples came first
    rows = [i for i in range(48) if torch.allclose(single[i]["mean"], first["mean"][0], atol=1e-5)]
    assert len(rows) == 1
    row = rows[0]
    torch.testing.assert_close(first["std"][0], single[row]["std"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(first["text"][0], single.text[single[row]["text_id"]], atol=1e-5, rtol=1e-4)


def test_a_streaming_run_resumed_after_a_kill_ends_where_an_uninterrupted_one_does(shards, tmp_path, monkeypatch):
    """Two workers, 56 training samples (8 held out) in 7 shards dealt 4 and 3 to the readers: epochs of 2 × 6
    batches of 4. Killed after the checkpoint at step 17 (batch 5 of the second epoch), then resumed to step 20."""
    from latentdiff import LatentDiffusionPipeline

    model = tmp_path / "model"
    vae_training.main(["--data", str(shards), "--preset", "tiny", "--model-dir", str(model), "--max-steps", "1",
                       "--batch-size", "4", "--output-dir", str(tmp_path / "vae"), *QUIET])
    clip_training.main(["--data", str(shards), "--preset", "tiny", "--model-dir", str(model), "--max-steps", "1",
                        "--batch-size", "4", "--output-dir", str(tmp_path / "clip"), *QUIET])

    def args(out, *extra):
        return ["--data", str(shards), "--model", str(model), "--preset", "tiny", "--output-dir", str(out),
                "--max-steps", "20", "--batch-size", "4", "--holdout", "8", "--checkpointing-steps", "17",
                "--num-workers", "2", "--learning-rate", "1e-3", "--validation-prompts", "x", *QUIET, *extra]

    unet_training.main(args(tmp_path / "whole"))
    kill_after_checkpoint(monkeypatch, 17)
    with pytest.raises(KeyboardInterrupt):
        unet_training.main(args(tmp_path / "split"))
    monkeypatch.undo()
    unet_training.main(args(tmp_path / "split", "--resume-from-checkpoint", "latest"))
    whole = LatentDiffusionPipeline.from_pretrained(tmp_path / "whole" / "model").unet.state_dict()
    split = LatentDiffusionPipeline.from_pretrained(tmp_path / "split" / "model").unet.state_dict()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    progress = json.loads((tmp_path / "split" / "checkpoints" / "checkpoint-20" / "progress.json").read_text())
    assert len(ShardStream(list_shards(shards), 32, 4, end=56, workers=2)) == 12
    assert progress["epoch"] == 1 and progress["batches_in_epoch"] == 8


def test_the_shipped_accelerate_configs_load_as_what_they_say():
    from accelerate.commands.config.config_args import ClusterConfig

    expected = {"ddp": ("MULTI_GPU", 8, 1), "multinode-ddp": ("MULTI_GPU", 16, 2), "fsdp": ("FSDP", 8, 1),
                "deepspeed-zero2": ("DEEPSPEED", 8, 1)}
    for name, (kind, processes, machines) in expected.items():
        config = ClusterConfig.from_yaml_file(str(REPO / "training" / "accelerate" / f"{name}.yaml"))
        assert (config.distributed_type.value, config.num_processes, config.num_machines) == (kind, processes,
                                                                                             machines), name
    assert ClusterConfig.from_yaml_file(str(REPO / "training" / "accelerate" / "fsdp.yaml")).fsdp_config[
        "fsdp_version"] == 2


@pytest.mark.parametrize("script", ["train_clip.py", "train_vae.py", "train_unet.py"])
def test_each_stage_trains_from_shards_on_two_processes(shards, tmp_path, script):
    """Under `accelerate launch --multi_gpu` (the U-Net on latent shards), and the VAE under the FSDP config:
    accelerate runs FSDP only on accelerators (GPUs), so on a CPU the same launch forms a gloo group (MULTI_CPU),
    the data path a multi-GPU run takes, each process streaming its own shards."""
    launcher = LAUNCH_TWO
    if script == "train_vae.py":
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPO / "training" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision",
                    "no"]
    stage = []
    if script == "train_unet.py":
        model = tmp_path / "parts"
        for part in ("train_clip.py", "train_vae.py"):
            subprocess.run([sys.executable, str(REPO / "training" / part), "--data", str(shards), "--preset", "tiny",
                            "--model-dir", str(model), "--output-dir", str(tmp_path / part), "--max-steps", "1",
                            "--batch-size", "4", *QUIET], check=True, capture_output=True)
        stage = ["--model", str(model), "--validation-prompts", "x", "--cache-latents", "--cache-dir",
                 str(tmp_path / "cache")]
    command = [*launcher, str(REPO / "training" / script), "--data", str(shards), "--preset", "tiny", *stage,
               "--output-dir", str(tmp_path / "run"), "--max-steps", "3", "--batch-size", "4", "--holdout", "8",
               "--num-workers", "2", *QUIET]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), MULTI_CPU" in result.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and [s["processes"] for s in summary["sittings"]] == [2]
