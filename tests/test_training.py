"""The three training stages: they run, learn, resume exactly, cache faithfully, run distributed, and survive NaNs."""

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff import LatentDiffusionPipeline
from latentdiff.training import clip as clip_training, trainer, unet as unet_training, vae as vae_training
from latentdiff.data.imagefolder import write_imagefolder
from latentdiff.data.shapes import BACKGROUNDS, COLOURS, SHAPES, Scene, SceneObject, a, shapes_rows

REPO = Path(__file__).resolve().parents[1]
# Two processes on a CPU-only machine: torchrun processes (accelerate's --multi_gpu launcher) that the trainer puts on
# the CPU, where they form a gloo group. accelerate's own --cpu flag starts a single process.
LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
QUIET = ["--report-to", "none"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "shapes"
    write_imagefolder(out, shapes_rows(48, 32, seed=0))
    return out


@pytest.fixture(scope="module")
def parts(shapes, tmp_path_factory):
    """A tiny model folder with tokenizer, text encoder, CLIP and VAE, from 3 steps of each stage."""
    run = tmp_path_factory.mktemp("parts")
    model = run / "model"
    common = ["--data", str(shapes), "--preset", "tiny", "--model-dir", str(model), "--max-steps", "3",
              "--batch-size", "8", "--holdout", "8", *QUIET]
    clip_summary = clip_training.main([*common, "--output-dir", str(run / "clip")])
    vae_summary = vae_training.main([*common, "--output-dir", str(run / "vae")])
    return model, clip_summary, vae_summary


def test_clip_and_vae_stages_write_loadable_parts(parts):
    from diffusers import AutoencoderKL
    from transformers import CLIPModel, CLIPProcessor, CLIPTextModel, CLIPTokenizer

    model, clip_summary, vae_summary = parts
    assert clip_summary["steps"] == 3 and "image_to_text_top1" in clip_summary
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    clip = CLIPModel.from_pretrained(model / "clip")
    text = CLIPTextModel.from_pretrained(model / "text_encoder")
    ids = tokenizer(["a red circle"], return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(text(ids).last_hidden_state, clip.text_model(ids).last_hidden_state)
    assert list(CLIPProcessor.from_pretrained(model / "clip").image_processor.image_mean) == [0.5, 0.5, 0.5]
    vae = AutoencoderKL.from_pretrained(model / "vae")
    assert vae.config.scaling_factor == pytest.approx(vae_summary["scaling_factor"]) != 0.18215
    assert vae_summary["holdout_psnr"] > 0 and (model.parent / "vae" / "reconstructions.png").is_file()


def test_clip_training_pads_to_the_longest_caption_without_changing_the_features(parts):
    from transformers import CLIPModel, CLIPTokenizer

    model = parts[0]
    tokenizer, clip = CLIPTokenizer.from_pretrained(model / "tokenizer"), CLIPModel.from_pretrained(model / "clip")
    captions = ["a red circle", "two small blue squares to the left of a green star"]
    short = clip_training.tokenize(tokenizer, captions, full_context=False)
    full = clip_training.tokenize(tokenizer, captions)  # what the U-Net's text states are computed from
    assert short.shape[1] < full.shape[1] == tokenizer.model_max_length
    with torch.no_grad():
        torch.testing.assert_close(clip_training.embed_texts(clip, short), clip_training.embed_texts(clip, full))


def test_unet_stage_writes_a_pipeline_both_libraries_load(parts, shapes, tmp_path):
    model, _, _ = parts
    summary = unet_training.main(["--data", str(shapes), "--model", str(model), "--preset", "tiny", "--output-dir",
                                  str(tmp_path), "--max-steps", "3", "--batch-size", "8", "--use-ema", *QUIET,
                                  "--validation-prompts", "a red circle", "two blue stars"])
    assert summary["steps"] == 3 and Image.open(summary["samples"]).size == (2 * 32 + 2, 2 * 32 + 2)
    from diffusers import StableDiffusionPipeline

    ours = LatentDiffusionPipeline.from_pretrained(tmp_path / "model")
    theirs = StableDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert ours.clip is not None and theirs.unet.config.sample_size == 16
    assert (tmp_path / "checkpoints" / "checkpoint-3" / "ema.safetensors").is_file()


def test_vae_adversarial_and_perceptual_terms_run(parts, shapes, tmp_path):
    model, _, _ = parts
    summary = vae_training.main(["--data", str(shapes), "--preset", "tiny", "--model-dir", str(model), "--output-dir",
                                 str(tmp_path), "--max-steps", "3", "--batch-size", "8", "--holdout", "8", *QUIET,
                                 "--perceptual-weight", "0.1", "--disc-weight", "0.5", "--disc-start", "1"])
    assert summary["steps"] == 3 and np.isfinite(summary["holdout_psnr"])


def test_decoder_finetuning_keeps_the_latents_and_a_later_unet_stage_keeps_the_decoder(parts, shapes, tmp_path):
    import shutil

    from diffusers import AutoencoderKL

    model = tmp_path / "model"
    shutil.copytree(parts[0], model)
    before = AutoencoderKL.from_pretrained(model / "vae")
    summary = vae_training.main(["--data", str(shapes), "--model-dir", str(model), "--output-dir", str(tmp_path / "dec"),
                                 "--finetune-decoder", "--max-steps", "3", "--batch-size", "8", "--holdout", "8",
                                 "--learning-rate", "1e-3", *QUIET])
    after = AutoencoderKL.from_pretrained(model / "vae")
    assert summary["steps"] == 3 and np.isfinite(summary["holdout_psnr"])
    assert after.config.scaling_factor == before.config.scaling_factor  # the latents did not change, nor their scale
    old, new = before.state_dict(), after.state_dict()
    frozen = [k for k in old if k.startswith(("encoder.", "quant_conv."))]
    assert frozen and all(torch.equal(old[k], new[k]) for k in frozen)
    assert not all(torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))

    # A U-Net stage writing into the folder it reads its frozen parts from writes only unet/ and scheduler/, so a
    # decoder fine-tuned there while it trained (the recipe's decoder stage) is not put back as it was.
    vae_folder = (model / "vae").stat().st_ino
    unet_training.main(["--data", str(shapes), "--model", str(model), "--model-dir", str(model), "--preset", "tiny",
                        "--output-dir", str(tmp_path / "unet"), "--max-steps", "2", "--batch-size", "8", *QUIET,
                        "--validation-prompts", "a red circle"])
    assert (model / "vae").stat().st_ino == vae_folder and (model / "unet" / "config.json").is_file()
    LatentDiffusionPipeline.from_pretrained(model)


def test_decoder_finetuning_needs_a_trained_vae(shapes, tmp_path):
    with pytest.raises(ValueError, match="--finetune-decoder continues a trained VAE"):
        vae_training.main(["--data", str(shapes), "--model-dir", str(tmp_path / "empty"), "--output-dir",
                           str(tmp_path / "dec"), "--finetune-decoder", "--max-steps", "1", *QUIET])


def _single_object_set(path, n=600, seed=0):
    """One coloured shape per image, captioned "a red circle": 48 classes, a task a tiny CLIP learns in seconds."""
    rng = random.Random(seed)

    def rows():
        for _ in range(n):
            colour, shape, side = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(14, 24)
            x, y = rng.randint(0, 32 - side), rng.randint(0, 32 - side)
            scene = Scene("single", rng.choice(list(BACKGROUNDS)),
                          [SceneObject(shape, colour, "large", "center", (x, y, x + side - 1, y + side - 1))])
            yield scene.render(32), {"text": a(f"{colour} {shape}")}

    write_imagefolder(path, rows())
    return path


def test_clip_learns_well_above_chance_retrieval(tmp_path):
    data = _single_object_set(tmp_path / "objects")
    summary = clip_training.main(["--data", str(data), "--preset", "tiny", "--output-dir", str(tmp_path / "run"),
                                  "--max-steps", "150", "--batch-size", "64", "--learning-rate", "3e-3",
                                  "--lr-warmup-steps", "10", "--holdout", "96", "--checkpointing-steps", "1000", *QUIET])
    # measured 2026-11-22: image→text top-1 0.28, text→image top-1 0.33 against chance 0.024
    assert summary["image_to_text_top1"] >= 5 * summary["chance_top1"]
    assert summary["text_to_image_top1"] >= 5 * summary["chance_top1"]
    assert summary["image_to_text_top5"] >= 0.4


def _fixed_batch_loss(unet, noise_scheduler, latents, hidden, seed=0):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (len(latents),), generator=g)
    ab = noise_scheduler.schedule.alpha_bar(t, latents)
    from latentdiff import diffusion

    with torch.no_grad():
        out = unet(diffusion.q_sample(latents, noise, ab), t, encoder_hidden_states=hidden).sample
    return diffusion.diffusion_loss(out, latents, noise, ab).item()


