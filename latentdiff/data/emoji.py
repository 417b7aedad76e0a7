"""Every emoji a colour emoji font can draw, rendered as an image and captioned with its Unicode/CLDR name and
aliases ("a tiger", "tiger face", "flag of Japan", "waving hand, medium skin tone").

Names come from the `emoji` package (CLDR short names and GitHub-style aliases). A sequence counts as drawable
when the font shapes it into a single glyph (flags, skin tones and ZWJ sequences included): a font without a
ligature for it would draw its parts side by side, and those are skipped and counted.
Options put the emoji on a coloured background or at a random size and position, and the captions say so.
"""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .shapes import BACKGROUNDS, COLOURS, POSITION_PHRASES, POSITIONS, a

FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
)
BITMAP_SIZE = 109  # Noto Color Emoji's only bitmap strike
PLACEMENT_SIZES = {"small": 0.4, "medium": 0.6, "large": 0.85}  # emoji side / image side
DEFAULT_SIDE = 0.9
BACKGROUND_COLOURS = {**BACKGROUNDS, **COLOURS}
_SKIN_TONE = re.compile(r" ((?:medium-)?(?:light|dark)|medium) skin tone")


def find_font(path: str | Path | None = None) -> Path:
    """The colour emoji font: `path` if given, else Noto Color Emoji where the OS package puts it."""
    if path is not None:
        if not Path(path).is_file():
            raise ValueError(f"font must be an existing font file, got {str(path)!r}")
        return Path(path)
    for candidate in FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    if shutil.which("fc-match"):
        found = subprocess.run(["fc-match", "-f", "%{file}", "Noto Color Emoji:color=true"], capture_output=True,
                               text=True).stdout.strip()
        if found and "emoji" in found.lower() and Path(found).is_file():
            return Path(found)
    raise FileNotFoundError(
        f"no colour emoji font found (looked in {', '.join(FONT_CANDIDATES)}). Install the Debian/Ubuntu package "
        f"{FONT_PACKAGE} (apt-get install {FONT_PACKAGE}) or pass --font PATH to a colour emoji font."
    )


@dataclass
class EmojiEntry:
    emoji: str
    name: str
    phrases: list[str]  # the name and the usable aliases, most specific first
    is_flag: bool


def _phrase(code: str) -> str:
    return code.strip(":").replace("_", " ").strip()


def emoji_entries() -> list[EmojiEntry]:
    """Every fully qualified emoji with its name and aliases as phrases."""
    import emoji as emoji_package

    entries = []
    for text, data in emoji_package.EMOJI_DATA.items():
        if data.get("status") != emoji_package.STATUS["fully_qualified"]:
            continue
        name = _SKIN_TONE.sub(r", \1 skin tone", _phrase(data["en"]))
        is_flag = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in text) or (  # regional-indicator pairs, or
            text[0] == "🏴" and len(text) > 2 and all(0xE0020 <= ord(c) <= 0xE007F for c in text[1:]))  # tag flags
        phrases = [name]
        for alias in data.get("alias", []):
            alias = _phrase(alias)
            if len(alias) > 2 and not re.search(r"\d", alias) and not alias.startswith("flag for") \
                    and alias.lower() not in (p.lower() for p in phrases):
                phrases.append(alias)
        entries.append(EmojiEntry(text, name, phrases, is_flag))
    return entries


SINGULAR_S = {"bus", "octopus", "cactus", "lotus", "hippopotamus", "minus", "plus", "tennis", "abacus", "compass",
              "dress", "kiss", "lacrosse", "chess", "circus", "mantis", "bonus", "grass", "glass", "cross"}


def _with_article(phrase: str) -> str:
    """"a tiger", but "Tokyo tower" (a proper name), "Japanese dolls" and "people holding hands, …" (plurals)."""
    head = phrase.split(",")[0].split(" (")[0]
    last = head.split()[-1]
    if head[:1].isupper() or head.split()[0] in ("people", "men", "women") or \
            last.endswith("s") and last not in SINGULAR_S and not last.endswith("ss"):
        return phrase
    return a(phrase)


