"""Evaluation: our CLIP score and FD against torchmetrics, the oracle's scores, and the job's reports."""

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

from latentdiff.evaluation import metrics as ev
from latentdiff import new_pipeline
from latentdiff.models import pooled
from latentdiff.data.imagefolder import write_imagefolder
from latentdiff.data.shapes import all_first_captions, sample_scene, shapes_rows
from latentdiff.evaluation.job import main as eval_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "tiny"
    new_pipeline("tiny", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "shapes"
    write_imagefolder(path, shapes_rows(24, 32, seed=0))
    return path


def _images(n, seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy())
            for _ in range(n)]


class _Unwrapped(torch.nn.Module):
    """transformers 5 returns output objects from get_*_features; torchmetrics 1.9 expects tensors."""

    def __init__(self, clip):
        super().__init__()
        self.clip, self.config = clip, clip.config

    def get_image_features(self, *args, **kwargs):
        return pooled(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return pooled(self.clip.get_text_features(*args, **kwargs))


def test_clip_score_equals_torchmetrics(model):
    from torchmetrics.multimodal.clip_score import CLIPScore

    judge = ev.Judge(model / "clip")
    images, texts = _images(6), ["a red circle", "two blue stars", "a tiger", "", "🐯 tiger", "a green cross above"]
    ours = ev.clip_score(judge.image_features(images), judge.text_features(texts))
    metric = CLIPScore(model_name_or_path=lambda: (_Unwrapped(judge.model), judge.processor))
    theirs = metric(torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in images]), texts)
    assert ours == pytest.approx(float(theirs), abs=1e-3)


class _JudgeFeatures(torch.nn.Module):
    def __init__(self, judge):
        super().__init__()
        self.judge = judge

    def forward(self, images):  # (N, 3, H, W) uint8, as torchmetrics' FID hands them over
        return self.judge.image_features([Image.fromarray(im.permute(1, 2, 0).cpu().numpy()) for im in images]).double()


def test_fd_equals_torchmetrics_fid_with_the_same_features(model):
    from torchmetrics.image.fid import FrechetInceptionDistance

    judge = ev.Judge(model / "clip")
    real, fake = _images(40, seed=1), [im.rotate(90) for im in _images(40, seed=2)]
    fid = FrechetInceptionDistance(feature=_JudgeFeatures(judge))
    as_uint8 = lambda ims: torch.stack([torch.from_numpy(np.asarray(im)).permute(2, 0, 1) for im in ims])  # noqa: E731
    fid.update(as_uint8(real), real=True)
    fid.update(as_uint8(fake), real=False)
    ours = ev.frechet_distance(judge.image_features(fake), judge.image_features(real))
    assert ours == pytest.approx(float(fid.compute()), rel=1e-3)


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_noise():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(200, 8, generator=g)
    assert abs(ev.frechet_distance(features, features)) < 1e-6
    noise = torch.randn(200, 8, generator=g)
    distances = [ev.frechet_distance(features + s * noise, features) for s in (0.1, 0.3, 0.6, 1.0)]
    assert distances == sorted(distances) and distances[0] > 0
    with pytest.raises(ValueError, match="at least 2 samples"):
        ev.frechet_distance(features[:1], features)


def test_retrieval_accuracy_counts_the_query_label_among_the_top_k():
    basis = torch.eye(4)
    # query 0 is closest to candidate 0 (its own); query 1 is closest to candidate 2 and next to its own 1;
    # query 2 is closest to candidate 3, which is labelled alike ("b"), so it counts at top 1
    queries = torch.nn.functional.normalize(torch.stack([basis[0], basis[2] + 0.5 * basis[1], basis[3]]), dim=-1)
    result = ev.retrieval_accuracy(queries, basis, ["a", "b", "b"], ["a", "b", "c", "b"], ks=(1, 2))
    assert result == {"top1": pytest.approx(2 / 3), "top2": 1.0}
    assert ev.retrieval_accuracy(queries, basis, ["a", "c", "c"], ["a", "b", "c", "b"], ks=(1,)) == {
        "top1": pytest.approx(2 / 3)}
    with pytest.raises(ValueError, match="retrieval needs queries and candidates"):
        ev.retrieval_accuracy(queries[:0], basis, [], ["a", "b", "c", "b"])