def test_unet_loss_on_a_fixed_batch_falls_by_at_least_30_percent(parts, tmp_path):
    model, _, _ = parts
    data = tmp_path / "batch"
    write_imagefolder(data, shapes_rows(16, 32, seed=1))
    args = ["--data", str(data), "--model", str(model), "--preset", "tiny", "--output-dir", str(tmp_path / "run"),
            "--batch-size", "16", "--holdout", "0", "--learning-rate", "2e-3", "--lr-warmup-steps", "5",
            "--lr-scheduler", "constant", "--checkpointing-steps", "1000", "--validation-prompts", "x", *QUIET]
    unet_training.main([*args, "--max-steps", "1", "--learning-rate", "1e-12", "--output-dir", str(tmp_path / "start")])
    unet_training.main([*args, "--max-steps", "80"])
    parsed = unet_training.build_parser().parse_args([*args, "--max-steps", "1"])
    tokenizer, text_encoder, vae, _, _, scheduler = unet_training.load_parts(parsed, "cpu")
    from latentdiff.data.loader import ImageCaptionDataset, open_dataset
    from latentdiff.schedulers import DDPMScheduler

    ds = ImageCaptionDataset(open_dataset(data), resolution=32)
    pixels = torch.stack([ds.pixels(i) for i in range(16)])
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        hidden = text_encoder(clip_training.tokenize(tokenizer, [c[0] for c in ds.captions]))[0]
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    before = _fixed_batch_loss(LatentDiffusionPipeline.from_pretrained(tmp_path / "start" / "model").unet,
                               noise_scheduler, latents, hidden)
    after = _fixed_batch_loss(LatentDiffusionPipeline.from_pretrained(tmp_path / "run" / "model").unet,
                              noise_scheduler, latents, hidden)
    assert after <= 0.7 * before, (before, after)


