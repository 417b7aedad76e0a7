"""The BPE tokenizer trained with `tokenizers` and used as transformers' CLIPTokenizer."""

import random
import unicodedata

import pytest
from transformers import AutoTokenizer, CLIPTokenizer, CLIPTokenizerFast

from latentdiff.tokenizer import builtin_captions, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(builtin_captions(), vocab_size=1000, model_max_length=24)


def test_layout_and_size(tokenizer):
    assert 514 < len(tokenizer) <= 1000
    assert tokenizer.model_max_length == 24
    assert tokenizer.bos_token == "<|startoftext|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # as in OpenAI CLIP: EOS is the last id


def test_frequent_caption_words_become_single_tokens(tokenizer):
    for word in ("tiger", "red", "circle"):
        assert tokenizer.tokenize(word) == [word + "</w>"]


def test_any_text_tokenizes_without_unknown_tokens_and_decodes_back(tokenizer):
    rng = random.Random(0)
    samples = ["A Tiger  on   a Yellow background", "🐯 🇯🇵 👋🏽", "東京の虎", "naïve façade ½ — ok"]
    samples += ["".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(12)) for _ in range(20)]
    for text in samples:
        ids = tokenizer(text, verbose=False).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.eos_token_id not in ids[1:-1], f"unknown token in {text!r}"
        normalized = " ".join(unicodedata.normalize("NFC", text).lower().split())  # CLIP's normaliser
        assert tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") == normalized.replace(" ", "")


def test_saved_tokenizer_loads_in_every_transformers_class(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    text = ["a smiling tiger face", "two red circles 🍎"]
    expected = tokenizer(text, padding="max_length", max_length=24).input_ids
    for cls in (CLIPTokenizer, CLIPTokenizerFast, AutoTokenizer):
        loaded = cls.from_pretrained(tmp_path)
        assert loaded(text, padding="max_length", max_length=24).input_ids == expected
        assert loaded.model_max_length == 24


def test_training_is_deterministic():
    a = train_tokenizer(builtin_captions()[:500], vocab_size=700)
    b = train_tokenizer(builtin_captions()[:500], vocab_size=700)
    assert a.get_vocab() == b.get_vocab()


@pytest.mark.parametrize("kwargs,message", [(dict(vocab_size=100), "vocab_size must be at least 514"),
                                            (dict(model_max_length=2), "model_max_length must be at least 3")])
def test_bad_sizes_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_tokenizer(["a tiger"], **kwargs)