def test_oracle_scores_real_renders_right_and_noise_near_zero():
    rng = random.Random(0)
    scenes = [sample_scene(rng, 64) for _ in range(300)]
    real = ev.oracle_accuracy([ev.oracle_scores(s.to_dict(), s.render(64)) for s in scenes])
    assert set(real) == {*ev.ORACLE_TASKS, "mean"} and min(real.values()) >= 0.99, real
    noise = ev.oracle_accuracy([ev.oracle_scores(s.to_dict(), im) for s, im in zip(scenes, _images(300, size=64))])
    assert noise["mean"] <= 0.1, noise


def test_prompts_from_files_and_folders(tmp_path, prompts):
    (tmp_path / "p.txt").write_text("a tiger\n\na red apple\n")
    (tmp_path / "p.jsonl").write_text('{"text": "a tiger"}\n{"text": ["a car", "an automobile"]}\n')
    (tmp_path / "p.csv").write_text("text,other\na tiger,1\n")
    assert [p.text for p in ev.load_prompts(tmp_path / "p.txt")[0]] == ["a tiger", "a red apple"]
    assert [p.text for p in ev.load_prompts(tmp_path / "p.jsonl")[0]] == ["a tiger", "a car"]
    assert [p.text for p in ev.load_prompts(tmp_path / "p.csv")[0]] == ["a tiger"]
    from_folder, dataset = ev.load_prompts(prompts)
    assert len(from_folder) == 24 and from_folder[0].scene["objects"] and dataset is not None
    (tmp_path / "bad.csv").write_text("caption\nx\n")
    with pytest.raises(ValueError, match=r"has no 'text' column; its columns are \['caption'\]"):
        ev.load_prompts(tmp_path / "bad.csv")


def _run(model, prompts, out, *extra, max_prompts=8):
    return ["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--guidance-scales", "1,7.5",
            "--steps", "3", "--images-per-prompt", "2", "--max-prompts", str(max_prompts), "--batch-size", "4", *extra]