def _unet_args(parts, shapes, out, steps, *extra):
    model, _, _ = parts
    return ["--data", str(shapes), "--model", str(model), "--preset", "tiny", "--output-dir", str(out),
            "--max-steps", str(steps), "--batch-size", "8", "--holdout", "8", "--checkpointing-steps", "4",
            "--learning-rate", "1e-3", "--lr-warmup-steps", "2", "--use-ema", "--ema-decay", "0.9",
            "--validation-prompts", "x", *QUIET, *extra]


def kill_after_checkpoint(monkeypatch, at_step: int):
    """Make the run die right after writing the checkpoint of `at_step`, as a killed job would."""
    save = trainer.save_checkpoint

    def save_then_die(accelerator, output_dir, progress, ema, limit):
        save(accelerator, output_dir, progress, ema, limit)
        if progress.step == at_step:
            monkeypatch.setattr(trainer, "save_checkpoint", save)
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(trainer, "save_checkpoint", save_then_die)


@pytest.mark.parametrize("accumulation", [1, 3])
def test_resume_gives_the_parameters_of_an_uninterrupted_run(parts, shapes, tmp_path, monkeypatch, accumulation):
    """Killed right after the checkpoint at step 4 of 8, then resumed: EMA, optimizer, lr schedule, RNG and data
    position all continue, and step 8 has the parameters of a run that was never interrupted. With accumulation
    3 over 5 batches an epoch, windows are cut short at every epoch's end."""
    extra = ("--gradient-accumulation-steps", str(accumulation))
    unet_training.main(_unet_args(parts, shapes, tmp_path / "whole", 8, *extra))
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        unet_training.main(_unet_args(parts, shapes, tmp_path / "split", 8, *extra))
    unet_training.main(_unet_args(parts, shapes, tmp_path / "split", 8, *extra, "--resume-from-checkpoint", "latest"))
    whole = LatentDiffusionPipeline.from_pretrained(tmp_path / "whole" / "model").unet.state_dict()
    split = LatentDiffusionPipeline.from_pretrained(tmp_path / "split" / "model").unet.state_dict()
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-5, atol=1e-6, msg=name)
    progress = json.loads((tmp_path / "split" / "checkpoints" / "checkpoint-8" / "progress.json").read_text())
    assert progress["step"] == 8


@pytest.mark.parametrize("cache", [False, True])
def test_a_trained_text_encoder_is_saved_and_resumes_exactly(parts, shapes, tmp_path, monkeypatch, cache):
    """--train-text-encoder: the text encoder learns with the U-Net (its EMA saved with it), its cache holds latents
    only, and a run killed at step 4 of 6 and resumed ends with the parameters of an uninterrupted one."""
    from transformers import CLIPTextModel

    extra = ("--train-text-encoder", "--text-encoder-lr", "3e-3", "--cache-dir", str(tmp_path / "cache"),
             *(("--cache-latents",) if cache else ()))
    unet_training.main(_unet_args(parts, shapes, tmp_path / "whole", 6, *extra))
    kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        unet_training.main(_unet_args(parts, shapes, tmp_path / "split", 6, *extra))
    unet_training.main(_unet_args(parts, shapes, tmp_path / "split", 6, *extra, "--resume-from-checkpoint", "latest"))
    before = CLIPTextModel.from_pretrained(parts[0] / "text_encoder").state_dict()
    whole = LatentDiffusionPipeline.from_pretrained(tmp_path / "whole" / "model")
    split = LatentDiffusionPipeline.from_pretrained(tmp_path / "split" / "model")
    for part in ("unet", "text_encoder"):
        ours = getattr(split, part).state_dict()
        for name, tensor in getattr(whole, part).state_dict().items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{part}.{name}")
    moved = max((whole.text_encoder.state_dict()[n] - t).abs().max().item() for n, t in before.items())
    assert moved > 1e-4
    if cache:  # one cache of latents only, shared by both runs, and no text states in it
        from safetensors.torch import load_file

        [path] = (tmp_path / "cache").glob("latents-*.safetensors")
        assert load_file(path)["text"].numel() == 0