def captions(entry: EmojiEntry, size: str | None = None, position: str | None = None,
             background: str | None = None) -> list[str]:
    """Captions for one rendering: the CLDR name with and without an article, then the aliases as they are
    (GitHub aliases are often adjectives: "relaxed", "blush"); each states placement and background when set."""
    sized = (lambda phrase: f"{size} {phrase}") if size else (lambda phrase: phrase)  # noqa: E731
    if entry.is_flag:
        cores = [sized(f"flag of {entry.name}"), sized(f"{entry.name} flag")]
    else:
        name = sized(entry.name)
        cores = [_with_article(name), name] + [sized(alias) for alias in entry.phrases[1:]]
    suffix = (f" {POSITION_PHRASES[position]}" if position else "") + (f" on {a(background)} background"
                                                                       if background else "")
    return [c + suffix for c in dict.fromkeys(cores)]


class EmojiRenderer:
    """Draws single emoji glyphs with a colour font (bitmap strike, scaled to the requested size)."""

    def __init__(self, font_path: Path):
        self.font = ImageFont.truetype(str(font_path), BITMAP_SIZE, layout_engine=ImageFont.Layout.RAQM)
        self.advance = self.font.getlength("🙂")

    def glyph(self, text: str) -> Image.Image | None:
        """The emoji cropped to its pixels (RGBA), or None when the font does not draw it as one glyph."""
        if abs(self.font.getlength(text) - self.advance) > 1:
            return None
        canvas = Image.new("RGBA", (int(self.advance) + 8, BITMAP_SIZE + 24), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((4, 4), text, font=self.font, embedded_color=True)
        box = canvas.getbbox()
        return canvas.crop(box) if box else None

    @staticmethod
    def place(glyph: Image.Image, image_size: int, background, side: float, centre: tuple[float, float]):
        """Scale the glyph so its longer side is `side` × image size, centre it at `centre`, on `background`."""
        scale = side * image_size / max(glyph.size)
        w, h = max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))
        small = glyph.convert("RGBa").resize((w, h), Image.LANCZOS).convert("RGBA")  # premultiplied: no dark fringe
        x = min(max(round(centre[0] * image_size - w / 2), 0), image_size - w)
        y = min(max(round(centre[1] * image_size - h / 2), 0), image_size - h)
        image = Image.new("RGBA", (image_size, image_size), (*background, 255))
        image.alpha_composite(small, (x, y))
        return image.convert("RGB"), (x, y, x + w - 1, y + h - 1)


def render_emoji_set(image_size: int = 64, font: str | Path | None = None, background: str | None = None,
                     random_placement: bool = False, per_emoji: int = 1, seed: int = 0):
    """Yield (image, metadata) for every drawable emoji; return (via StopIteration.value) the skipped count.

    background: None (white, not mentioned in captions), a colour name, or "random" (one per image).
    random_placement: a random size (small/medium/large) and position (left/right/top/bottom/center) per image.
    """
    if background not in (None, "random") and background not in BACKGROUND_COLOURS:
        raise ValueError(f"background must be 'random' or one of {sorted(BACKGROUND_COLOURS)}, got {background!r}")
    renderer, rng, skipped = EmojiRenderer(find_font(font)), random.Random(seed), []
    for entry in emoji_entries():
        glyph = renderer.glyph(entry.emoji)
        if glyph is None:
            skipped.append(entry.emoji)
            continue
        for _ in range(per_emoji):
            bg = rng.choice(sorted(BACKGROUND_COLOURS)) if background == "random" else background
            size, position = (rng.choice(list(PLACEMENT_SIZES)), rng.choice(list(POSITIONS))) if random_placement \
                else (None, None)
            side = PLACEMENT_SIZES[size] if size else DEFAULT_SIDE
            image, box = renderer.place(glyph, image_size, BACKGROUND_COLOURS[bg or "white"], side,
                                        POSITIONS[position] if position else (0.5, 0.5))
            yield image, {"text": captions(entry, size, position, bg), "emoji": entry.emoji, "name": entry.name,
                          "background": bg or "white", "size": size, "position": position, "box": list(box)}
    return skipped
