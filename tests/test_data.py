"""Built-in data sets (shapes, emoji), the oracle that reads shapes back, and the one training-data loader."""

import json
import os
import random
import re
from collections import Counter

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from latentdiff.cli import main
from latentdiff.data import emoji as emoji_data
from latentdiff.data.imagefolder import write_imagefolder
from latentdiff.data.loader import ImageCaptionDataset, collate, open_dataset, preprocess
from latentdiff.data.oracle import read_scene, relation_between, robustness
from latentdiff.data.shapes import (BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES, Scene, sample_scene, shapes_rows)


def _rows(n, size=64, seed=0):
    return list(shapes_rows(n, size, seed))


# Shapes ----------------------------------------------------------------------------------------------------------

def test_shapes_cover_the_required_vocabulary():
    scenes = [meta["scene"] for _, meta in _rows(500)]
    objects = [o for s in scenes for o in s["objects"]]
    assert len(SHAPES) >= 5 and len(COLOURS) >= 8 and len(SIZES) == 3 and len(POSITIONS) == 5
    assert {o["shape"] for o in objects} == set(SHAPES) and {o["colour"] for o in objects} == set(COLOURS)
    assert {o["size"] for o in objects} == set(SIZES) and {o["position"] for o in objects} == set(POSITIONS)
    assert {len(s["objects"]) for s in scenes} == {1, 2, 3}
    assert {s["relation"] for s in scenes if s["task"] == "relation"} == {"above", "below", "left of", "right of"}
    assert {s["background"] for s in scenes} == set(BACKGROUNDS)


def test_captions_state_the_scene_in_several_phrasings():
    rng = random.Random(1)
    relation = next(s for s in (sample_scene(rng, 64) for _ in range(50)) if s.task == "relation")
    a, b = relation.objects
    text = relation.captions()
    assert len(text) >= 3 and len(set(text)) == len(text)
    assert f"{a.colour} {a.shape}" in text[0] and f"{b.colour} {b.shape}" in text[0]
    count = sample_scene(random.Random(2), 64, task="count")
    assert count.captions()[0].split()[0] in ("two", "three")
    from latentdiff.data.shapes import POSITION_PHRASES

    single = sample_scene(random.Random(0), 64, task="single")
    o = single.objects[0]
    assert single.captions()[0] in (f"a {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}",
                                    f"an {o.size} {o.colour} {o.shape} {POSITION_PHRASES[o.position]}")


def test_shapes_are_deterministic_for_a_seed_and_match_their_metadata():
    first, again, other = _rows(20, seed=3), _rows(20, seed=3), _rows(20, seed=4)
    assert [m for _, m in first] == [m for _, m in again] and [m for _, m in first] != [m for _, m in other]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (x, _), (y, _) in zip(first, again))
    for image, meta in first:  # the stored scene redraws the stored image exactly
        assert np.array_equal(np.asarray(Scene.from_dict(meta["scene"]).render(64)), np.asarray(image))


@pytest.mark.parametrize("size", [16, 512])
def test_any_square_size_from_16_to_512(size):
    (image, meta), = _rows(1, size=size)
    assert image.size == (size, size) and meta["scene"]["objects"]


@pytest.mark.parametrize("size", [16, 20, 24, 32, 40, 48])
def test_small_sizes_place_every_object_apart_and_inside(size):
    """Placement ends for every scene (it once could loop forever at ≤ 32 px) and never overlaps or spills."""
    for _, meta in _rows(1500, size=size):
        boxes = [o["box"] for o in meta["scene"]["objects"]]
        assert all(0 <= x0 <= x1 < size and 0 <= y0 <= y1 < size for x0, y0, x1, y1 in boxes)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1:]:
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1], (a, b)


def test_captions_are_spelled_right():
    text = " ".join(c for _, meta in _rows(600) for c in meta["text"])
    assert "crosss" not in text and " a orange" not in text and " a a" not in text
    assert "crosses" in text and "to the left of" in text and "an orange" in text


@pytest.mark.parametrize("n,size,message", [(0, 64, "n must be a positive integer"),
                                            (5, 15, "size must be an integer from 16 to 512, got 15"),
                                            (5, 513, "size must be an integer from 16 to 512, got 513")])
