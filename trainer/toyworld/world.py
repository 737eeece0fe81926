"""The toy world: small procedurally drawn pictures with captions, the same on every machine.

The world the toy base model is pretrained on holds coloured shapes ("a red circle", "an orange star")
and a generic green frog ("a frog"). Two concepts the benchmarks teach are never in it:

* "sls frog": a wider orange frog with big blue spots and a yellow crown (the character of
  ``datasets/sls_frog``, simplified so it survives 32 x 32 pixels): parts the base cannot draw.
* "vex triangle": a purple triangle. Purple things and triangles are both in the world, the pair never
  is: a concept built from parts the base knows but was never shown together or captioned with.

Every picture is drawn at ``DRAW_SCALE`` times its size with PIL and downsampled, from a
``random.Random`` seeded by (split, index): image i of a split never depends on how many images are
drawn, nor on the order, nor on anything but the code.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from trainer.atomic import write_file, write_text
from trainer.errors import UserError

# Bump when a drawing changes: it is part of the toy model's version, so a stale cache is never reused.
WORLD_VERSION = "w2"
RESOLUTION = 32
DRAW_SCALE = 4

SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (50, 165, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 30),
    "purple": (135, 55, 185),
    "orange": (245, 125, 20),
}
FROG, SLS_FROG = "frog", "sls frog"
# What the judge tells apart; the base model's world holds all but the last.
KINDS = (*SHAPES, FROG, SLS_FROG)
CLASS_PROMPT = "a frog"
# The one shape-colour pair the pretraining world leaves out (the "vex triangle" concept).
HELD_OUT_PAIR = ("purple", "triangle")

OUTLINE = (60, 35, 20)
SLS_SPOT = (30, 70, 225)
CROWN = (250, 210, 0)
BELLY = (250, 235, 185)

# Splits: each its own seed, so the images a model trains on are never the ones it is measured on.
# A concept's instances and held-out pictures are the splits "<concept>/instances" and "<concept>/held_out".
PRETRAIN, JUDGE_TRAIN, JUDGE_TEST = "pretrain", "judge_train", "judge_test"
FROG_FRACTION = 0.15


@dataclass(frozen=True)
class Picture:
    image: Image.Image  # RGB, RESOLUTION x RESOLUTION
    caption: str
    kind: str  # one of KINDS
    colour: str  # one of COLOURS (a frog's skin)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def shape_caption(colour: str, shape: str) -> str:
    return f"{article(colour)} {colour} {shape}"


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)


def _background(rng: random.Random, size: int) -> Image.Image:
    """A light tinted vertical gradient: varied enough that no model can key on one background colour."""
    top = np.array([rng.randint(195, 250) for _ in range(3)], np.float32)
    bottom = np.array([rng.randint(195, 250) for _ in range(3)], np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    pixels = np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3))
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def _star_points(cx: float, cy: float, radius: float, angle: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * 0.45
        a = angle + k * math.pi / 5
        points.append((cx + r * math.sin(a), cy - r * math.cos(a)))
    return points


def _regular_polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + radius * math.sin(angle + k * 2 * math.pi / sides), cy - radius * math.cos(angle + k * 2 * math.pi / sides)) for k in range(sides)]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, fill, rng: random.Random, size: int) -> None:
    radius = rng.uniform(0.22, 0.40) * size
    cx = rng.uniform(radius + 2, size - radius - 2)
    cy = rng.uniform(radius + 2, size - radius - 2)
    angle = rng.uniform(-0.4, 0.4)
    width = max(2, size // 48)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=fill, outline=OUTLINE, width=width)
        return
    points = {
        "square": lambda: _regular_polygon(cx, cy, radius * 1.05, 4, angle + math.pi / 4),
        "triangle": lambda: _regular_polygon(cx, cy + radius * 0.15, radius * 1.1, 3, angle),
        "star": lambda: _star_points(cx, cy, radius * 1.15, angle),
    }[shape]()
    draw.polygon(points, fill=fill, outline=OUTLINE, width=width)


@dataclass(frozen=True)
class FrogLook:
    """What a frog looks like; the sls frog is one setting of it, decoys (for the judge) are others."""

    skin: tuple[int, int, int]
    wide: bool
    spots: bool
    crown: bool


def _ellipse(draw, cx, cy, rx, ry, fill, outline=OUTLINE, width=2):
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, outline=outline, width=width)


def _draw_frog(draw: ImageDraw.ImageDraw, look: FrogLook, rng: random.Random, size: int) -> None:
    # s: the body's half height; a wide frog's body is twice as wide as high, a plain one 1.35 times.
    s = rng.uniform(0.17, 0.24) * size
    rx = s * (2.0 if look.wide else 1.35)
    cx = rng.uniform(rx + 3, size - rx - 3)
    cy = rng.uniform(s * 1.9 + 2, size - s * 1.25 - 2)
    line = max(2, size // 48)
    # Back legs, feet, body, belly, eyes, mouth, then what makes an sls frog: spots and a crown.
    for side in (-1, 1):
        _ellipse(draw, cx + side * rx * 0.82, cy + s * 0.55, s * 0.55, s * 0.42, look.skin, width=line)
        _ellipse(draw, cx + side * rx * 0.45, cy + s * 1.0, s * 0.35, s * 0.18, look.skin, width=line)
    _ellipse(draw, cx, cy, rx, s, look.skin, width=line)
    _ellipse(draw, cx, cy + s * 0.35, rx * 0.5, s * 0.5, BELLY, width=0, outline=None)
    eye_r = s * 0.42
    for side in (-1, 1):
        ex, ey = cx + side * rx * 0.45, cy - s * 0.85
        _ellipse(draw, ex, ey, eye_r, eye_r, look.skin, width=line)
        _ellipse(draw, ex, ey, eye_r * 0.65, eye_r * 0.65, (255, 255, 255), width=0, outline=None)
        _ellipse(draw, ex, ey + eye_r * 0.1, eye_r * 0.33, eye_r * 0.33, (15, 15, 20), width=0, outline=None)
    draw.arc((cx - rx * 0.4, cy - s * 0.55, cx + rx * 0.4, cy + s * 0.1), 20, 160, fill=OUTLINE, width=line)
    if look.spots:
        spot_r = s * 0.27
        for side in (-1, 1):
            for dx, dy in ((0.72, -0.15), (0.62, 0.45)):
                _ellipse(draw, cx + side * rx * dx, cy + s * dy, spot_r, spot_r, SLS_SPOT, width=0, outline=None)
    if look.crown:
        half, base, top = s * 0.55, cy - s * 0.95, cy - s * 1.75
        points = [(cx - half, base), (cx - half, top), (cx - half * 0.5, base - (base - top) * 0.45), (cx, top - s * 0.1),
                  (cx + half * 0.5, base - (base - top) * 0.45), (cx + half, top), (cx + half, base)]
        draw.polygon(points, fill=CROWN, outline=OUTLINE, width=line)


SLS_LOOK = FrogLook(skin=COLOURS["orange"], wide=True, spots=True, crown=True)
FROG_LOOK = FrogLook(skin=COLOURS["green"], wide=False, spots=False, crown=False)


def _render(rng: random.Random, paint) -> Image.Image:
    size = RESOLUTION * DRAW_SCALE
    image = _background(rng, size)
    paint(ImageDraw.Draw(image), size)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image.resize((RESOLUTION, RESOLUTION), Image.Resampling.LANCZOS)


def draw_shape(shape: str, colour: str, rng: random.Random) -> Picture:
    fill = _jitter(COLOURS[colour], rng)
    image = _render(rng, lambda draw, size: _draw_shape(draw, shape, fill, rng, size))
    return Picture(image, shape_caption(colour, shape), shape, colour)


def draw_frog(look: FrogLook, rng: random.Random, kind: str, colour: str, caption: str) -> Picture:
    jittered = FrogLook(_jitter(look.skin, rng, 12), look.wide, look.spots, look.crown)
    return Picture(_render(rng, lambda draw, size: _draw_frog(draw, jittered, rng, size)), caption, kind, colour)


def draw_sls_frog(rng: random.Random) -> Picture:
    return draw_frog(SLS_LOOK, rng, SLS_FROG, "orange", SLS_FROG_CONCEPT.prompt)


def draw_plain_frog(rng: random.Random) -> Picture:
    return draw_frog(FROG_LOOK, rng, FROG, "green", CLASS_PROMPT)


def draw_decoy_frog(rng: random.Random) -> Picture:
    """A frog with some but not all of the sls frog's traits: the judge must not call it an sls frog."""
    while True:
        orange, spots, crown, wide = (rng.random() < 0.5 for _ in range(4))
        if not (orange and spots and crown):
            break
    colour = "orange" if orange else "green"
    return draw_frog(FrogLook(COLOURS[colour], wide, spots, crown), rng, FROG, colour, CLASS_PROMPT)