def test_text_encoder_flags_are_checked(parts, shapes, tmp_path):
    with pytest.raises(ValueError, match="--text-encoder-lr 0.001 sets the learning rate of a text encoder that "
                                         "trains: add --train-text-encoder"):
        unet_training.main(_unet_args(parts, shapes, tmp_path, 2, "--text-encoder-lr", "1e-3"))
    with pytest.raises(ValueError, match="--text-encoder-lr must be > 0, got -1"):
        unet_training.main(_unet_args(parts, shapes, tmp_path, 2, "--train-text-encoder", "--text-encoder-lr", "-1"))
    with pytest.raises(ValueError, match="--train-text-encoder do not apply"):
        unet_training.main(["--data", str(shapes), "--model", str(parts[0]), "--output-dir", str(tmp_path),
                            "--lora-rank", "4", "--train-text-encoder"])


def test_zero_terminal_snr_rebuilds_the_training_schedule_and_needs_v_prediction(parts, shapes, tmp_path):
    base = ["--data", str(shapes), "--model", str(parts[0]), "--preset", "tiny", "--output-dir", str(tmp_path)]
    parse = unet_training.build_parser().parse_args
    *_, scheduler = unet_training.load_parts(parse([*base, "--prediction-type", "v_prediction",
                                                    "--rescale-betas-zero-snr"]), "cpu")
    assert scheduler.config.prediction_type == "v_prediction" and scheduler.config.rescale_betas_zero_snr
    assert scheduler.alphas_cumprod[-1].item() == 0  # the betas themselves, not only the config, were rebuilt
    *_, plain = unet_training.load_parts(parse(base), "cpu")
    assert plain.alphas_cumprod[-1].item() > 0
    with pytest.raises(ValueError, match="--rescale-betas-zero-snr makes .* use --prediction-type v_prediction"):
        unet_training.check_args(parse([*base, "--prediction-type", "epsilon", "--rescale-betas-zero-snr"]))
    with pytest.raises(ValueError, match="add --prediction-type v_prediction"):  # the model's own ε, unnamed
        unet_training.load_parts(parse([*base, "--rescale-betas-zero-snr"]), "cpu")


def test_add_text_embedding_starts_as_the_same_unet_and_then_learns_from_the_pooled_caption(parts, shapes, tmp_path):
    from diffusers import UNet2DConditionModel

    args = unet_training.build_parser().parse_args(["--data", str(shapes), "--model", str(parts[0]), "--preset", "tiny",
                                                    "--output-dir", str(tmp_path), "--add-text-embedding"])
    torch.manual_seed(0)
    *_, unet, _ = unet_training.load_parts(args, "cpu")
    torch.manual_seed(0)
    *_, plain, _ = unet_training.load_parts(unet_training.build_parser().parse_args(
        ["--data", str(shapes), "--model", str(parts[0]), "--preset", "tiny", "--output-dir", str(tmp_path)]), "cpu")
    assert unet.config.addition_embed_type == "text" and plain.config.addition_embed_type is None
    x, hidden = torch.randn(2, 4, 8, 8), torch.randn(2, 6, unet.config.cross_attention_dim)
    assert torch.equal(unet(x, 500, encoder_hidden_states=hidden).sample,
                       plain(x, 500, encoder_hidden_states=hidden).sample)
    unet(x, 500, encoder_hidden_states=hidden).sample.pow(2).mean().backward()
    assert unet.add_embedding.norm2.weight.grad.abs().sum() > 0  # zero at the start, but it trains
    assert unet_training.with_text_embedding(unet) is unet  # once only
    unet.save_pretrained(tmp_path / "unet")  # a plain diffusers U-Net: it loads anywhere diffusers does
    assert UNet2DConditionModel.from_pretrained(tmp_path / "unet").config.addition_embed_type == "text"
    from latentdiff.model_folder import with_config

    image_embedded = with_config(UNet2DConditionModel, plain.config, addition_embed_type="image",
                                 encoder_hid_dim=plain.config.cross_attention_dim)
    with pytest.raises(ValueError, match="--add-text-embedding: the U-Net already has an addition embedding of "
                                         "type 'image'"):
        unet_training.with_text_embedding(image_embedded)