def test_bad_shapes_arguments_are_named(n, size, message):
    with pytest.raises(ValueError, match=message):
        _rows(n, size=size)


# Oracle ----------------------------------------------------------------------------------------------------------

def test_oracle_reads_back_500_scenes():
    """Shape, colour, count and position (and relations) recovered from the PNG pixels; ≥ 99 % each."""
    rng, hits, relations = random.Random(0), Counter(), []
    for _ in range(500):
        scene = sample_scene(rng, 64)
        png = Image.fromarray(np.asarray(scene.render(64)))
        read = read_scene(png)
        truth = sorted(scene.objects, key=lambda o: (o.box[1], o.box[0]))
        hits["count"] += len(read.objects) == len(truth)
        pairs = list(zip(read.objects, truth)) if len(read.objects) == len(truth) else []
        for attribute in ("shape", "colour", "position", "size"):
            hits[attribute] += bool(pairs) and all(getattr(r, attribute) == getattr(t, attribute) for r, t in pairs)
        hits["background"] += read.background == scene.background
        if scene.task == "relation":
            subject = [o for o in read.objects if o.colour == scene.objects[0].colour]
            reference = [o for o in read.objects if o.colour == scene.objects[1].colour]
            relations.append(bool(subject and reference) and relation_between(subject[0], reference[0]) == scene.relation)
    accuracy = {k: v / 500 for k, v in hits.items()}
    assert min(accuracy.values()) >= 0.99, accuracy
    assert np.mean(relations) >= 0.99


@pytest.mark.parametrize("damage", ["blur", "jpeg", "antialias"])
def test_oracle_reads_blurred_and_antialiased_scenes(damage):
    """Generated images are soft: at 64 px the oracle must still count, colour and place objects, and mostly
    name their shapes (per scene, all objects right)."""
    accuracy = robustness(150, 64, damage)
    assert accuracy["count"] >= 0.98 and accuracy["colour"] >= 0.98 and accuracy["position"] >= 0.95, accuracy
    assert accuracy["shape"] >= 0.9, accuracy


def test_oracle_splits_touching_objects_of_different_colours():
    image = Image.new("RGB", (64, 64), BACKGROUNDS["white"])
    from PIL import ImageDraw

    from latentdiff.data.shapes import draw_shape

    draw = ImageDraw.Draw(image)
    draw_shape(draw, "square", (10, 20, 29, 39), COLOURS["red"])
    draw_shape(draw, "circle", (30, 20, 49, 39), COLOURS["blue"])  # touching the square
    read = read_scene(image.filter(__import__("PIL.ImageFilter", fromlist=["x"]).GaussianBlur(0.7)))
    assert sorted((o.colour, o.shape) for o in read.objects) == [("blue", "circle"), ("red", "square")]


def test_oracle_sees_nothing_on_an_empty_background_and_tolerates_noise():
    blank = Image.new("RGB", (64, 64), BACKGROUNDS["gray"])
    assert read_scene(blank).objects == [] and read_scene(blank).background == "gray"
    scene = sample_scene(random.Random(5), 64, task="single")
    noisy = np.asarray(scene.render(64), dtype=np.float32) + np.random.default_rng(0).normal(0, 12, (64, 64, 3))
    read = read_scene(np.clip(noisy, 0, 255).astype(np.uint8))
    (obj,) = read.objects
    truth = scene.objects[0]
    assert (obj.shape, obj.colour, obj.position) == (truth.shape, truth.colour, truth.position)


# Emoji -----------------------------------------------------------------------------------------------------------

def _font_or_skip():
    try:
        return emoji_data.find_font()
    except FileNotFoundError:
        if os.environ.get("CI"):  # README's test command installs it (tools/system-deps.sh): CI must not skip
            pytest.fail(f"no colour emoji font installed (package {emoji_data.FONT_PACKAGE}) under CI")
        pytest.skip(f"no colour emoji font installed (package {emoji_data.FONT_PACKAGE}); tools/system-deps.sh "
                    "installs it")