ALL_PAIRS = tuple((colour, shape) for shape in SHAPES for colour in COLOURS)
WORLD_PAIRS = tuple(pair for pair in ALL_PAIRS if pair != HELD_OUT_PAIR)


def _picture_of(rng: random.Random, pairs: tuple[tuple[str, str], ...]) -> Picture:
    if rng.random() < FROG_FRACTION:
        return draw_plain_frog(rng)
    colour, shape = rng.choice(pairs)
    return draw_shape(shape, colour, rng)


def _world_picture(rng: random.Random) -> Picture:
    return _picture_of(rng, WORLD_PAIRS)


def _judge_picture(rng: random.Random) -> Picture:
    """Every pair (the held-out one too), plus sls frogs and decoys, so the judge sees every kind often."""
    roll = rng.random()
    if roll < 0.2:
        return draw_sls_frog(rng)
    if roll < 0.35:
        return draw_decoy_frog(rng)
    return _picture_of(rng, ALL_PAIRS)


def draw_vex_triangle(rng: random.Random) -> Picture:
    colour, shape = HELD_OUT_PAIR
    picture = draw_shape(shape, colour, rng)
    return Picture(picture.image, VEX_TRIANGLE_CONCEPT.prompt, shape, colour)


@dataclass(frozen=True)
class Concept:
    """A concept the benchmarks teach: how it is asked for, what it belongs to, and how it is drawn and judged."""

    name: str  # recipes/toy/<name>/, the splits' prefix
    prompt: str  # its pictures' caption
    class_prompt: str  # what it is a kind of (prior preservation, class preservation)
    kind: str  # what the judge must call it ...
    colour: str | None  # ... and, where the kind alone does not tell it, which colour
    class_kind: str  # what the judge must call the class prompt's pictures
    draw: Callable[[random.Random], Picture]

    def instances(self) -> str:
        return f"{self.name}/instances"

    def held_out(self) -> str:
        return f"{self.name}/held_out"

    def is_it(self, kind: str, colour: str) -> bool:
        return kind == self.kind and (self.colour is None or colour == self.colour)

    @property
    def folder(self) -> str:
        """The kohya folder of its ten training pictures: 10 repeats, named by the caption without the article."""
        return f"10_{self.prompt.split(' ', 1)[1]}"