def test_cached_latents_give_the_same_loss(parts, shapes, tmp_path):
    model, _, _ = parts
    args = unet_training.build_parser().parse_args(["--data", str(shapes), "--model", str(model), "--preset", "tiny",
                                                    "--output-dir", str(tmp_path), "--holdout", "0", "--snr-gamma", "5",
                                                    "--noise-offset", "0.05", "--uncond-prob", "0.3"])
    tokenizer, text_encoder, vae, _, unet, scheduler = unet_training.load_parts(args, "cpu")
    noise_scheduler = unet_training.DDPMScheduler.from_config(scheduler.config)
    train_set, _ = trainer.split_dataset(args, 32)
    path = unet_training.cache_path(tmp_path / "cache", vae, text_encoder, tokenizer, train_set, 32)
    unet_training.build_cache(path, train_set, vae, text_encoder, tokenizer, "cpu")
    cached = unet_training.CachedLatents(path)
    assert unet_training.cache_path(tmp_path / "cache", vae, text_encoder, tokenizer, train_set, 32) == path
    tokenizer(["a red circle"], padding="longest", truncation=True, max_length=4)  # leaves padding state behind
    assert unet_training.cache_path(tmp_path / "cache", vae, text_encoder, tokenizer, train_set, 32) == path
    assert unet_training.cache_path(tmp_path / "cache", vae, text_encoder, tokenizer, train_set, 16) != path
    losses = []
    for use_cache in (False, True):
        torch.manual_seed(3)
        if use_cache:
            batch = unet_training.collate_cached([cached[i] for i in range(8)])
            latents_fn = lambda: unet_training.sample_cached_latents(batch, vae.config.scaling_factor)  # noqa: E731
            text_fn = lambda drop: cached.text[torch.where(drop, 0, batch["text_ids"])]  # noqa: E731
        else:
            items = [train_set[i] for i in range(8)]
            latents_fn = lambda: vae.encode(torch.stack([i["pixel_values"] for i in items])).latent_dist.sample() * vae.config.scaling_factor  # noqa: E731
            text_fn = lambda drop: text_encoder(clip_training.tokenize(  # noqa: E731
                tokenizer, ["" if d else i["caption"] for i, d in zip(items, drop.tolist())]))[0]
        with torch.no_grad():
            losses.append(unet_training.diffusion_training_loss(unet, noise_scheduler, latents_fn, text_fn, 8, args).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_a_changed_model_gets_a_new_cache(parts, shapes, tmp_path):
    from diffusers import AutoencoderKL

    model, _, _ = parts
    args = unet_training.build_parser().parse_args(["--data", str(shapes), "--model", str(model), "--output-dir",
                                                    str(tmp_path), "--preset", "tiny"])
    tokenizer, text_encoder, vae, _, _, _ = unet_training.load_parts(args, "cpu")
    train_set, _ = trainer.split_dataset(args, 32)
    before = unet_training.cache_path(tmp_path, vae, text_encoder, tokenizer, train_set, 32)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(1e-3)  # a fine-tuned decoder: the latents are the same
    assert unet_training.cache_path(tmp_path, vae, text_encoder, tokenizer, train_set, 32) == before
    with torch.no_grad():
        vae.encoder.conv_out.bias.add_(1e-3)  # a VAE trained one step further
    changed_vae = unet_training.cache_path(tmp_path, vae, text_encoder, tokenizer, train_set, 32)
    assert changed_vae != before
    with torch.no_grad():
        text_encoder.get_parameter("final_layer_norm.bias").add_(1e-3)
    assert unet_training.cache_path(tmp_path, vae, text_encoder, tokenizer, train_set, 32) not in (before, changed_vae)
    assert isinstance(vae, AutoencoderKL)


def test_cache_and_random_crop_do_not_mix(parts, shapes, tmp_path):
    with pytest.raises(ValueError, match="--cache-latents stores one encoding per image"):
        unet_training.main(_unet_args(parts, shapes, tmp_path, 2, "--cache-latents", "--random-crop"))


def test_lora_fine_tuning_saves_weights_the_pipeline_loads(parts, shapes, tmp_path):
    unet_training.main(_unet_args(parts, shapes, tmp_path / "base", 2))
    base = tmp_path / "base" / "model"
    summary = unet_training.main(["--data", str(shapes), "--model", str(base), "--output-dir", str(tmp_path / "lora"),
                                  "--max-steps", "3", "--batch-size", "8", "--lora-rank", "4", "--learning-rate", "1e-2",
                                  "--validation-prompts", "x", *QUIET])
    pipe = LatentDiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    before = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    pipe.load_lora_weights(Path(summary["lora"]).parent)
    after = pipe("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert not np.allclose(before, after)


def _toy_run(tmp_path, losses):
    """trainer.train on a one-parameter model whose loss follows `losses` step by step."""
    parser = argparse.ArgumentParser()
    trainer.add_common_args(parser, lr=0.1, batch_size=1, max_steps=len(losses))
    args = parser.parse_args(["--data", "unused", "--output-dir", str(tmp_path), "--checkpointing-steps", "1000",
                              "--lr-warmup-steps", "0", *QUIET])
    accelerator = trainer.make_accelerator(args, "toy")
    weight = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(weight.parameters(), lr=0.1)
    items = [{"x": torch.ones(1), "skipped": 0}] * (3 * len(losses))
    loader = torch.utils.data.DataLoader(items, batch_size=1, collate_fn=lambda b: {"x": b[0]["x"], "skipped": 0})
    weight, optimizer, loader, scheduler = accelerator.prepare(weight, optimizer, loader,
                                                               trainer.make_lr_scheduler(optimizer, args))
    calls = iter(losses + [1.0] * len(losses))  # finite losses after the scripted ones
    return trainer.train(accelerator, args, [weight], optimizer, scheduler, loader,
                         lambda batch: (weight(batch["x"]).sum() * next(calls), {}))


def test_non_finite_losses_are_skipped_and_counted(tmp_path):
    progress = _toy_run(tmp_path, [1.0, float("nan"), 1.0, float("inf"), 1.0, 1.0, 1.0])
    assert progress.bad_steps == 2 and progress.step == 7


def test_non_finite_gradients_of_a_finite_loss_are_skipped_too(tmp_path):
    """sqrt(0 · w) is 0, and its gradient 0 · ∞ is NaN: the loss looks fine, the step must not be taken."""
    parser = argparse.ArgumentParser()
    trainer.add_common_args(parser, lr=0.1, batch_size=1, max_steps=3)
    args = parser.parse_args(["--data", "unused", "--output-dir", str(tmp_path), "--checkpointing-steps", "1000",
                              "--lr-warmup-steps", "0", *QUIET])
    accelerator = trainer.make_accelerator(args, "toy")
    weight = torch.nn.Linear(1, 1)
    optimizer = torch.optim.SGD(weight.parameters(), lr=0.1)
    items = [{"x": torch.ones(1), "skipped": 0}] * 10
    loader = torch.utils.data.DataLoader(items, batch_size=1, collate_fn=lambda b: {"x": b[0]["x"], "skipped": 0})
    weight, optimizer, loader, scheduler = accelerator.prepare(weight, optimizer, loader,
                                                               trainer.make_lr_scheduler(optimizer, args))
    calls = iter([True, False, False, False, False])  # the first step has NaN gradients

    def step(batch):
        out = weight(batch["x"]).sum()
        return (torch.sqrt(out * 0) if next(calls) else out), {}

    progress = trainer.train(accelerator, args, [weight], optimizer, scheduler, loader, step)
    assert progress.bad_steps == 1 and progress.step == 3
    assert all(torch.isfinite(p).all() for p in weight.parameters())


def test_a_checkpoint_from_before_sittings_were_recorded_resumes_with_its_earlier_steps_unrecorded():
    progress = trainer.Progress()
    progress.load_state_dict({"step": 7000, "epoch": 118, "batches_in_epoch": 5, "bad_steps": 0, "skipped_images": 0})
    progress.begin_sitting(processes=1)
    progress.step = 7010
    progress.update_sitting()
    summary = progress.summary()
    assert summary["steps"] == 7010 and summary["unrecorded_steps"] == 7000
    assert [(s["from_step"], s["to_step"]) for s in summary["sittings"]] == [(7000, 7010)]


def test_ten_non_finite_losses_in_a_row_stop_the_run(tmp_path):
    with pytest.raises(RuntimeError, match="NaN or infinite 10 times in a row"):
        _toy_run(tmp_path, [1.0] + [float("nan")] * 12)


@pytest.mark.parametrize("script", ["train_clip.py", "train_vae.py", "train_unet.py"])
def test_two_processes_under_accelerate_launch(parts, shapes, tmp_path, script):
    model, _, _ = parts
    stage = ["--model", str(model), "--preset", "tiny", "--validation-prompts", "x"] if script == "train_unet.py" \
        else ["--preset", "tiny"]
    command = [*LAUNCH_TWO, str(REPO / "training" / script),
               "--data", str(shapes), *stage, "--output-dir", str(tmp_path), "--max-steps", "2", "--batch-size", "4",
               "--holdout", "8", *QUIET]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es), MULTI_CPU" in result.stdout, result.stdout[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and [s["processes"] for s in summary["sittings"]] == [2]


def test_distributed_contrastive_loss_equals_the_single_process_loss():
    command = [*LAUNCH_TWO, str(REPO / "tests" / "dist_contrastive.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0 and "OK 2 processes" in result.stdout, result.stderr[-3000:]


def test_bf16_with_accumulation_and_checkpointing(parts, shapes, tmp_path):
    summary = unet_training.main(_unet_args(parts, shapes, tmp_path, 2, "--mixed-precision", "bf16",
                                            "--gradient-accumulation-steps", "2", "--gradient-checkpointing"))
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    pipe = LatentDiffusionPipeline.from_pretrained(tmp_path / "model")
    assert all(torch.isfinite(p).all() for p in pipe.unet.parameters())


def test_hard_negative_loss_is_low_when_the_image_matches_its_own_caption_best():
    image = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.0]]), dim=-1)
    own = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0, 0.0]]), dim=-1)
    negatives = [torch.nn.functional.normalize(torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=-1)]
    good = clip_training.hard_negative_loss(image, own, negatives, torch.tensor(10.0))
    bad = clip_training.hard_negative_loss(image, negatives[0][:1], [own], torch.tensor(10.0))
    expected = -torch.log_softmax(10 * torch.cat([own, negatives[0]]) @ image[0], 0)[0]
    assert good == pytest.approx(expected.item(), abs=1e-5) and good < 0.01 < bad
    # no negatives at all (a caption with no colour, shape, size or number word): no term, and a gradient of zeros
    image = image.clone().requires_grad_()
    nothing = clip_training.hard_negative_loss(image, own, [torch.empty(0, 3)], torch.tensor(10.0))
    nothing.backward()
    assert nothing == 0 and torch.equal(image.grad, torch.zeros_like(image))


