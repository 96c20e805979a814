"""A deterministic, synthetic "knowledge world" for the REAVL knowledge-retrieval demo.

Why synthetic: the demo has to *prove* that the knowledge path (image -> entity -> retrieved
knowledge-base entry -> answer) carries information, with a tiny model trained from scratch on a
CPU in minutes. Real data cannot give that guarantee, so this module builds a controlled world in
which the answers are, by construction, NOT visible in the image and are only reachable through
the knowledge base. It is a controlled proof that the pipeline works, not a benchmark: numbers
measured on it say nothing about real-world quality.

The world:

* Entities are fictional countries with generated, pronounceable names. Each has attributes drawn
  from small shared vocabularies (language, region, currency, government, founding century), so
  that every value is shared by many countries and no answer identifies a country by itself.
  Attributes are drawn independently of each other and of the flag, so nothing in the pixels
  predicts an answer.
* Each country has a unique procedural flag (layout x colours x optional emblem); any two flags
  differ in at least two design components. Every image is a fresh rendering (random crop, scale,
  rotation, colour jitter, background), rendered large and downsampled with antialiasing.
* A knowledge base (one entry per country stating all its attributes, plus capital-city and river
  entries that mention the country names as retrieval distractors).
* Pre-training image-caption pairs for ALL countries: captions name the country and may describe
  the flag, but never state an attribute that is asked about.
* Knowledge VQA and entity-linking records, split by entity: test countries never appear in the
  VQA/EL training records (they do appear in the knowledge base and in the captions, which is how a
  model can still answer for them: recognise the flag, retrieve the entry, read the answer).
  VQA and entity-linking use renderings ("query images") distinct from the caption images, so test
  questions cannot be answered by memorising the pixels of a pre-training image.

Usage::

    world = generate_world(seed=0)
    paths = world.write("data/knowledge_world")

or ``python -m training.knowledge_world --output DIR --seed N``.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import shutil
import tempfile
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

FORMAT_VERSION = 1

# ----------------------------------------------------------------------------------------------
# Vocabularies. Small on purpose: each value is shared by many countries (about
# num_entities / len(vocabulary) of them), so an answer never identifies a country on its own.
# ----------------------------------------------------------------------------------------------

LANGUAGES = (
    "orvish", "kelmari", "dunese", "valtic", "somaran", "pekkic",
    "ithrani", "zuvoran", "meskian", "tolvic", "arunese", "brellish",
)
REGIONS = (
    "north sea", "amber coast", "high steppe", "salt marshes",
    "eastern isles", "iron mountains", "river delta", "southern desert",
)
CURRENCIES = (
    "kren", "dural", "solmark", "varn", "pesot", "tallo", "mirel", "zenta", "obrin", "skell",
)
GOVERNMENTS = ("republic", "monarchy", "federation", "principality", "theocracy", "oligarchy")
CENTURY_NUMBERS = tuple(range(9, 17))  # 9th .. 16th century: 8 values


def _ordinal(number: int) -> str:
    """1 -> '1st', 12 -> '12th', 22 -> '22nd'."""
    if 10 <= number % 100 <= 20:
        suffix = "th"
    else:
        suffix = {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def century_label(century: int) -> str:
    """The answer string of a founding century, e.g. 13 -> '13th century'."""
    return f"{_ordinal(century)} century"


CENTURIES = tuple(century_label(c) for c in CENTURY_NUMBERS)

# Question type -> vocabulary of its answers. The keys are also the attribute names.
ATTRIBUTE_VOCABULARIES: Dict[str, Tuple[str, ...]] = {
    "language": LANGUAGES,
    "region": REGIONS,
    "currency": CURRENCIES,
    "government": GOVERNMENTS,
    "founding_century": CENTURIES,
}
QUESTION_TYPES = tuple(ATTRIBUTE_VOCABULARIES)

QUESTION_TEMPLATES: Dict[str, Tuple[str, ...]] = {
    "language": (
        "What language is spoken in the country whose flag is shown?",
        "Which language do people speak in the country of this flag?",
        "What is the main language of this country?",
    ),
    "region": (
        "In which region is this country?",
        "Which region is the country of this flag located in?",
        "Where is the country with this flag located?",
    ),
    "currency": (
        "What currency is used in the country of this flag?",
        "What is the currency of this country?",
        "Which money do people use in the country whose flag this is?",
    ),
    "government": (
        "What kind of government does this country have?",
        "What type of government rules the country of this flag?",
        "How is the country with this flag governed?",
    ),
    "founding_century": (
        "In which century was this country founded?",
        "When was the country of this flag founded? Give the century.",
        "In what century was the country shown by this flag established?",
    ),
}

# (sentence, mention): the mention is a substring of the sentence that refers to the depicted entity.
ENTITY_LINKING_TEMPLATES = (
    ("What country does this flag belong to?", "this flag"),
    ("Name the country of this flag.", "the country of this flag"),
    ("The flag shown represents a country.", "The flag shown"),
    ("Tell me about the country whose flag is pictured.", "the country whose flag is pictured"),
    ("Which nation flies the flag in this image?", "the flag in this image"),
)

# Captions name the country and may describe the flag; they never mention an asked attribute.
CAPTION_TEMPLATES = (
    "the flag of {name}, {description}",
    "{name} flag: {description}",
    "a picture of the national flag of {name}",
    "{description} - the flag of {name}",
    "the {demonym} flag",
    "a photo of the flag of {name} ({description})",
    "the national flag of {name}, {description}",
)

VQA_ANSWERS_PER_QUESTION = 10  # VQA-v2 style: ten human answers, all equal for synthetic data

# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------

# Ten clearly distinct colours (name -> RGB).
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (205, 30, 40),
    "orange": (245, 135, 20),
    "yellow": (250, 215, 35),
    "green": (20, 135, 60),
    "light blue": (110, 180, 235),
    "dark blue": (20, 35, 130),
    "purple": (125, 45, 155),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "brown": (115, 70, 30),
}
COLOUR_NAMES = tuple(PALETTE)

# Layout -> number of colour slots it uses.
LAYOUTS: Dict[str, int] = {
    "horizontal_bicolor": 2,
    "vertical_bicolor": 2,
    "horizontal_tricolor": 3,
    "vertical_tricolor": 3,
    "nordic_cross": 2,
    "saltire": 2,
    "diagonal_split": 2,
    "canton": 2,
    "centered_disc": 2,
    "hoist_triangle": 3,
    "bordered": 2,
    "quartered": 2,
}
EMBLEMS = ("star", "disc", "square", "ring", "diamond")
EMBLEM_PROBABILITY = 0.65
MIN_DESIGN_DISTANCE = 2  # every two flags differ in at least this many design components
MAX_COLOUR_SLOTS = 3

BASE_FLAG_HEIGHT = 120  # base flags are drawn at 180x120 (3:2) and scaled per sample
# Flags are placed around the canvas centre with at most this shift (fraction of the side): enough
# variation to need a translation-tolerant model, little enough to keep flags recognisable at 32 px.
PLACEMENT_JITTER = 0.08
RENDER_SCALE = 4  # samples are composed at RENDER_SCALE * image_size, then downsampled


@dataclass(frozen=True)
class FlagDesign:
    """A procedural flag: a layout, its colours (hoist/top first) and an optional emblem."""

    layout: str
    colors: Tuple[str, ...]
    emblem: Optional[str] = None
    emblem_color: Optional[str] = None

    def components(self) -> Tuple[object, ...]:
        """The design components compared by :func:`design_distance`.

        Emblem shape and colour count as ONE component: an emblem is small at 32 px, so a pair of
        flags must also differ in layout or in a colour slot to count as two differences.
        """
        slots = tuple(self.colors) + (None,) * (MAX_COLOUR_SLOTS - len(self.colors))
        emblem = (self.emblem, self.emblem_color) if self.emblem else None
        return (self.layout,) + slots + (emblem,)

    def describe(self) -> str:
        """A short visual description used in captions, e.g. 'red, white and green vertical stripes
        with a yellow star'."""
        c = tuple(self.colors) + ("",) * MAX_COLOUR_SLOTS  # pad: all entries below are evaluated
        text = {
            "horizontal_bicolor": f"{c[0]} over {c[1]} horizontal bands",
            "vertical_bicolor": f"{c[0]} and {c[1]} vertical halves",
            "horizontal_tricolor": f"{c[0]}, {c[1]} and {c[2]} horizontal stripes",
            "vertical_tricolor": f"{c[0]}, {c[1]} and {c[2]} vertical stripes",
            "nordic_cross": f"a {c[1]} nordic cross on {c[0]}",
            "saltire": f"a {c[1]} diagonal cross on {c[0]}",
            "diagonal_split": f"split diagonally into {c[0]} and {c[1]}",
            "canton": f"a {c[0]} field with a {c[1]} canton",
            "centered_disc": f"a {c[1]} disc on a {c[0]} field",
            "hoist_triangle": f"{c[0]} and {c[1]} bands with a {c[2]} triangle at the hoist",
            "bordered": f"a {c[1]} field with a {c[0]} border",
            "quartered": f"quartered {c[0]} and {c[1]}",
        }[self.layout]
        if self.emblem:
            joiner = " and" if " with " in text else " with"
            text += f"{joiner} a {self.emblem_color} {self.emblem}"
        return text

    def to_dict(self) -> dict:
        return {
            "layout": self.layout,
            "colors": list(self.colors),
            "emblem": self.emblem,
            "emblem_color": self.emblem_color,
        }