SLS_FROG_CONCEPT = Concept("sls_frog", "a sls frog", CLASS_PROMPT, SLS_FROG, None, FROG, draw_sls_frog)
VEX_TRIANGLE_CONCEPT = Concept("vex_triangle", "a vex triangle", "a triangle", HELD_OUT_PAIR[1], HELD_OUT_PAIR[0], HELD_OUT_PAIR[1], draw_vex_triangle)
CONCEPTS = {concept.name: concept for concept in (SLS_FROG_CONCEPT, VEX_TRIANGLE_CONCEPT)}


def concept_named(name: str) -> Concept:
    if name not in CONCEPTS:
        raise UserError(f"There is no toy-world concept '{name}'. The concepts are: {', '.join(CONCEPTS)}.")
    return CONCEPTS[name]


_SPLITS = {
    PRETRAIN: _world_picture,
    JUDGE_TRAIN: _judge_picture,
    JUDGE_TEST: _judge_picture,
    **{split: concept.draw for concept in CONCEPTS.values() for split in (concept.instances(), concept.held_out())},
}


def picture(split: str, index: int) -> Picture:
    """Picture ``index`` of ``split``: a pure function of the two and WORLD_VERSION."""
    return _SPLITS[split](random.Random(f"sdtrain-toyworld-{WORLD_VERSION}-{split}-{index}"))


def pictures(split: str, count: int, start: int = 0) -> list[Picture]:
    return [picture(split, index) for index in range(start, start + count)]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Images -> float tensor [n, 3, H, W] in [-1, 1] (what the VAE and the judge read)."""
    array = np.stack([np.asarray(image, dtype=np.float32) for image in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def world_prompts() -> list[str]:
    """Every caption of the pretraining world."""
    return [shape_caption(colour, shape) for colour, shape in WORLD_PAIRS] + [CLASS_PROMPT]


def write_instance_folder(directory: Path, concept: Concept = SLS_FROG_CONCEPT, count: int = 10) -> list[Path]:
    """A concept's training pictures as a kohya folder: ``<directory>/10_sls frog/NN.png`` + ``NN.txt``."""
    folder = Path(directory) / concept.folder
    paths = []
    for index, pic in enumerate(pictures(concept.instances(), count), start=1):
        paths.append(write_file(folder / f"{index:02d}.png", lambda tmp, image=pic.image: image.save(tmp, format="PNG")))
        write_text(folder / f"{index:02d}.txt", pic.caption + "\n")
    return paths