def test_eval_of_a_tiny_model_on_8_prompts_writes_every_output(model, prompts, tmp_path):
    report = eval_main(_run(model, prompts, tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid-s1.png", "grid-s7.5.png", "prompts.csv", "report.csv",
                                                          "report.json", "sweep.png"]
    assert [r["guidance_scale"] for r in report["scales"]] == [1.0, 7.5]
    for row in report["scales"]:
        assert row["images"] == 16 and row["fd_generated"] == 16 and row["fd_reference"] == 24
        assert set(row["oracle"]) >= {"mean"} and row["seconds"] > 0 and row["image_size"] == 32
        # the candidates are every distinct prompt of the data set, not only the 8 evaluated, and every caption
        # the shapes world has
        everything = {p.text for p in ev.load_prompts(prompts)[0]} | set(all_first_captions())
        assert row["retrieval_candidates"] == len(everything) > 8000
        assert 0 <= row["retrieval_top1"] <= row["retrieval_top5"] <= 1
        for key in ("clip_score", "retrieval_top1", "retrieval_top5"):  # 95 % intervals hold their means
            low, high = row[f"{key}_ci"]
            assert low <= row[key] <= high
        assert set(row["oracle_ci"]) == set(row["oracle"])
    judged = report["judge_on_reference"]
    assert judged["images"] == 24 and 0 <= judged["text_to_image_top1"] <= judged["text_to_image_top5"] <= 1
    import csv

    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    assert [float(r["guidance_scale"]) for r in rows] == [1.0, 7.5] and rows[0]["fd"] and rows[0]["oracle_mean"]
    assert rows[0]["retrieval_top5"]
    assert Image.open(tmp_path / "sweep.png").size[0] > 300
    # 16 images, 2 per prompt side by side, 32 px shown 4x as 128 px tiles, each over a label strip of 14 px a line
    width, height = Image.open(tmp_path / "grid-s7.5.png").size
    assert width == 2 * 128 + 2 and (height - 7 * 2) % 8 == 0 and (height - 7 * 2) // 8 - 128 in (14, 28, 42, 56)
    per_image = list(csv.DictReader((tmp_path / "prompts.csv").open()))
    assert len(per_image) == 32 and {"prompt", "clip_score", "rank", "oracle_count"} <= set(per_image[0])
    assert all(int(r["rank"]) >= 1 for r in per_image)
    top5 = sum(int(r["rank"]) <= 5 for r in per_image if r["guidance_scale"] == "7.5") / 16
    assert top5 == pytest.approx(report["scales"][1]["retrieval_top5"])
    assert json.loads((tmp_path / "report.json").read_text())["judge"].endswith("clip")


def test_reduced_precision_generation_is_reported_and_close_to_fp32(model, prompts, tmp_path):
    fp32 = eval_main(_run(model, prompts, tmp_path / "fp32", max_prompts=4))
    bf16 = eval_main(_run(model, prompts, tmp_path / "bf16", "--dtype", "bf16", max_prompts=4))
    assert fp32["dtype"] == "fp32" and bf16["dtype"] == "bf16"
    for a, b in zip(fp32["scales"], bf16["scales"]):
        assert a["clip_score"] != b["clip_score"] and abs(a["clip_score"] - b["clip_score"]) < 0.05 * a["clip_score"]


def test_guidance_rescale_changes_only_the_guided_images_and_is_reported(model, prompts, tmp_path):
    plain = eval_main(_run(model, prompts, tmp_path / "plain", max_prompts=4))
    rescaled = eval_main(_run(model, prompts, tmp_path / "rescaled", "--guidance-rescale", "0.7", max_prompts=4))
    assert plain["guidance_rescale"] == 0 and rescaled["guidance_rescale"] == 0.7
    assert rescaled["scales"][0]["clip_score"] == pytest.approx(plain["scales"][0]["clip_score"], abs=1e-4)  # at 1
    assert abs(rescaled["scales"][1]["clip_score"] - plain["scales"][1]["clip_score"]) > 1e-3  # at 7.5


def test_a_guidance_interval_changes_only_the_guided_images_and_is_reported(model, prompts, tmp_path):
    plain = eval_main(_run(model, prompts, tmp_path / "plain", max_prompts=4))
    late = eval_main(_run(model, prompts, tmp_path / "late", "--guidance-interval", "0.5", "1", max_prompts=4))
    assert plain["guidance_interval"] == [0, 1] and late["guidance_interval"] == [0.5, 1]
    assert late["scales"][0]["clip_score"] == pytest.approx(plain["scales"][0]["clip_score"], abs=1e-4)  # at 1
    assert abs(late["scales"][1]["clip_score"] - plain["scales"][1]["clip_score"]) > 1e-3  # at 7.5


def test_reference_images_can_be_any_image_folder(model, tmp_path):
    (tmp_path / "prompts.txt").write_text("a tiger\na red apple\n")
    reference = tmp_path / "real"
    reference.mkdir()
    for i, image in enumerate(_images(5, seed=9)):
        image.save(reference / f"{i}.png")
    report = eval_main(["--model", str(model), "--prompts", str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "r"),
                        "--reference", str(reference), "--guidance-scales", "3", "--steps", "2",
                        "--images-per-prompt", "2"])
    row, = report["scales"]
    assert row["fd_reference"] == 5 and row["fd_generated"] == 4 and "oracle" not in row
    assert row["retrieval_candidates"] == 2 and "judge_on_reference" not in report  # no captions to retrieve


def test_sampled_prompts_spread_over_the_list_and_candidates_come_from_a_file(model, prompts, tmp_path):
    from latentdiff.evaluation.job import subsample

    assert subsample(list(range(10)), 4) == [0, 3, 6, 9] and subsample([1, 2], 5) == [1, 2]
    texts = [p.text for p in ev.load_prompts(prompts)[0]]
    chosen = subsample(texts, 3)
    (tmp_path / "names.txt").write_text("\n".join(["a tiger", "a red apple", *chosen]) + "\n")
    report = eval_main(_run(model, prompts, tmp_path / "r", "--sample-prompts", "3", "--candidates",
                            str(tmp_path / "names.txt"), max_prompts=24))
    row = report["scales"][0]
    assert report["prompts"] == 3 and row["images"] == 6 and row["retrieval_candidates"] == 2 + len(set(chosen))
    (tmp_path / "names.txt").write_text("a tiger\n")
    with pytest.raises(ValueError, match=f"--candidates .* must hold every evaluated prompt; it lacks 3, e.g. "):
        eval_main(_run(model, prompts, tmp_path / "r", "--sample-prompts", "3", "--candidates",
                       str(tmp_path / "names.txt"), max_prompts=24))