def test_clip_with_hard_negatives_learns_to_reject_captions_one_word_away(tmp_path):
    data = _single_object_set(tmp_path / "objects")
    summary = clip_training.main(["--data", str(data), "--preset", "tiny", "--output-dir", str(tmp_path / "run"),
                                  "--max-steps", "150", "--batch-size", "64", "--learning-rate", "3e-3",
                                  "--lr-warmup-steps", "10", "--holdout", "96", "--checkpointing-steps", "1000",
                                  "--hard-negatives", "2", *QUIET])
    scores = summary["hard_negatives"]
    # "a red circle" against its 7 recoloured and 5 reshaped versions: chance of beating all 12 is 1/13 (measured
    # 2026-12-03: 0.31)
    assert scores["replace_images"] == 96 and scores["replace"] >= 3 / 13, scores
    assert scores["swap"] is None and scores["swap_images"] == 0  # one colour and one shape: nothing to swap


def test_hard_negatives_drawn_in_loader_workers_are_the_main_process_draws():
    """The loader's workers draw each row's hard negatives (off the training step's critical path) exactly as the
    step would: from the (seed, epoch, row) generator, with the epoch the dataset had when the workers started."""
    from latentdiff.data.loader import item_generator
    from latentdiff.training.clip import CollateWithHardNegatives, draw_hard_negatives

    class Scenes(torch.utils.data.Dataset):
        captions = ["a red circle above a blue square", "two green stars", "a small pink cross on the left",
                    "a yellow circle to the left of a purple diamond"] * 4
        epoch = 0

        def __len__(self):
            return len(self.captions)

        def __getitem__(self, i):
            return {"pixel_values": torch.zeros(3, 2, 2), "caption": self.captions[i], "index": i}

    data, held_out = Scenes(), {("blue", "square")}
    collate = CollateWithHardNegatives(data, 3, 7, held_out)
    loader = torch.utils.data.DataLoader(data, batch_size=5, shuffle=True, num_workers=2, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    by_epoch = {}
    for epoch in (0, 3):
        data.epoch = epoch  # as trainer.train's set_epoch, before the epoch's workers start
        batches = list(loader)
        assert sum(len(b["captions"]) for b in batches) == 16
        for batch in batches:
            generators = [item_generator(7, epoch, int(i)) for i in batch["indices"]]
            assert batch["hard_negatives"] == draw_hard_negatives(batch["captions"], 3, generators, held_out)
            assert all(len(picks) == 3 for picks in batch["hard_negatives"])
            assert not any("blue square" in c for picks in batch["hard_negatives"] for c in picks)
        by_epoch[epoch] = {int(i): n for b in batches for i, n in zip(b["indices"], b["hard_negatives"])}
    assert by_epoch[0] != by_epoch[3]  # the workers saw the new epoch


def test_hard_negatives_refuse_random_flips(tmp_path):
    with pytest.raises(ValueError, match="--hard-negatives cannot go with --random-flip"):
        clip_training.main(["--data", "unused", "--output-dir", str(tmp_path), "--hard-negatives", "2",
                            "--random-flip", *QUIET])


def test_vae_foreground_weight_and_the_round_trip_oracle(shapes, tmp_path):
    x = -torch.ones(1, 3, 8, 8)
    x[..., 3:5, 3:5] = 1  # a white 2 × 2 object on black
    weights = vae_training.foreground_weights(x, 5.0)
    assert weights[0, 0, 3, 3] == 5 and weights[0, 0, 2, 2] == 5 and weights[0, 0, 0, 0] == 1  # edges both sides
    rec = x.clone()
    rec[..., 3:5, 3:5] = -1  # the object vanished: 4 of 64 pixels wrong
    plain = vae_training.reconstruction_loss(rec, x, "l1")
    weighted = vae_training.reconstruction_loss(rec, x, "l1", foreground_weight=5.0)
    assert plain == pytest.approx(2 * 4 / 64) and weighted > 2 * plain
    summary = vae_training.main(["--data", str(shapes), "--preset", "tiny", "--model-dir", str(tmp_path / "m"),
                                 "--output-dir", str(tmp_path / "v"), "--max-steps", "2", "--batch-size", "8",
                                 "--holdout", "8", "--foreground-weight", "5", *QUIET])
    oracle = summary["round_trip_oracle"]
    assert oracle["scenes"] == 8 and oracle["real"]["mean"] == 1.0 and 0 <= oracle["round_trip"]["mean"] <= 1


def test_timestep_bias_draws_the_chosen_timesteps_as_often_as_its_weights_say():
    from argparse import Namespace

    from latentdiff.training.unet import build_parser, check_args, timestep_weights

    args = build_parser().parse_args(["--model", "m", "--data", "d", "--output-dir", "o", "--timestep-bias", "later",
                                      "--timestep-bias-multiplier", "3", "--timestep-bias-portion", "0.3"])
    check_args(args)
    weights = timestep_weights(1000, args)
    assert weights[:700].eq(1).all() and weights[700:].eq(3).all()
    t = torch.multinomial(weights, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert abs((t >= 700).float().mean().item() - 0.9 / 1.6) < 0.015  # 300·3 of 700 + 300·3
    ranged = Namespace(timestep_bias="range", timestep_bias_multiplier=2.0, timestep_bias_portion=0.25,
                       timestep_bias_begin=100, timestep_bias_end=200)
    assert timestep_weights(1000, ranged).sum().item() == 1100
    assert timestep_weights(1000, build_parser().parse_args(["--model", "m", "--data", "d", "--output-dir", "o"])) is None
    for flags, message in ((["--timestep-bias-multiplier", "2"], "needs --timestep-bias earlier, later or range"),
                           (["--timestep-bias", "later", "--timestep-bias-portion", "0"], "must be in \\(0, 1\\]"),
                           (["--timestep-bias", "range", "--timestep-bias-begin", "500", "--timestep-bias-end", "400"],
                            "needs 0 ≤ --timestep-bias-begin < --timestep-bias-end, got 500 and 400")):
        with pytest.raises(ValueError, match=message):
            check_args(build_parser().parse_args(["--model", "m", "--data", "d", "--output-dir", "o", *flags]))


def test_a_later_timestep_bias_trains_on_noisier_latents():
    from argparse import Namespace

    from latentdiff.schedulers import DDPMScheduler
    from latentdiff.training.unet import diffusion_training_loss

    seen = []

    class Recorder(torch.nn.Module):
        def forward(self, x, t, encoder_hidden_states):
            seen.append(t)
            return Namespace(sample=torch.zeros_like(x))

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    args = Namespace(uncond_prob=0.0, noise_offset=0.0, snr_gamma=None, timestep_bias="later",
                     timestep_bias_multiplier=1000.0, timestep_bias_portion=0.1, timestep_bias_begin=0,
                     timestep_bias_end=1000)
    torch.manual_seed(0)
    diffusion_training_loss(Recorder(), scheduler, lambda: torch.zeros(256, 4, 2, 2), lambda drop: torch.zeros(256, 1, 8),
                            256, args)
    assert (seen[0] >= 900).float().mean() > 0.95


def test_snr_floor_weighs_the_noisiest_training_steps_by_their_x0_error():
    from argparse import Namespace

    from latentdiff import diffusion
    from latentdiff.schedulers import DDPMScheduler
    from latentdiff.training.unet import build_parser, check_args, diffusion_training_loss

    seen = []

    class Recorder(torch.nn.Module):  # predicts ε̂ = 0: the loss is the weighted mean of ε²
        def forward(self, x, t, encoder_hidden_states):
            seen.append(t)
            return Namespace(sample=torch.zeros_like(x))

    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012)
    losses = {}
    for floor in (0.0, 1.0):
        args = Namespace(uncond_prob=0.0, noise_offset=0.0, snr_gamma=5.0, snr_floor=floor, timestep_bias="none",
                         timestep_bias_multiplier=1.0)
        torch.manual_seed(0)
        losses[floor] = diffusion_training_loss(Recorder(), scheduler, lambda: torch.zeros(64, 4, 2, 2),
                                                lambda drop: torch.zeros(64, 1, 8), 64, args).item()
    torch.manual_seed(0)
    torch.rand(64), torch.zeros(64, 4, 2, 2)  # the draws before the noise: caption dropout
    noise = torch.randn(64, 4, 2, 2)
    alpha_bar = scheduler.schedule.alpha_bar(seen[1], noise).flatten()
    weights = diffusion.min_snr_weight(alpha_bar, 5.0, "epsilon", 1.0)
    assert losses[1.0] == pytest.approx((noise.pow(2).flatten(1).mean(1) * weights).mean().item(), rel=1e-5)
    assert losses[1.0] > 5 * losses[0.0]  # the draws with SNR < 1 weigh up to 1/SNR
    with pytest.raises(ValueError, match=r"--snr-floor must be in \[0, --snr-gamma\].*got 6"):
        check_args(build_parser().parse_args(["--model", "m", "--data", "d", "--output-dir", "o", "--snr-gamma", "5",
                                              "--snr-floor", "6"]))