def design_distance(a: FlagDesign, b: FlagDesign) -> int:
    """Number of design components (layout, each colour slot, emblem) in which two flags differ."""
    return sum(x != y for x, y in zip(a.components(), b.components()))


def _generate_designs(rng: np.random.Generator, count: int) -> List[FlagDesign]:
    """Draw `count` random flag designs, each at least MIN_DESIGN_DISTANCE from all others."""
    designs: List[FlagDesign] = []
    accepted_components: List[Tuple[object, ...]] = []
    layouts = list(LAYOUTS)
    for _ in range(200 * count + 1000):
        if len(designs) == count:
            break
        layout = layouts[rng.integers(len(layouts))]
        # Colours within a flag are distinct so every band/field is visible.
        colour_idx = rng.choice(len(COLOUR_NAMES), size=LAYOUTS[layout], replace=False)
        colors = tuple(COLOUR_NAMES[i] for i in colour_idx)
        emblem = emblem_color = None
        if rng.random() < EMBLEM_PROBABILITY:
            emblem = EMBLEMS[rng.integers(len(EMBLEMS))]
            free = [name for name in COLOUR_NAMES if name not in colors]  # emblem stands out
            emblem_color = free[rng.integers(len(free))]
        candidate = FlagDesign(layout, colors, emblem, emblem_color)
        comps = candidate.components()
        if all(
            sum(x != y for x, y in zip(comps, other)) >= MIN_DESIGN_DISTANCE
            for other in accepted_components
        ):
            designs.append(candidate)
            accepted_components.append(comps)
    if len(designs) < count:
        raise RuntimeError(f"could only draw {len(designs)} separated flag designs of {count}")
    return designs