def test_emoji_set_renders_thousands_with_their_names(tmp_path):
    _font_or_skip()
    skipped = []

    def rows():
        skipped.extend((yield from emoji_data.render_emoji_set(image_size=16)))

    n = write_imagefolder(tmp_path / "emoji", rows())
    assert n >= 3000, f"only {n} emoji rendered ({len(skipped)} skipped)"
    metadata = [json.loads(line) for line in (tmp_path / "emoji" / "metadata.jsonl").read_text().splitlines()]
    by_emoji = {m["emoji"]: m["text"] for m in metadata}
    assert "a tiger" in by_emoji["🐅"] and "a tiger face" in by_emoji["🐯"]
    assert by_emoji["🇯🇵"][0] == "flag of Japan"
    assert "waving hand, medium skin tone" in by_emoji["👋🏽"]
    assert len(skipped) + n == len(emoji_data.emoji_entries())


def test_emoji_options_are_stated_in_the_captions():
    _font_or_skip()
    rows = emoji_data.render_emoji_set(image_size=32, background="random", random_placement=True, seed=1)
    for image, meta in (next(rows) for _ in range(20)):
        assert all(f"{meta['size']} " in c and f"on {'an' if meta['background'][0] in 'aeiou' else 'a'} "
                   f"{meta['background']} background" in c for c in meta["text"])
        x0, y0, x1, y1 = meta["box"]
        corner = image.getpixel((0, 0)) if x0 > 0 or y0 > 0 else image.getpixel((31, 31))
        colour = {**emoji_data.BACKGROUND_COLOURS}[meta["background"]]
        assert corner == colour


def test_emoji_flags_and_articles():
    entries = {e.emoji: e for e in emoji_data.emoji_entries()}
    assert entries["🏴‍☠️"].is_flag is False and emoji_data.captions(entries["🏴‍☠️"])[0] == "a pirate flag"
    assert entries["🏴󠁧󠁢󠁥󠁮󠁧󠁿"].is_flag and emoji_data.captions(entries["🏴󠁧󠁢󠁥󠁮󠁧󠁿"])[0] == "flag of England"
    assert emoji_data.captions(entries["🚌"])[0] == "a bus" and emoji_data.captions(entries["🐙"])[0] == "an octopus"
    assert emoji_data.captions(entries["🎎"])[0] == "Japanese dolls"