def test_the_judge_is_scored_on_distinct_captions():
    from latentdiff.evaluation.job import judge_reference

    class Judge:  # texts embed as one-hot vectors of their first letter
        def text_features(self, texts):
            return torch.nn.functional.one_hot(torch.tensor([ord(t[0]) - ord("a") for t in texts]), 3).float()

    # five images captioned "a", one captioned "b" that looks a bit more like "a" than like "b"
    images = torch.tensor([[1.0, 0, 0]] * 5 + [[0.8, 0.6, 0]])
    result = judge_reference(Judge(), images, ["a"] * 5 + ["b"])
    assert result["images"] == 6 and result["distinct_captions"] == 2
    # image→text: the "b" image ranks "a" first and "b" second (a repeated "a" must not push "b" out of the top 5)
    assert result["image_to_text_top1"] == pytest.approx(5 / 6) and result["image_to_text_top5"] == 1.0
    # text→image: each distinct caption queries once; "b" is nearer its own image than any "a" image
    assert result["text_to_image_top1"] == 1.0


@pytest.mark.parametrize("count", [7, 1], ids=["uneven-split", "one-rank-idle"])
def test_two_processes_give_the_same_report(model, prompts, tmp_path, count):
    single = eval_main(_run(model, prompts, tmp_path / "one", max_prompts=count))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "training" / "evaluate.py"), *_run(model, prompts, tmp_path / "two", max_prompts=count)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    double = json.loads((tmp_path / "two" / "report.json").read_text())
    assert double["processes"] == 2 and single["processes"] == 1 and len(single["scales"]) == len(double["scales"])
    for a, b in zip(single["scales"], double["scales"]):  # equal up to float32 round-off of other batch shapes
        assert a["images"] == b["images"] == 2 * count
        # (images are stored as 8-bit pixels, where round-off can flip a level: 1e-4, not float32's 1e-7)
        assert a["clip_score"] == pytest.approx(b["clip_score"], rel=1e-4)
        assert a["fd"] == pytest.approx(b["fd"], rel=1e-3) and a["oracle"] == b["oracle"]
        assert a["retrieval_top5"] == b["retrieval_top5"]


def test_bad_eval_arguments_are_named(model, prompts, tmp_path, capsys):
    from latentdiff.cli import main

    assert main(["eval", *_run(model, prompts, tmp_path)[:-10], "--guidance-scales", "1,x"]) == 2
    assert "--guidance-scales must be comma-separated finite numbers ≥ 0, got '1,x'" in capsys.readouterr().err
    assert main(["eval", *_run(model, prompts, tmp_path), "--guidance-rescale", "1.5"]) == 2
    assert "--guidance-rescale must be in [0, 1], got 1.5" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path)]) == 2
    assert "prompts must be a .txt, .jsonl or .csv file or a data set folder" in capsys.readouterr().err