def _draw_emblem(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "star":
        points = [
            (
                cx + (r if i % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + i * math.pi / 5),
                cy + (r if i % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + i * math.pi / 5),
            )
            for i in range(10)
        ]
        draw.polygon(points, fill=fill)
    elif shape == "disc":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(0.38 * r)))
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
    else:
        raise ValueError(f"unknown emblem {shape!r}")


def render_flag(design: FlagDesign, height: int = BASE_FLAG_HEIGHT) -> Image.Image:
    """Draw a clean, axis-aligned 3:2 flag (the base that every sample is rendered from)."""
    h = height
    w = height * 3 // 2
    col = [PALETTE[name] for name in design.colors]
    image = Image.new("RGB", (w, h), col[0])
    draw = ImageDraw.Draw(image)
    layout = design.layout
    # Emblem anchor (centre x, centre y, radius); most layouts put it in the middle.
    cx, cy, r = w / 2, h / 2, 0.22 * h
    if layout == "horizontal_bicolor":
        draw.rectangle((0, h / 2, w, h), fill=col[1])
    elif layout == "vertical_bicolor":
        draw.rectangle((w / 2, 0, w, h), fill=col[1])
    elif layout == "horizontal_tricolor":
        draw.rectangle((0, h / 3, w, 2 * h / 3), fill=col[1])
        draw.rectangle((0, 2 * h / 3, w, h), fill=col[2])
    elif layout == "vertical_tricolor":
        draw.rectangle((w / 3, 0, 2 * w / 3, h), fill=col[1])
        draw.rectangle((2 * w / 3, 0, w, h), fill=col[2])
    elif layout == "nordic_cross":
        bar = 0.2 * h
        cross_x = 0.36 * w
        draw.rectangle((cross_x - bar / 2, 0, cross_x + bar / 2, h), fill=col[1])
        draw.rectangle((0, h / 2 - bar / 2, w, h / 2 + bar / 2), fill=col[1])
        cx, r = cross_x, 0.17 * h
    elif layout == "saltire":
        t = 0.11 * h  # half-width of each diagonal bar
        draw.polygon([(0, 0), (t * 1.5, 0), (w, h - t * 1.5), (w, h), (w - t * 1.5, h), (0, t * 1.5)], fill=col[1])
        draw.polygon([(0, h), (0, h - t * 1.5), (w - t * 1.5, 0), (w, 0), (w, t * 1.5), (t * 1.5, h)], fill=col[1])
    elif layout == "diagonal_split":
        draw.polygon([(w, 0), (w, h), (0, h)], fill=col[1])
    elif layout == "canton":
        draw.rectangle((0, 0, 0.45 * w, 0.5 * h), fill=col[1])
        cx, cy, r = 0.225 * w, 0.25 * h, 0.16 * h
    elif layout == "centered_disc":
        rd = 0.32 * h
        draw.ellipse((w / 2 - rd, h / 2 - rd, w / 2 + rd, h / 2 + rd), fill=col[1])
        r = 0.18 * h
    elif layout == "hoist_triangle":
        draw.rectangle((0, h / 2, w, h), fill=col[1])
        draw.polygon([(0, 0), (0.45 * w, h / 2), (0, h)], fill=col[2])
        cx, r = 0.15 * w, 0.15 * h
    elif layout == "bordered":
        inset = 0.14 * h
        draw.rectangle((inset, inset, w - inset, h - inset), fill=col[1])
    elif layout == "quartered":
        draw.rectangle((w / 2, 0, w, h / 2), fill=col[1])
        draw.rectangle((0, h / 2, w / 2, h), fill=col[1])
    else:
        raise ValueError(f"unknown layout {layout!r}")
    if design.emblem:
        _draw_emblem(draw, design.emblem, cx, cy, r, PALETTE[design.emblem_color])
    return image