def test_missing_font_names_the_package(monkeypatch):
    monkeypatch.setattr(emoji_data, "FONT_CANDIDATES", ())
    monkeypatch.setattr(emoji_data.shutil, "which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="fonts-noto-color-emoji"):
        emoji_data.find_font()
    with pytest.raises(ValueError, match="background must be 'random' or one of"):
        next(emoji_data.render_emoji_set(background="plaid"))


# Loader ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "shapes"
    write_imagefolder(out, shapes_rows(12, 32, seed=0))
    return out


def test_imagefolder_loads_with_plain_datasets(shapes_dir):
    ds = datasets.load_dataset("imagefolder", data_dir=str(shapes_dir), split="train")
    assert len(ds) == 12 and ds[0]["image"].size == (32, 32) and isinstance(ds[0]["text"], list)
    assert ds[0]["scene"]["objects"][0]["shape"] in SHAPES


def test_loader_gives_pixels_in_minus_one_one_and_a_caption(shapes_dir):
    ds = ImageCaptionDataset(open_dataset(shapes_dir), resolution=16)
    batch = collate([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["skipped"] == 0
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["pixel_values"].min() < -0.5 or batch["pixel_values"].max() > 0.5
    meta = [json.loads(line) for line in (shapes_dir / "metadata.jsonl").read_text().splitlines()]
    assert all(c in m["text"] for c, m in zip(batch["captions"], meta))


def test_several_captions_are_drawn_at_random(shapes_dir):
    ds = ImageCaptionDataset(open_dataset(shapes_dir), resolution=16)
    seen = set()
    for epoch in range(100):
        ds.set_epoch(epoch)
        seen.add(ds.caption(0))
        assert ds.caption(0) == ds.caption(0), "one draw per row and epoch, whatever else used the RNG"
    assert seen == set(ds.captions[0])


def test_save_to_disk_folders_load_too(shapes_dir, tmp_path):
    ds = open_dataset(shapes_dir).rename_column("text", "caption")
    ds.save_to_disk(tmp_path / "flat")
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(tmp_path / "dict")
    assert len(ImageCaptionDataset(open_dataset(tmp_path / "flat"), resolution=16)) == 12
    assert len(open_dataset(tmp_path / "dict", split="test")) == 2
    with pytest.raises(ValueError, match=r"split 'valid' is not in .*; its splits are \['test', 'train'\]"):
        open_dataset(tmp_path / "dict", split="valid")


def test_bad_columns_list_the_available_ones(shapes_dir):
    ds = open_dataset(shapes_dir)
    with pytest.raises(ValueError, match=r"caption_column 'prompt_text' is not a column .* \['image', 'text', 'scene'\]"):
        ImageCaptionDataset(ds, resolution=16, caption_column="prompt_text")
    with pytest.raises(ValueError, match=r"image_column 'photo' is not a column"):
        ImageCaptionDataset(ds, resolution=16, image_column="photo")


def test_missing_caption_names_the_row_and_empty_caption_is_allowed(tmp_path):
    rows = [(Image.new("RGB", (8, 8)), {"text": "a"}), (Image.new("RGB", (8, 8)), {"text": ""})]
    write_imagefolder(tmp_path / "ok", rows)
    assert ImageCaptionDataset(open_dataset(tmp_path / "ok"), resolution=8)[1]["caption"] == ""
    rows.append((Image.new("RGB", (8, 8)), {"text": None}))
    write_imagefolder(tmp_path / "bad", rows)
    with pytest.raises(ValueError, match="row 2 has no caption in column 'text'"):
        ImageCaptionDataset(open_dataset(tmp_path / "bad"), resolution=8)


def test_a_corrupt_image_is_skipped_and_counted(shapes_dir, tmp_path, caplog):
    import shutil

    folder = tmp_path / "corrupt"
    shutil.copytree(shapes_dir, folder)
    (folder / "000003.png").write_bytes(b"\x89PNG\r\n\x1a\n but then nothing an image needs")
    ds = ImageCaptionDataset(open_dataset(folder), resolution=16)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    with caplog.at_level("WARNING", logger="latentdiff"):
        batches = list(loader)
    assert sum(b["skipped"] for b in batches) == 1 and sum(len(b["captions"]) for b in batches) == 11
    assert ds.unreadable == {3} and "row 3" in caplog.text
    worker_batches = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate, num_workers=2))
    assert sum(b["skipped"] for b in worker_batches) == 1, "the per-batch count is right with workers too"
    assert collate([None, None])["pixel_values"].shape == (0, 3, 0, 0)


def test_non_rgb_images_are_converted_faithfully():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert torch.equal(preprocess(transparent, 8), torch.ones(3, 8, 8)), "transparency is composited over white"
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8), 3000, dtype=np.uint16)).save(buffer, "PNG")
    grey16 = Image.open(io.BytesIO(buffer.getvalue()))
    assert grey16.mode == "I;16"
    assert preprocess(grey16, 8)[0, 0, 0].item() == pytest.approx(3000 / 65535 * 2 - 1, abs=0.01)
    palette = Image.new("P", (8, 8), 0)
    palette.putpalette([255, 0, 0] * 256)
    assert torch.allclose(preprocess(palette, 8)[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_writer_replaces_only_data_sets_and_cleans_up(tmp_path):
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="has files but no metadata.jsonl"):
        write_imagefolder(keep, shapes_rows(2), overwrite=True)
    assert (keep / "notes.txt").exists()
    with pytest.raises(ValueError, match="size must be an integer from 16 to 512"):
        write_imagefolder(tmp_path / "big", shapes_rows(2, 513))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out must be a folder, got the file"):
        write_imagefolder(tmp_path / "file", shapes_rows(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "keep"], "no partial folders are left behind"
    write_imagefolder(tmp_path / "set", shapes_rows(2))
    assert write_imagefolder(tmp_path / "set", shapes_rows(3), overwrite=True) == 3
    assert len((tmp_path / "set" / "metadata.jsonl").read_text().splitlines()) == 3


def test_a_mistyped_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    with pytest.raises(ValueError, match="data folder 'data/shapse' does not exist"):
        open_dataset("data/shapse")


def test_crop_and_flip():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))  # blue left quarter
    centre = preprocess(wide, 20)
    assert centre.shape == (3, 20, 20) and (centre[2, :, 0] < 0).all()  # centre crop drops the blue quarter
    torch.manual_seed(0)
    crops = {bool(preprocess(wide, 20, random_crop=True)[2, 0, 0] > 0) for _ in range(30)}
    assert crops == {True, False}
    asymmetric = Image.new("RGB", (20, 20), (0, 0, 0))
    asymmetric.paste((255, 255, 255), (0, 0, 10, 20))
    assert all(preprocess(asymmetric, 20)[0, 0, 0] == 1 for _ in range(10)), "no flip unless asked"
    flips = {float(preprocess(asymmetric, 20, flip=True)[0, 0, 0]) for _ in range(30)}
    assert flips == {1.0, -1.0}


