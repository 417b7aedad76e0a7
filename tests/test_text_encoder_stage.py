"""The text-encoder stage: its loss, its paraphrase test, and a run that learns to state the scene."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextModel, CLIPTokenizer

from latentdiff.data.imagefolder import write_imagefolder
from latentdiff.data.shapes import shapes_rows
from latentdiff.training import clip as clip_training, text_encoder as stage

QUIET = ["--report-to", "none"]


@pytest.fixture(scope="module")
def relations(tmp_path_factory):
    """Relation scenes only (three captions each, two of them the same scene in either order), and a tiny
    tokenizer and text encoder from 2 CLIP steps on them."""
    root = tmp_path_factory.mktemp("text")
    data = root / "shapes"
    write_imagefolder(data, shapes_rows(96, 32, seed=0, task_weights=(0, 0, 1)))
    model = root / "model"
    clip_training.main(["--data", str(data), "--preset", "tiny", "--model-dir", str(model), "--max-steps", "2",
                        "--batch-size", "8", "--holdout", "8", "--output-dir", str(root / "clip"), *QUIET])
    return data, model


def test_summary_state_is_the_mean_from_the_end_of_text_token_on():
    torch.manual_seed(0)
    from transformers import CLIPTextConfig

    encoder = CLIPTextModel(CLIPTextConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, max_position_embeddings=8, eos_token_id=19))
    ids = torch.tensor([[0, 5, 6, 19, 19, 19, 19, 19], [0, 5, 6, 7, 8, 9, 19, 19]])
    states, summary = stage.summary_states(encoder, ids, 19)
    for row, start in ((0, 3), (1, 6)):
        torch.testing.assert_close(summary[row], F.normalize(states[row, start:].mean(0), dim=0))


def test_paraphrase_loss_is_low_when_each_caption_is_nearest_its_paraphrase():
    torch.manual_seed(0)
    anchors = F.normalize(torch.randn(6, 32), dim=-1)
    negatives = [F.normalize(torch.randn(2, 32), dim=-1) for _ in range(6)]
    near = stage.paraphrase_loss(anchors, anchors, negatives, 0.05)
    assert near < 0.05
    shuffled = stage.paraphrase_loss(anchors, anchors.roll(1, 0), negatives, 0.05)
    assert shuffled > 5
    # its own hard negative equal to the anchor splits the softmax evenly with the positive
    tied = stage.paraphrase_loss(anchors, anchors, [a[None] for a in anchors], 0.05)
    assert abs(tied - torch.log(torch.tensor(2.0))) < 0.05


def test_the_paraphrase_test_tells_a_scene_encoder_from_a_word_encoder():
    """An encoder that reads only the bag of words rates the opposite caption (same words but one) as near as the
    paraphrase (same words reordered); read through the real tokenizer, captions of relation scenes."""
    from latentdiff.data.shapes import Scene, SceneObject

    captions = Scene("relation", "white", [SceneObject("circle", "red", "small", "top", (0, 0, 4, 4)),
                                           SceneObject("square", "blue", "small", "bottom", (0, 9, 4, 13))],
                     "above").captions()
    assert captions[:2] == ["a red circle above a blue square", "a blue square below a red circle"]

    class BagOfWords(torch.nn.Module):  # every position's state: the sum of the word vectors so far
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.randn(1000, 64)

        def forward(self, ids):
            return (self.table[ids].cumsum(1),)

    tokenizer = _tokenizer_for(captions)
    report = stage.paraphrase_accuracy(BagOfWords(), tokenizer, [captions])
    assert report["opposite_count"] == 1 and report["opposite"] == 0.0  # "above"/"below" beats the reordering


def _tokenizer_for(captions):
    from latentdiff.tokenizer import train_tokenizer
    from latentdiff.data.shapes import all_first_captions

    return train_tokenizer(all_first_captions() + captions, vocab_size=700, model_max_length=16)


def test_the_stage_learns_to_state_the_scene_and_writes_only_a_new_text_encoder(relations, tmp_path):
    data, model = relations
    summary = stage.main(["--data", str(data), "--model", str(model), "--output-dir", str(tmp_path / "run"),
                          "--max-steps", "200", "--batch-size", "32", "--learning-rate", "3e-3", "--holdout", "8",
                          "--lr-warmup-steps", "10", "--anchor-weight", "0", "--hard-negatives", "2", *QUIET])
    tokenizer = CLIPTokenizer.from_pretrained(model / "tokenizer")
    rows = [row["text"] for row in _rows(data)[:88]]  # the training rows' captions
    before = stage.paraphrase_accuracy(CLIPTextModel.from_pretrained(model / "text_encoder"), tokenizer, rows)
    trained = CLIPTextModel.from_pretrained(tmp_path / "run" / "model" / "text_encoder")
    after = stage.paraphrase_accuracy(trained, tokenizer, rows)
    assert before["opposite"] < 0.3 and after["opposite"] > 0.8, (before, after)
    assert summary["paraphrase"]["before"]["holdout"]["opposite_count"] == 8
    for part in ("tokenizer", "vae", "clip"):  # copied as they were
        for f in (model / part).rglob("*"):
            if f.is_file():
                assert (tmp_path / "run" / "model" / part / f.relative_to(model / part)).read_bytes() == f.read_bytes()


def _rows(data):
    import json

    return [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]


def test_flags_and_data_are_checked(relations, tmp_path):
    data, model = relations
    base = ["--data", str(data), "--model", str(model), "--output-dir", str(tmp_path), *QUIET]
    with pytest.raises(ValueError, match="--temperature must be > 0, got 0"):
        stage.main([*base, "--temperature", "0"])
    with pytest.raises(ValueError, match="--anchor-weight must be ≥ 0, got -1"):
        stage.main([*base, "--anchor-weight", "-1"])
    with pytest.raises(ValueError, match="has no text_encoder/config.json"):
        stage.main([*base[:2], "--model", str(tmp_path), *base[4:]])
    single = tmp_path / "single"
    write_imagefolder(single, ((image, {"text": row["text"][0]}) for image, row in shapes_rows(12, 32, seed=1)))
    with pytest.raises(ValueError, match="no row has two captions"):
        stage.main(["--data", str(single), "--model", str(model), "--output-dir", str(tmp_path / "s"),
                    "--holdout", "2", "--batch-size", "4", *QUIET])