def render_sample(base_flag: Image.Image, rng: np.random.Generator, image_size: int) -> Image.Image:
    """One varied photo-like rendering of a flag: background, scale, position, rotation, jitter."""
    canvas_size = image_size * RENDER_SCALE
    # Background: plain random colour, half of the time with pixel noise on top.
    base_colour = rng.integers(0, 256, size=3)
    if rng.random() < 0.5:
        # Noise drawn at the output resolution and enlarged, so it survives the final downsampling.
        noise = rng.standard_normal((image_size, image_size, 3), dtype=np.float32)
        noise *= rng.uniform(8.0, 30.0)
        noise += base_colour.astype(np.float32)
        small = Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")
        canvas = small.resize((canvas_size, canvas_size), Image.Resampling.NEAREST)
    else:
        canvas = Image.new("RGB", (canvas_size, canvas_size), tuple(int(v) for v in base_colour))

    # Flag width is 72-95% of the canvas side (3:2 flags, so 48-63% of its height).
    flag_w = int(round(canvas_size * rng.uniform(0.72, 0.95)))
    flag_h = int(round(flag_w * base_flag.height / base_flag.width))
    # Pillow's bilinear resize is antialiased when shrinking.
    flag = np.asarray(base_flag.resize((flag_w, flag_h), Image.Resampling.BILINEAR), np.float32)

    # Small photometric jitter: contrast around the flag mean, brightness, per-channel tint.
    contrast = rng.uniform(0.85, 1.15)
    brightness = rng.uniform(0.85, 1.15)
    tint = rng.uniform(-10.0, 10.0, size=3).astype(np.float32)
    mean = flag.mean()
    flag = ((flag - mean) * contrast + mean) * brightness + tint
    rgba = np.empty((flag_h, flag_w, 4), np.uint8)
    rgba[..., :3] = np.clip(flag, 0, 255)
    rgba[..., 3] = 255

    # Rotate premultiplied ("RGBa") so the antialiased edge does not darken; alpha is the mask.
    angle = rng.uniform(-10.0, 10.0)
    rotated = (
        Image.fromarray(rgba, "RGBA").convert("RGBa")
        .rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
        .convert("RGBA")
    )

    # Random placement around the centre (like a loose crop around the object): the offset is at
    # most PLACEMENT_JITTER of the canvas side, and never pushes a flag that fits off the canvas.
    max_shift = PLACEMENT_JITTER * canvas_size
    x = _jittered_offset(rng, canvas_size - rotated.width, max_shift)
    y = _jittered_offset(rng, canvas_size - rotated.height, max_shift)
    canvas.paste(rotated, (x, y), rotated)
    # Composing large and box-downsampling (pixel averaging) gives antialiased edges.
    return canvas.reduce(RENDER_SCALE)


def _jittered_offset(rng: np.random.Generator, slack: int, max_shift: float) -> int:
    """Top/left offset of an object in a canvas with `slack` free pixels: centred, plus a uniform
    shift of at most `max_shift`, clamped so an object that fits stays inside."""
    offset = slack / 2 + rng.uniform(-max_shift, max_shift)
    if slack >= 0:
        offset = min(max(offset, 0), slack)
    return int(round(offset))