# CLI -------------------------------------------------------------------------------------------------------------

def test_data_commands(tmp_path, capsys):
    assert main(["data", "shapes", "--n", "5", "--size", "32", "--out", str(tmp_path / "s")]) == 0
    assert "wrote 5 shapes scenes (32x32)" in capsys.readouterr().out
    assert main(["data", "shapes", "--n", "5", "--out", str(tmp_path / "s")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    if any(__import__("pathlib").Path(f).is_file() for f in emoji_data.FONT_CANDIDATES):
        assert main(["data", "emoji", "--size", "16", "--out", str(tmp_path / "e16")]) == 0
        out = capsys.readouterr().out
        assert re.search(r"wrote \d{4} emoji images \(16x16\) .*; skipped \d+ emoji sequences", out), out
    assert main(["data", "emoji", "--out", str(tmp_path / "e"), "--font", str(tmp_path / "missing.ttf")]) == 2
    assert "font must be an existing font file" in capsys.readouterr().err


# Held-out colour × shape pairs and hard negatives ------------------------------------------------------------------

def test_a_held_out_pair_is_in_no_training_scene_or_caption_and_every_unseen_prompt_has_one(tmp_path):
    from latentdiff.cli import main
    from latentdiff.data.loader import open_dataset
    from latentdiff.data.shapes import caption_pairs, read_split

    out = tmp_path / "held"
    assert main(["data", "shapes", "--n", "300", "--size", "32", "--holdout", "red circle, blue star",
                 "--unseen-prompts", "40", "--out", str(out)]) == 0
    split = read_split(out)
    assert split["holdout"] == ["red circle", "blue star"] and split["unseen_prompts"] == "unseen.jsonl"
    held = {("red", "circle"), ("blue", "star")}
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and len(open_dataset(out)) == 300  # the split files are not rows
    for row in rows:
        assert not {(o["colour"], o["shape"]) for o in row["scene"]["objects"]} & held
        assert not any(caption_pairs(c) & held for c in row["text"]), row["text"]
    unseen = [json.loads(line) for line in (out / "unseen.jsonl").read_text().splitlines()]
    assert len(unseen) == 40 and {r["scene"]["task"] for r in unseen} == {"single", "count", "relation"}
    for row in unseen:
        assert {(o["colour"], o["shape"]) for o in row["scene"]["objects"]} & held
        assert caption_pairs(row["text"][0]) & held
    # everything else is seen: every colour and every shape appears with other partners
    seen = {(o["colour"], o["shape"]) for r in rows for o in r["scene"]["objects"]}
    assert {c for c, _ in seen} == set(COLOURS) and {s for _, s in seen} == set(SHAPES)


def test_task_weights_set_the_training_mix_and_leave_the_unseen_prompts_mix_alone(tmp_path, capsys):
    from collections import Counter

    from latentdiff.cli import main
    from latentdiff.data.shapes import read_split, shapes_rows

    out = tmp_path / "relations"
    assert main(["data", "shapes", "--n", "400", "--size", "32", "--holdout", "red circle", "--task-weights", "0,1,3",
                 "--unseen-prompts", "200", "--out", str(out)]) == 0
    tasks = Counter(json.loads(line)["scene"]["task"] for line in (out / "metadata.jsonl").read_text().splitlines())
    assert tasks["single"] == 0 and 0.65 < tasks["relation"] / 400 < 0.85, tasks
    assert read_split(out)["task_weights"] == [0.0, 1.0, 3.0]
    unseen = Counter(json.loads(line)["scene"]["task"] for line in (out / "unseen.jsonl").read_text().splitlines())
    assert unseen["single"] > 20  # the default mix: evaluations of sets with other mixes compare
    # the default weights draw the very scenes they drew before the flag existed
    assert [m for _, m in shapes_rows(30, 32, seed=5)] == [m for _, m in shapes_rows(30, 32, 5, (), (4, 3, 3))]
    for bad in ("1,2", "1,-1,1", "0,0,0", "a,b,c"):
        assert main(["data", "shapes", "--n", "5", "--task-weights", bad, "--out", str(tmp_path / "x")]) == 2
        assert f"--task-weights must be 3 comma-separated weights ≥ 0, not all 0, for single, count, relation in " \
               f"that order (e.g. '4,3,3'), got '{bad}'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_held_out_fraction_is_a_seeded_set_of_new_combinations_of_seen_words(capsys):
    from latentdiff.cli import main
    from latentdiff.data.shapes import sample_holdout

    pairs = sample_holdout(0.125, seed=0)
    assert len(pairs) == 6 and pairs == sample_holdout(0.125, seed=0) != sample_holdout(0.125, seed=1)
    assert len({c for c, _ in pairs}) == 6 and len({s for _, s in pairs}) == 6  # no colour or shape held out twice
    for fraction, per_colour in ((0.25, {1, 2}), (0.5, {3})):  # colours as even as shapes allow
        big = sample_holdout(fraction, seed=3)
        assert len(set(big)) == round(48 * fraction)
        assert {sum(c == colour for c, _ in big) for colour in COLOURS} == per_colour
        assert {sum(s == shape for _, s in big) for shape in SHAPES} == {round(8 * fraction)}
    with pytest.raises(ValueError, match=r"--holdout-fraction must be in \(0, 0.5\]"):
        sample_holdout(0.9)
    assert main(["data", "shapes", "--n", "5", "--holdout", "red circel", "--out", "unused"]) == 2
    assert "--holdout must be comma-separated 'colour shape' pairs" in capsys.readouterr().err


def test_hard_negatives_change_binding_order_or_one_attribute_and_keep_their_grammar():
    from latentdiff.data.shapes import hard_negatives

    negatives = hard_negatives("a red circle above a blue square")
    # the issue's own examples: the colours bound the other way, and the relation turned round
    assert "a blue circle above a red square" in negatives["swap"]
    assert negatives["opposite"] == ["a red circle below a blue square"]
    assert "an orange circle above a blue square" in negatives["replace"]  # not "a orange"
    assert all(n != "a red circle above a blue square" for kind in negatives.values() for n in kind)
    single = hard_negatives("a small red circle on the left")
    assert single["swap"] == [] and single["opposite"] == ["a small red circle on the right"]
    assert "a large red circle on the left" in single["replace"] and "a small red star on the left" in single["replace"]
    assert "two red circles" in hard_negatives("three red circles")["replace"]
    assert "one red circles" not in hard_negatives("two red circles")["replace"]  # ungrammatical: gives itself away
    assert hard_negatives("on the left, a small red circle")["opposite"] == ["on the right, a small red circle"]


def test_drawn_hard_negatives_never_name_a_held_out_pair():
    from latentdiff.training.clip import draw_hard_negatives
    from latentdiff.data.shapes import caption_pairs

    held = {("green", "circle")}
    generators = [torch.Generator().manual_seed(i) for i in range(200)]
    drawn = draw_hard_negatives(["a red circle above a blue square"] * 200, 3, generators, held)
    flat = [c for picks in drawn for c in picks]
    assert len(flat) == 600 and not any(caption_pairs(c) & held for c in flat)
    assert "a green circle above a blue square" not in flat and "a yellow circle above a blue square" in flat
    # every phrasing that can name the pair: "green circle(s)" and "circle in green"
    for caption, forbidden, allowed in [
            ("a small circle in red at the top", "a small circle in green at the top", "a small circle in cyan at the top"),
            ("two red circles", "two green circles", "two cyan circles"),
            ("a small green star on the left", "a small green circle on the left", "a small green cross on the left")]:
        picks = [c for g in range(300) for c in draw_hard_negatives(
            [caption], 2, [torch.Generator().manual_seed(g)], held)[0]]
        assert forbidden not in picks and allowed in picks, caption
    # kinds are drawn evenly: the single binding swap of colours is not drowned by two dozen replacements
    assert flat.count("a blue circle above a red square") > 600 / 3 / 2 * 0.6
