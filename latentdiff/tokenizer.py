"""Train a CLIP byte-level BPE vocabulary from captions with `tokenizers`, as a transformers `CLIPTokenizer`.

The vocabulary is laid out like OpenAI CLIP's: the 256 byte symbols, the same 256 with the end-of-word marker
"</w>", one token per merge in merge order, then <|startoftext|> and <|endoftext|>. Because every byte (and every
byte at a word's end) is in it, any text tokenizes without unknown tokens: emoji, accents, other scripts.
Normalisation and pre-tokenisation are taken from transformers' own `CLIPTokenizer`, so training and use agree.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
_BASE_TOKENS = 2 * 256 + 2  # bytes, bytes + </w>, BOS, EOS


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 4096, model_max_length: int = 77, min_frequency: int = 2
) -> CLIPTokenizer:
    """A `CLIPTokenizer` whose BPE merges are learned from `texts`.

    `vocab_size` counts everything (bytes, merges, special tokens) and must be at least 514; the result can be
    smaller when the captions support fewer merges. `model_max_length` is the text encoder's context, BOS and
    EOS included.
    """
    if vocab_size < _BASE_TOKENS:
        raise ValueError(f"vocab_size must be at least {_BASE_TOKENS} (256 bytes, 256 end-of-word bytes, BOS, EOS), "
                         f"got {vocab_size}")
    if model_max_length < 3:
        raise ValueError(f"model_max_length must be at least 3 (BOS, one token, EOS), got {model_max_length}")
    template = CLIPTokenizer()  # empty vocabulary; only its text pipeline is used
    bpe = Tokenizer(models.BPE(unk_token=EOS, continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    bpe.normalizer = template.backend_tokenizer.normalizer
    bpe.pre_tokenizer = template.backend_tokenizer.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    trainer = trainers.BpeTrainer(
        # the trainer's budget counts only the symbols it sees; ours is filled up to vocab_size below
        vocab_size=vocab_size - _BASE_TOKENS + len(alphabet),
        min_frequency=min_frequency,
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
        show_progress=False,
    )
    bpe.train_from_iterator((t for t in texts if isinstance(t, str)), trainer)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]

    tokens = alphabet + [c + END_OF_WORD for c in alphabet]
    known = set(tokens)
    kept_merges = []
    for left, right in merges:
        merged = left + right
        if len(tokens) >= vocab_size - 2:
            break
        if left in known and right in known and merged not in known:
            tokens.append(merged)
            known.add(merged)
            kept_merges.append((left, right))
    tokens += [BOS, EOS]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(tokens)},
        merges=kept_merges,
        model_max_length=model_max_length,
    )


THINGS = (
    "tiger", "cat", "dog", "lion", "horse", "cow", "pig", "monkey", "rabbit", "mouse", "bear", "panda", "fox",
    "wolf", "frog", "snake", "turtle", "fish", "whale", "dolphin", "octopus", "bird", "owl", "eagle", "penguin",
    "chicken", "duck", "butterfly", "bee", "spider", "apple", "banana", "grapes", "cherry", "lemon", "pear",
    "strawberry", "pizza", "burger", "cake", "bread", "cheese", "egg", "coffee", "car", "bus", "train", "bicycle",
    "airplane", "rocket", "ship", "boat", "house", "tree", "flower", "rose", "sun", "moon", "star", "cloud",
    "rain", "snowflake", "fire", "umbrella", "clock", "phone", "computer", "book", "pencil", "key", "lock",
    "guitar", "drum", "ball", "crown", "gem", "flag", "face", "hand", "heart", "ghost", "robot", "alien",
)
MODIFIERS = ("smiling", "grinning", "winking", "crying", "laughing", "sleeping", "big", "small", "happy", "angry")


def builtin_captions() -> list[str]:
    """Captions of the kinds the built-in data sets use, enough to give an untrained model a sensible vocabulary
    before its own captions exist: the shapes world's own (`data.shapes.all_first_captions`, so its words are the
    data set's) and emoji-like names."""
    from .data.shapes import COLOURS, all_first_captions

    captions = all_first_captions()
    for thing in THINGS:
        captions += [f"a {thing}", f"{thing} face", f"an emoji of a {thing}", f"a {thing} on a white background"]
        captions += [f"a {modifier} {thing}" for modifier in MODIFIERS]
        captions += [f"a {colour} {thing}" for colour in COLOURS]
    return captions