def png_bytes(image: Image.Image) -> bytes:
    """Deterministic PNG encoding (fixed compression, no metadata chunks)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Names
# ----------------------------------------------------------------------------------------------

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
           "br", "dr", "gr", "kr", "tr", "th", "sk", "vr", "zh")
_VOWELS = ("a", "e", "i", "o", "u", "a", "o", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "m")
_COUNTRY_SUFFIXES = ("ia", "ar", "or", "en", "and", "esh", "ova", "ith", "um", "ane", "ory")
_CITY_SUFFIXES = ("heim", "ovo", "ara", "ost", "mir", "dun", "eth", "ivo", "grad")
_RIVER_SUFFIXES = ("a", "ene", "ur", "is", "anna")
# A few real words the syllable grammar can produce; names are otherwise improbable as words.
_BLOCKED_NAMES = {"morena", "salina", "banana", "tarot", "sonar", "molar", "polar", "lunar",
                  "solar", "manor", "tenor", "minor", "donor", "major", "vapor", "razor", "ladder"}


def demonym(name: str) -> str:
    """Adjective of a country name: Valdoria -> Valdorian, Kelmar -> Kelmarian."""
    if name.endswith("a"):
        return name + "n"
    if name[-1] in "eiouy":
        return name[:-1] + "ian"
    return name + "ian"


class _NameGenerator:
    """Unique pronounceable names; none contains (or is contained in) another, or an attribute
    value, so substring search for a name or an answer is never ambiguous."""

    def __init__(self, rng: np.random.Generator, forbidden_substrings: Sequence[str]):
        self.rng = rng
        self.forbidden = [s.lower() for s in forbidden_substrings]
        self.used: List[str] = []

    def _pick(self, options: Sequence[str]) -> str:
        return options[self.rng.integers(len(options))]

    def _candidate(self, suffixes: Sequence[str]) -> str:
        # One or two open syllables (consonant + vowel), a coda only on the last one, so no
        # hard consonant pile-ups; a vowel-initial suffix replaces a final stem vowel.
        syllables = [self._pick(_ONSETS) + self._pick(_VOWELS) for _ in range(1 + self.rng.integers(2))]
        stem = "".join(syllables) + self._pick(_CODAS)
        suffix = self._pick(suffixes)
        if stem[-1] in "aeiouy" and suffix[0] in "aeiouy":
            stem = stem[:-1]
        return stem + suffix

    def new(self, suffixes: Sequence[str], min_len: int = 5, max_len: int = 9) -> str:
        for _ in range(10_000):
            name = self._candidate(suffixes)
            if not (min_len <= len(name) <= max_len) or name in _BLOCKED_NAMES:
                continue
            if any(name[i] == name[i + 1] == name[i + 2] for i in range(len(name) - 2)):
                continue
            forms = (name, demonym(name.capitalize()).lower())
            if any(bad in form for bad in self.forbidden for form in forms):
                continue
            if any(name in other or other in name for other in self.used):
                continue
            self.used.append(name)
            return name.capitalize()
        raise RuntimeError("name space exhausted")


# ----------------------------------------------------------------------------------------------
# World
# ----------------------------------------------------------------------------------------------


@dataclass
class Entity:
    """A fictional country of the world."""

    entity_id: str
    name: str
    demonym: str
    capital: str
    attributes: Dict[str, str]  # question type -> answer string
    founded: int
    flag: FlagDesign
    split: str  # "train" or "test"

    def to_dict(self) -> dict:
        return {
            "id": self.entity_id,
            "name": self.name,
            "demonym": self.demonym,
            "capital": self.capital,
            "attributes": dict(self.attributes),
            "founded": self.founded,
            "flag": self.flag.to_dict(),
            "split": self.split,
        }


@dataclass
class KnowledgeWorld:
    """Everything the demo needs, in memory; :meth:`write` puts it on disk.

    Images are keyed by their path relative to the output folder (``images/img_00000.png``).
    Records refer to images by that relative path.
    """

    seed: int
    num_entities: int
    images_per_entity: int
    query_images_per_entity: int
    image_size: int
    test_fraction: float
    entities: List[Entity]
    knowledge: List[dict]
    images: Dict[str, Image.Image]
    captions: List[dict]
    vqa_train: List[dict]
    vqa_test: List[dict]
    entity_linking_train: List[dict]
    entity_linking_test: List[dict]
    train_entities: List[str]
    test_entities: List[str]
    vocabularies: Dict[str, List[str]]
    chance: dict
    image_entity: Dict[str, str] = field(default_factory=dict)  # image path -> depicted entity id

    def entity(self, entity_id: str) -> Entity:
        return next(e for e in self.entities if e.entity_id == entity_id)

    def metadata(self) -> dict:
        """The content of ``world.json``."""
        return {
            "format_version": FORMAT_VERSION,
            "description": "Synthetic knowledge world (fictional countries, procedural flags): a "
            "controlled proof that the knowledge-retrieval path works, not a benchmark.",
            "seed": self.seed,
            "num_entities": self.num_entities,
            "images_per_entity": self.images_per_entity,
            "query_images_per_entity": self.query_images_per_entity,
            "image_size": self.image_size,
            "test_fraction": self.test_fraction,
            "sizes": {
                "knowledge": len(self.knowledge),
                "images": len(self.images),
                "captions": len(self.captions),
                "vqa_train": len(self.vqa_train),
                "vqa_test": len(self.vqa_test),
                "entity_linking_train": len(self.entity_linking_train),
                "entity_linking_test": len(self.entity_linking_test),
            },
            "splits": {"train_entities": self.train_entities, "test_entities": self.test_entities},
            "question_types": list(QUESTION_TYPES),
            "vocabularies": self.vocabularies,
            "chance": self.chance,
            "entities": [e.to_dict() for e in self.entities],
        }

    def summary(self) -> str:
        """One line describing the world."""
        return (
            f"knowledge world seed={self.seed}: {self.num_entities} countries "
            f"({len(self.train_entities)} train / {len(self.test_entities)} test), "
            f"{len(self.knowledge)} KB entries, {len(self.images)} images {self.image_size}px, "
            f"{len(self.captions)} captions, VQA {len(self.vqa_train)}/{len(self.vqa_test)}, "
            f"EL {len(self.entity_linking_train)}/{len(self.entity_linking_test)} (train/test), "
            f"chance {self.chance['uniform_overall']:.3f}, "
            f"majority-per-type {self.chance['majority_per_type_test_overall']:.3f}"
        )

    def write(self, output_dir) -> Dict[str, Path]:
        """Write the world to `output_dir` atomically and return the paths of what was written.

        Files are built in a temporary sibling folder, which is renamed into place only when
        complete; an existing `output_dir` is replaced only then. Keys of the result: ``root``,
        ``knowledge``, ``images``, ``captions``, ``vqa_train``, ``vqa_test``,
        ``entity_linking_train``, ``entity_linking_test``, ``world``.
        """
        target = Path(output_dir).absolute()
        parent = target.parent
        parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
        try:
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700
            relative = self._write_files(staging)
            if target.exists():
                # Move the old folder aside, swap the new one in, then delete the old one.
                backup = parent / f".{target.name}.old-{uuid.uuid4().hex}"
                os.replace(target, backup)
                try:
                    os.replace(staging, target)
                except BaseException:
                    os.replace(backup, target)
                    raise
                shutil.rmtree(backup)
            else:
                os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        paths = {key: target / rel for key, rel in relative.items()}
        paths["root"] = target
        return paths

    def _write_files(self, root: Path) -> Dict[str, str]:
        files = {
            "knowledge": "knowledge.jsonl",
            "images": "images",
            "captions": "captions.csv",
            "vqa_train": "vqa_train.json",
            "vqa_test": "vqa_test.json",
            "entity_linking_train": "entity_linking_train.jsonl",
            "entity_linking_test": "entity_linking_test.jsonl",
            "world": "world.json",
        }
        (root / files["images"]).mkdir()
        for rel_path, image in self.images.items():
            (root / rel_path).write_bytes(png_bytes(image))

        def write_jsonl(name: str, rows: Sequence[dict]) -> None:
            text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            (root / name).write_text(text, encoding="utf-8")

        def write_json(name: str, obj, indent=None) -> None:
            (root / name).write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")

        write_jsonl(files["knowledge"], self.knowledge)
        with open(root / files["captions"], "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(["image", "caption"])
            for row in self.captions:
                writer.writerow([row["image"], row["caption"]])
        write_json(files["vqa_train"], self.vqa_train)
        write_json(files["vqa_test"], self.vqa_test)
        write_jsonl(files["entity_linking_train"], self.entity_linking_train)
        write_jsonl(files["entity_linking_test"], self.entity_linking_test)
        write_json(files["world"], self.metadata(), indent=2)
        return files


# Independent random streams, so e.g. changing how captions are drawn leaves the flags unchanged.
_STREAM_NAMES, _STREAM_SPLIT, _STREAM_ATTRIBUTES, _STREAM_DESIGNS = 1, 2, 3, 4
_STREAM_RENDER, _STREAM_TEXT, _STREAM_GRAPH, _STREAM_IMAGE_NAMES = 5, 6, 7, 8
_PURPOSE_CAPTION, _PURPOSE_QUERY = 0, 1


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, *stream])


def _balanced_values(rng: np.random.Generator, values: Sequence[str], count: int) -> List[str]:
    """`count` values that use every value as evenly as possible (each at least once when
    count >= len(values)), in random order."""
    offset = rng.integers(len(values))  # which values get the extra copy when count % k != 0
    repeated = [values[(i + offset) % len(values)] for i in range(count)]
    return [repeated[i] for i in rng.permutation(count)]


def _chance_levels(vqa_train: Sequence[dict], vqa_test: Sequence[dict],
                   vocabularies: Dict[str, List[str]]) -> dict:
    """Reference accuracies a model must beat on vqa_test.

    uniform: guessing uniformly among the values of the question's type (1/len(vocabulary));
    the overall figure averages the per-question chance over the test questions.
    majority_per_type: always answering the most frequent train answer of the question's type
    (ties -> alphabetically first), scored on the test questions.
    """
    uniform_per_type = {t: 1.0 / len(vocabularies[t]) for t in QUESTION_TYPES}
    train_counts = {t: Counter() for t in QUESTION_TYPES}
    for row in vqa_train:
        train_counts[row["question_type"]][row["answers"][0]] += 1
    majority_answer = {
        t: min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, counts in train_counts.items() if counts
    }
    hits = {t: 0 for t in QUESTION_TYPES}
    totals = {t: 0 for t in QUESTION_TYPES}
    for row in vqa_test:
        t = row["question_type"]
        totals[t] += 1
        hits[t] += int(row["answers"][0] == majority_answer.get(t))
    n_test = max(1, len(vqa_test))
    return {
        "uniform_per_type": uniform_per_type,
        "uniform_overall": sum(uniform_per_type[r["question_type"]] for r in vqa_test) / n_test,
        "majority_answer_per_type": majority_answer,
        "majority_per_type_test": {t: hits[t] / totals[t] if totals[t] else 0.0 for t in QUESTION_TYPES},
        "majority_per_type_test_overall": sum(hits.values()) / n_test,
    }


def generate_world(
    seed: int = 0,
    num_entities: int = 240,
    images_per_entity: int = 4,
    image_size: int = 32,
    test_fraction: float = 0.25,
    query_images_per_entity: Optional[int] = None,
) -> KnowledgeWorld:
    """Build the synthetic knowledge world, fully determined by `seed`.

    `images_per_entity` caption images are rendered per country for pre-training, and
    `query_images_per_entity` (default: the same number) further renderings per country for the
    VQA and entity-linking records; each query image gets one question per question type and one
    entity-linking record.

    Every answer of vqa_test is guaranteed to occur among the vqa_train answers: attribute values
    are assigned balanced within each split, so each value is used by at least one train country;
    this needs at least max(vocabulary size) = 12 train countries (else ValueError), and is
    re-checked at the end (RuntimeError if ever violated).
    """
    if query_images_per_entity is None:
        query_images_per_entity = images_per_entity
    if not 0.0 < test_fraction < 1.0:
        raise ValueError("test_fraction must be in (0, 1)")
    if images_per_entity < 1 or query_images_per_entity < 1:
        raise ValueError("need at least one caption image and one query image per entity")
    num_test = max(1, int(round(num_entities * test_fraction)))
    num_train = num_entities - num_test
    largest_vocabulary = max(len(v) for v in ATTRIBUTE_VOCABULARIES.values())
    if num_train < largest_vocabulary:
        raise ValueError(
            f"{num_train} train entities cannot cover the {largest_vocabulary} values of the largest "
            "vocabulary; raise num_entities or lower test_fraction"
        )

    # --- names: countries, capitals, rivers (all unique; none contains an answer string) ---
    forbidden = [v for values in ATTRIBUTE_VOCABULARIES.values() for v in values]
    forbidden += [w for v in REGIONS for w in v.split()]
    names = _NameGenerator(_rng(seed, _STREAM_NAMES), forbidden)
    country_names = [names.new(_COUNTRY_SUFFIXES) for _ in range(num_entities)]
    capital_names = [names.new(_CITY_SUFFIXES) for _ in range(num_entities)]
    num_rivers = num_entities // 2
    river_names = [names.new(_RIVER_SUFFIXES) for _ in range(num_rivers)]
    entity_ids = [f"E{i + 1:04d}" for i in range(num_entities)]

    # --- entity-disjoint split ---
    order = _rng(seed, _STREAM_SPLIT).permutation(num_entities)
    test_index = sorted(int(i) for i in order[:num_test])
    train_index = sorted(int(i) for i in order[num_test:])
    split_of = {i: "test" for i in test_index}
    split_of.update({i: "train" for i in train_index})

    # --- attributes: independent of each other and of the flag; balanced within each split ---
    attr_rng = _rng(seed, _STREAM_ATTRIBUTES)
    attributes: List[Dict[str, str]] = [dict() for _ in range(num_entities)]
    for attribute, values in ATTRIBUTE_VOCABULARIES.items():
        for indices in (train_index, test_index):
            for i, value in zip(indices, _balanced_values(attr_rng, values, len(indices))):
                attributes[i][attribute] = value
    founded = []
    for i in range(num_entities):
        century = CENTURY_NUMBERS[CENTURIES.index(attributes[i]["founding_century"])]
        founded.append(int(attr_rng.integers((century - 1) * 100 + 1, century * 100 + 1)))

    designs = _generate_designs(_rng(seed, _STREAM_DESIGNS), num_entities)
    entities = [
        Entity(
            entity_id=entity_ids[i],
            name=country_names[i],
            demonym=demonym(country_names[i]),
            capital=capital_names[i],
            attributes=attributes[i],
            founded=founded[i],
            flag=designs[i],
            split=split_of[i],
        )
        for i in range(num_entities)
    ]

    knowledge = _build_knowledge(seed, entities, river_names)

    # --- images: caption renderings and query renderings, all distinct within an entity ---
    jobs = [(i, _PURPOSE_CAPTION, k) for i in range(num_entities) for k in range(images_per_entity)]
    jobs += [(i, _PURPOSE_QUERY, k) for i in range(num_entities) for k in range(query_images_per_entity)]
    # Opaque, shuffled file names: a file name or its position must not reveal the entity.
    file_numbers = _rng(seed, _STREAM_IMAGE_NAMES).permutation(len(jobs))
    rendered: Dict[Tuple[int, int, int], str] = {}
    images_by_number: Dict[int, Image.Image] = {}
    image_entity: Dict[str, str] = {}
    seen_per_entity: Dict[int, set] = {i: set() for i in range(num_entities)}
    base_flags = [render_flag(d) for d in designs]
    for job, number in zip(jobs, file_numbers):
        i, purpose, k = job
        for attempt in range(100):
            image = render_sample(base_flags[i], _rng(seed, _STREAM_RENDER, i, purpose, k, attempt), image_size)
            key = image.tobytes()
            if key not in seen_per_entity[i]:  # re-draw the (unlikely) exact duplicate
                seen_per_entity[i].add(key)
                break
        else:
            raise RuntimeError("could not render distinct images")
        rel = f"images/img_{int(number):05d}.png"
        rendered[job] = rel
        images_by_number[int(number)] = image
        image_entity[rel] = entity_ids[i]
    images = {f"images/img_{n:05d}.png": images_by_number[n] for n in sorted(images_by_number)}

    text_rng = _rng(seed, _STREAM_TEXT)

    # --- captions (all entities) ---
    captions = []
    for i, entity in enumerate(entities):
        for k in range(images_per_entity):
            template = CAPTION_TEMPLATES[text_rng.integers(len(CAPTION_TEMPLATES))]
            text = template.format(name=entity.name, demonym=entity.demonym, description=entity.flag.describe())
            captions.append({"image": rendered[(i, _PURPOSE_CAPTION, k)], "caption": text})
    _assert_captions_do_not_leak(captions, entities)

    # --- knowledge VQA and entity linking (query images), split by entity ---
    vqa = {"train": [], "test": []}
    linking = {"train": [], "test": []}
    question_id = 0
    link_id = 0
    for i, entity in enumerate(entities):
        for k in range(query_images_per_entity):
            rel = rendered[(i, _PURPOSE_QUERY, k)]
            for question_type in QUESTION_TYPES:
                templates = QUESTION_TEMPLATES[question_type]
                answer = entity.attributes[question_type]
                vqa[entity.split].append({
                    "question_id": question_id,
                    "image": rel,
                    "question": templates[text_rng.integers(len(templates))],
                    "answers": [answer] * VQA_ANSWERS_PER_QUESTION,
                    "entity_id": entity.entity_id,
                    "question_type": question_type,
                })
                question_id += 1
            sentence, mention = ENTITY_LINKING_TEMPLATES[text_rng.integers(len(ENTITY_LINKING_TEMPLATES))]
            start = sentence.index(mention)
            linking[entity.split].append({
                "id": f"el{link_id:06d}",
                "image": rel,
                "sentence": sentence,
                "mention": mention,
                "mention_span": [start, start + len(mention)],
                "entity_id": entity.entity_id,
            })
            link_id += 1

    train_answers = {t: {r["answers"][0] for r in vqa["train"] if r["question_type"] == t} for t in QUESTION_TYPES}
    unseen = [r for r in vqa["test"] if r["answers"][0] not in train_answers[r["question_type"]]]
    if unseen:  # impossible by construction (balanced assignment); kept as a guard
        raise RuntimeError(f"{len(unseen)} test answers never occur in train")

    vocabularies = {t: list(v) for t, v in ATTRIBUTE_VOCABULARIES.items()}
    return KnowledgeWorld(
        seed=seed,
        num_entities=num_entities,
        images_per_entity=images_per_entity,
        query_images_per_entity=query_images_per_entity,
        image_size=image_size,
        test_fraction=test_fraction,
        entities=entities,
        knowledge=knowledge,
        images=images,
        captions=captions,
        vqa_train=vqa["train"],
        vqa_test=vqa["test"],
        entity_linking_train=linking["train"],
        entity_linking_test=linking["test"],
        train_entities=[entity_ids[i] for i in train_index],
        test_entities=[entity_ids[i] for i in test_index],
        vocabularies=vocabularies,
        chance=_chance_levels(vqa["train"], vqa["test"], vocabularies),
        image_entity=image_entity,
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _build_knowledge(seed: int, entities: Sequence[Entity], river_names: Sequence[str]) -> List[dict]:
    """Country entries (stating every attribute), then capital-city and river distractors that
    mention country names, so retrieving by a country name alone is not enough."""
    rng = _rng(seed, _STREAM_GRAPH)
    relations = ("borders", "allied_with", "trades_with")
    n = len(entities)
    knowledge = []
    for i, e in enumerate(entities):
        a = e.attributes
        text = (
            f"{e.name} is a country in the {a['region']} region. Its capital is {e.capital}. "
            f"People speak {a['language'].capitalize()}. Its currency is the {a['currency']}. "
            f"It is {_article(a['government'])} {a['government']} founded in {e.founded} "
            f"({a['founding_century']})."
        )
        others = [j for j in range(n) if j != i]
        tails = rng.choice(others, size=int(rng.integers(1, 4)), replace=False)
        triples = [[relations[rng.integers(len(relations))], entities[int(j)].entity_id] for j in tails]
        knowledge.append({
            "id": e.entity_id,
            "title": e.name,
            "text": text,
            "aliases": [f"the {e.demonym} {a['government']}", f"the {a['government'].capitalize()} of {e.name}"],
            "triples": triples,
            "image": None,
        })
    for i, e in enumerate(entities):
        knowledge.append({
            "id": f"C{i + 1:04d}",
            "title": e.capital,
            "text": f"{e.capital} is the capital and largest city of {e.name}.",
            "aliases": [f"the {e.demonym} capital"],
            "triples": [["capital_of", e.entity_id]],
            "image": None,
        })
    for r, river in enumerate(river_names):
        through = [entities[int(j)] for j in rng.choice(n, size=min(n, int(rng.integers(1, 3))), replace=False)]
        where = " and ".join(c.name for c in through)
        knowledge.append({
            "id": f"R{r + 1:04d}",
            "title": river,
            "text": f"The {river} is a river that flows through {where}.",
            "aliases": [f"the {river} river"],
            "triples": [["flows_through", c.entity_id] for c in through],
            "image": None,
        })
    return knowledge


def leaked_attribute_strings(entities: Sequence[Entity]) -> List[str]:
    """Lower-case strings that must never occur in a caption: every attribute value of every
    vocabulary and every founding year."""
    strings = [v.lower() for values in ATTRIBUTE_VOCABULARIES.values() for v in values]
    strings += [str(e.founded) for e in entities]
    return strings


def _assert_captions_do_not_leak(captions: Sequence[dict], entities: Sequence[Entity]) -> None:
    forbidden = leaked_attribute_strings(entities)
    for row in captions:
        lowered = row["caption"].lower()
        for word in forbidden:
            if word in lowered:
                raise RuntimeError(f"caption {row['caption']!r} leaks {word!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Write the synthetic knowledge world for the REAVL demo.")
    parser.add_argument("--output", required=True, help="output folder (replaced atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-entities", type=int, default=240)
    parser.add_argument("--images-per-entity", type=int, default=4)
    parser.add_argument("--query-images-per-entity", type=int, default=None)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--test-fraction", type=float, default=0.25)
    args = parser.parse_args(argv)
    world = generate_world(
        seed=args.seed,
        num_entities=args.num_entities,
        images_per_entity=args.images_per_entity,
        image_size=args.image_size,
        test_fraction=args.test_fraction,
        query_images_per_entity=args.query_images_per_entity,
    )
    paths = world.write(args.output)
    print(f"{world.summary()} -> {paths['root']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