def test_an_open_clip_model_with_a_local_checkpoint_can_judge(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    (config_dir / "tiny-judge.json").write_text(json.dumps({
        "embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}))
    open_clip.add_model_config(config_dir)
    model = open_clip.create_model("tiny-judge")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "judge.safetensors")
    judge = ev.Judge(f"open_clip:tiny-judge:{tmp_path / 'judge.safetensors'}")
    images = judge.image_features(_images(3))
    texts = judge.text_features(["a tiger", "a red apple " * 40, ""])  # the long one is truncated
    assert images.shape == texts.shape == (3, 32)
    long_tokens = open_clip.get_tokenizer("tiny-judge")(["a red apple " * 40])
    assert long_tokens[0, -1] == 49407, "open_clip's truncation keeps end-of-text"
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    with torch.no_grad():  # the same weights the checkpoint holds
        direct = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("tiny-judge")(["a tiger"])), dim=-1)
    torch.testing.assert_close(texts[:1], direct)


def test_inception_fid_needs_a_weights_file(model, prompts, tmp_path, capsys):
    from latentdiff.cli import main

    assert main(["eval", *_run(model, prompts, tmp_path), "--inception-weights", str(tmp_path / "missing.pth")]) == 2
    assert "--inception-weights must be an existing weights file" in capsys.readouterr().err


def test_seen_and_unseen_prompts_are_reported_apart_with_intervals_and_diversity(model, tmp_path):
    import csv

    from latentdiff.cli import main

    data = tmp_path / "held"
    assert main(["data", "shapes", "--n", "30", "--size", "32", "--holdout", "red circle", "--unseen-prompts", "6",
                 "--out", str(data)]) == 0
    report = eval_main(["--model", str(model), "--prompts", str(data), "--out", str(tmp_path / "r"),
                        "--guidance-scales", "2", "--steps", "2", "--images-per-prompt", "2", "--max-prompts", "4",
                        "--batch-size", "8", "--diversity", "2", "--diversity-seeds", "3", "--bootstrap", "200"])
    assert report["groups"] == {"seen": 4, "unseen": 4}
    row, = report["scales"]
    assert set(row["groups"]) == {"seen", "unseen"} and row["images"] == 16
    assert row["groups"]["seen"]["images"] == row["groups"]["unseen"]["images"] == 8
    assert row["fd_generated"] == 8  # the reference images show seen prompts only
    for group in row["groups"].values():
        assert set(group["oracle"]) >= {"mean"} and all(len(ci) == 2 for ci in group["oracle_ci"].values())
    assert row["diversity"]["prompts"] == 2 and all(1 <= n <= 3 for n in row["diversity"]["distinct_layouts"])
    per_image = list(csv.DictReader((tmp_path / "r" / "prompts.csv").open()))
    assert sorted({r["group"] for r in per_image}) == ["seen", "unseen"]
    unseen_texts = {r["prompt"] for r in per_image if r["group"] == "unseen"}
    assert all(("red circle" in t) or ("circle in red" in t) or ("red circles" in t) for t in unseen_texts)
    groups = [r["group"] for r in csv.DictReader((tmp_path / "r" / "report.csv").open())]
    assert groups == ["all", "seen", "unseen"]


def test_a_prompt_file_says_why_there_is_no_fd_and_warns_about_few_candidates(model, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a tiger\na red apple\n")
    report = eval_main(["--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "r"),
                        "--guidance-scales", "1,3", "--steps", "2", "--images-per-prompt", "1"])
    out = capsys.readouterr().out
    assert "FD not computed: no reference images" in out and "pass --reference" in report["fd_note"]
    assert "ranks each image among only 2 candidate texts" in out
    assert all("fd" not in row for row in report["scales"])


def test_own_ranks_agree_with_top_k_retrieval():
    from latentdiff.evaluation.job import own_ranks

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(50, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=-1)
    own = torch.randint(0, 30, (50,), generator=g).tolist()
    ranks = own_ranks(images, texts, own)
    expected = ev.retrieval_accuracy(images, texts, own, list(range(30)))
    assert (ranks <= 1).mean() == pytest.approx(expected["top1"]) and (ranks <= 5).mean() == pytest.approx(expected["top5"])


def test_bootstrap_over_prompts_widens_the_interval_of_repeated_images():
    rng = np.random.default_rng(1)
    per_prompt = rng.random(30)
    values = np.repeat(per_prompt, 4)  # four identical images of each of 30 prompts
    naive = ev.bootstrap_interval(lambda i: values[i].mean(), len(values))
    clustered = ev.bootstrap_interval(lambda i: values[i].mean(), len(values), clusters=np.repeat(np.arange(30), 4))
    assert (clustered[1] - clustered[0]) > 1.5 * (naive[1] - naive[0])


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_samples():
    rng = np.random.default_rng(0)
    small, large = rng.random(20), rng.random(2000)
    a = ev.bootstrap_interval(lambda i: small[i].mean(), len(small))
    b = ev.bootstrap_interval(lambda i: large[i].mean(), len(large))
    assert a[0] < small.mean() < a[1] and b[0] < large.mean() < b[1] and (b[1] - b[0]) < (a[1] - a[0]) / 5
    assert ev.bootstrap_interval(lambda i: 0.0, 1) is None


def test_a_model_without_a_judge_is_scored_by_the_oracle_alone(model, prompts, tmp_path, capsys):
    from latentdiff.cli import main

    assert main(["export", str(model), "--out", str(tmp_path / "nojudge"), "--no-clip"]) == 0
    assert not (tmp_path / "nojudge" / "clip").exists()
    report = eval_main(_run(tmp_path / "nojudge", prompts, tmp_path / "r", max_prompts=2))
    assert "no judge" in capsys.readouterr().out and report["judge"] is None
    for row in report["scales"]:
        assert "clip_score" not in row and "fd" not in row and "retrieval_top1" not in row
        assert set(row["oracle"]) >= {"mean"}
    (tmp_path / "p.txt").write_text("a tiger\n")
    with pytest.raises(ValueError, match="--judge: the model folder .* has no clip/ to judge with"):
        eval_main(_run(tmp_path / "nojudge", tmp_path / "p.txt", tmp_path / "r2", max_prompts=1))


class _ReadsOneCaption:
    """A stand-in pipeline whose U-Net denoises exactly under one caption (`favourite`) and is 0.1 off under any
    other: latents are all zero, so ε = x_t / √(1 − ᾱ_t) is known without the noise."""

    def __init__(self, favourite: str):
        from types import SimpleNamespace

        from latentdiff.schedulers import DDPMScheduler

        self.favourite, self._execution_device = favourite, "cpu"
        self.scheduler = DDPMScheduler()
        zero = SimpleNamespace(latent_dist=SimpleNamespace(mean=torch.zeros(1, 4, 4, 4)))
        self.vae = SimpleNamespace(encode=lambda x: zero, dtype=torch.float32,
                                   config=SimpleNamespace(scaling_factor=1.0))
        schedule = self.scheduler.schedule

        def unet(x, t, encoder_hidden_states):
            eps = x / (1 - schedule.alpha_bar(t, x)).sqrt()
            return SimpleNamespace(sample=eps + 0.1 * encoder_hidden_states[:, :1, :1, None])

        self.unet = unet
        self.unet.dtype = torch.float32

    def encode_prompt(self, texts, device, n, guided):
        return torch.tensor([[[0.0 if t == self.favourite else 1.0]] for t in texts]), None


def test_the_diffusion_classifier_picks_the_caption_the_model_denoises_best():
    from latentdiff.data.shapes import hard_negatives
    from latentdiff.evaluation.diffusion_classifier import hard_negative_accuracy

    caption = "a red circle above a blue square"
    images = torch.zeros(1, 3, 8, 8)
    right = hard_negative_accuracy(_ReadsOneCaption(caption), images, [caption], draws=4)
    assert right == {"swap": 1.0, "opposite": 1.0, "all": 1.0, "swap_images": 1, "opposite_images": 1,
                     "all_images": 1}
    turned = hard_negatives(caption)["opposite"][0]  # "a red circle below a blue square"
    wrong = hard_negative_accuracy(_ReadsOneCaption(turned), images, [caption], draws=4)
    assert wrong["opposite"] == 0.0 and wrong["all"] == 0.0
    # per task: a model that turns positions round but not relations is told apart from one that does both
    caption_tasks = ["a small red circle on the left", caption]
    reads = _ReadsOneCaption(caption)
    split = hard_negative_accuracy(reads, torch.zeros(2, 3, 8, 8), caption_tasks, draws=4, tasks=["single", "relation"])
    assert split["by_task"]["relation"]["opposite"] == 1.0 and split["by_task"]["single"]["opposite"] == 0.0
    assert split["by_task"]["single"]["opposite_images"] == 1 and split["opposite"] == 0.5
    # a caption with no negative of these kinds ("two red circles": one colour, no relation) is not counted
    assert hard_negative_accuracy(_ReadsOneCaption(""), images, ["two red circles"], draws=4)["all_images"] == 0


def test_hard_negatives_run_on_a_shapes_set_with_held_out_pairs_and_are_refused_elsewhere(model, prompts, tmp_path):
    from latentdiff.cli import main

    data = tmp_path / "held"
    assert main(["data", "shapes", "--n", "20", "--size", "32", "--holdout", "red circle", "--unseen-prompts", "6",
                 "--out", str(data)]) == 0
    report = eval_main(["--model", str(model), "--prompts", str(data), "--out", str(tmp_path / "r"),
                        "--guidance-scales", "1", "--steps", "2", "--max-prompts", "2", "--hard-negatives", "5"])
    for group in ("seen", "unseen"):
        result = report["hard_negatives"][group]
        assert 0 < result["all_images"] <= 5 and all(v is None or 0 <= v <= 1 for k, v in result.items()
                                                      if not k.endswith("_images") and k != "by_task")
        assert sum(r["all_images"] for r in result["by_task"].values()) == result["all_images"]
    with pytest.raises(ValueError, match="--hard-negatives needs a shapes data set with held-out pairs"):
        eval_main(["--model", str(model), "--prompts", str(prompts), "--out", str(tmp_path / "x"),
                   "--hard-negatives", "5"])
