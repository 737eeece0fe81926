#!/usr/bin/env python3
"""Draw the example datasets shipped with sdtrain.

Everything here is original, procedurally drawn artwork (PIL + numpy only, no
third-party images), so it can be released with the project.  The script is
deterministic: every random choice comes from a ``random.Random`` seeded with a
fixed value, so running it again rewrites the same bytes.

    python datasets/draw_examples.py            # regenerate everything
    python datasets/draw_examples.py --sheet /tmp/sheet.png   # + a contact sheet

Outputs (relative to this file's folder):

    sls_frog/10_sls frog/NN.png (+ NN.txt)   one character, "sls frog"
    tagged_example/5_tagged/NN.png + NN.txt  booru-style tag captions

Images are drawn at 4x the output size and downsampled with LANCZOS.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageOps

HERE = Path(__file__).resolve().parent
SS = 4  # supersampling factor
SEED = 20240917
SPRITE = 1000  # sprite canvas size (px) that character geometry is written in

# --------------------------------------------------------------------------
# palettes
# --------------------------------------------------------------------------

OUTLINE = (52, 24, 12, 255)

SLS = dict(  # the "sls frog" character
    skin=(250, 128, 18, 255),
    belly=(255, 222, 150, 255),
    spot=(28, 86, 228, 255),
    mouth=(150, 30, 30, 255),
    crown=True,
)
MINT = dict(  # a different frog for the tagged dataset
    skin=(92, 200, 96, 255),
    belly=(220, 245, 200, 255),
    spot=(236, 92, 168, 255),
    mouth=(40, 90, 40, 255),
    crown=False,
)

CROWN = (255, 212, 0, 255)
CROWN_DARK = (170, 120, 0, 255)
JEWEL = (225, 30, 60, 255)


def _e(d: ImageDraw.ImageDraw, cx, cy, rx, ry, fill, w=14, outline=OUTLINE):
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill, outline=outline, width=w)


def _poly(d, pts, fill, w=14, outline=OUTLINE):
    d.polygon(pts, fill=fill)
    if w:
        d.line(list(pts) + [pts[0]], fill=outline, width=w, joint="curve")
        for x, y in pts:
            d.ellipse((x - w / 2, y - w / 2, x + w / 2, y + w / 2), fill=outline)


def _limb(d, p0, p1, r, fill, w=14):
    """A thick rounded segment from p0 to p1 with radius r (outlined)."""
    (x0, y0), (x1, y1) = p0, p1
    ang = math.atan2(y1 - y0, x1 - x0)
    nx, ny = -math.sin(ang) * r, math.cos(ang) * r
    quad = [(x0 + nx, y0 + ny), (x1 + nx, y1 + ny), (x1 - nx, y1 - ny), (x0 - nx, y0 - ny)]
    d.polygon(quad, fill=fill)
    d.line([quad[0], quad[1]], fill=OUTLINE, width=w)
    d.line([quad[3], quad[2]], fill=OUTLINE, width=w)
    for x, y in (p0, p1):
        d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    # rounded caps with outline only on the far side
    for (x, y), a0 in ((p0, ang + math.pi / 2), (p1, ang - math.pi / 2)):
        d.arc((x - r, y - r, x + r, y + r), math.degrees(a0), math.degrees(a0) + 180,
              fill=OUTLINE, width=w)


def _foot(d, x, y, direction, size, fill):
    """Webbed foot: three toes fanning out, toe pads at the tips."""
    for k in (-1, 0, 1):
        a = direction + k * 0.55
        tx, ty = x + math.cos(a) * size, y + math.sin(a) * size
        _limb(d, (x, y), (tx, ty), size * 0.17, fill, w=10)
    for k in (-1, 0, 1):
        a = direction + k * 0.55
        tx, ty = x + math.cos(a) * size, y + math.sin(a) * size
        _e(d, tx, ty, size * 0.22, size * 0.22, fill, w=10)


def _eye(d, cx, cy, r, skin, look=(0.0, 0.15), closed=False):
    _e(d, cx, cy, r, r, skin)
    _e(d, cx, cy, r * 0.74, r * 0.74, (255, 255, 255, 255), w=8)
    if closed:
        d.arc((cx - r * 0.5, cy - r * 0.35, cx + r * 0.5, cy + r * 0.35), 10, 170,
              fill=(20, 20, 20, 255), width=16)
        return
    px, py = cx + look[0] * r * 0.3, cy + look[1] * r * 0.3
    _e(d, px, py, r * 0.4, r * 0.4, (15, 15, 25, 255), w=0)
    _e(d, px - r * 0.15, py - r * 0.17, r * 0.13, r * 0.13, (255, 255, 255, 255), w=0)


def _crown(d, cx, base_y, width, height):
    x0, x1 = cx - width / 2, cx + width / 2
    top = base_y - height
    pts = [(x0, base_y), (x0 - width * 0.06, top + height * 0.15),
           (x0 + width * 0.25, top + height * 0.55), (cx, top),
           (x1 - width * 0.25, top + height * 0.55), (x1 + width * 0.06, top + height * 0.15),
           (x1, base_y)]
    _poly(d, pts, CROWN, w=12, outline=CROWN_DARK)
    d.line([(x0 + 6, base_y - height * 0.12), (x1 - 6, base_y - height * 0.12)],
           fill=CROWN_DARK, width=8)
    _e(d, cx, base_y - height * 0.35, width * 0.1, width * 0.1, JEWEL, w=6, outline=CROWN_DARK)
    for x, y in pts[1], pts[3], pts[5]:
        _e(d, x, y, width * 0.06, width * 0.06, CROWN, w=6, outline=CROWN_DARK)


def _hat(d, kind, cx, base_y, width):
    if kind == "top hat":
        _poly(d, [(cx - width * 0.8, base_y), (cx + width * 0.8, base_y),
                  (cx + width * 0.8, base_y - width * 0.18), (cx - width * 0.8, base_y - width * 0.18)],
              (30, 30, 40, 255), w=10)
        _poly(d, [(cx - width * 0.5, base_y - width * 0.15), (cx + width * 0.5, base_y - width * 0.15),
                  (cx + width * 0.45, base_y - width * 1.1), (cx - width * 0.45, base_y - width * 1.1)],
              (30, 30, 40, 255), w=10)
        d.rectangle((cx - width * 0.49, base_y - width * 0.42, cx + width * 0.49, base_y - width * 0.28),
                    fill=(200, 30, 40, 255))
    elif kind == "party hat":
        _poly(d, [(cx - width * 0.5, base_y), (cx + width * 0.5, base_y), (cx, base_y - width * 1.2)],
              (150, 60, 220, 255), w=10)
        for t in (0.3, 0.6):
            y = base_y - width * 1.2 * t
            hw = width * 0.5 * (1 - t)
            d.line([(cx - hw, y), (cx + hw, y)], fill=(255, 230, 60, 255), width=22)
        _e(d, cx, base_y - width * 1.2, width * 0.16, width * 0.16, (255, 230, 60, 255), w=8)
    elif kind == "bow":
        c = (235, 60, 120, 255)
        _poly(d, [(cx, base_y), (cx - width * 0.55, base_y - width * 0.35),
                  (cx - width * 0.55, base_y + width * 0.3)], c, w=10)
        _poly(d, [(cx, base_y), (cx + width * 0.55, base_y - width * 0.35),
                  (cx + width * 0.55, base_y + width * 0.3)], c, w=10)
        _e(d, cx, base_y, width * 0.14, width * 0.14, c, w=10)


def _spots(d, spots, color):
    for x, y, r in spots:
        _e(d, x, y, r, r, color, w=8, outline=(10, 40, 130, 255) if color == SLS["spot"] else OUTLINE)


# --------------------------------------------------------------------------
# frog sprites (1000x1000 RGBA, feet at y ~ 930)
# --------------------------------------------------------------------------

def frog_sit(pal, hat=None, closed_eyes=False, open_mouth=False) -> Image.Image:
    im = Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    skin, belly, spot = pal["skin"], pal["belly"], pal["spot"]
    # back feet, then folded thighs
    _foot(d, 170, 905, math.pi * 1.02, 120, skin)
    _foot(d, 830, 905, -math.pi * 0.02, 120, skin)
    _e(d, 215, 770, 150, 125, skin)
    _e(d, 785, 770, 150, 125, skin)
    # body / head: one wide blob
    _e(d, 500, 640, 360, 300, skin)
    _e(d, 500, 760, 215, 170, belly, w=10)
    _spots(d, [(250, 560, 48), (190, 690, 34), (750, 560, 48), (810, 690, 34),
               (330, 430, 30), (670, 430, 30), (160, 790, 30), (840, 790, 30),
               (260, 840, 26), (740, 840, 26)], spot)
    # front arms and hands
    for x, s in ((360, -1), (640, 1)):
        _limb(d, (x, 720), (x + s * 25, 890), 42, skin)
        _foot(d, x + s * 25, 905, math.pi / 2 + s * 0.9, 70, skin)
    # eyes on top
    _eye(d, 335, 360, 125, skin, closed=closed_eyes)
    _eye(d, 665, 360, 125, skin, closed=closed_eyes)
    # mouth
    if open_mouth:
        d.chord((370, 470, 630, 640), 0, 180, fill=pal["mouth"], outline=OUTLINE, width=12)
        d.chord((440, 560, 560, 630), 180, 360, fill=(240, 110, 120, 255))
    else:
        d.arc((330, 380, 670, 600), 25, 155, fill=OUTLINE, width=16)
    for x in (455, 545):
        _e(d, x, 470, 9, 9, OUTLINE, w=0)
    if pal["crown"]:
        _crown(d, 500, 340, 150, 150)
    if hat:
        _hat(d, hat, 500, 330, 210)
    return im


def frog_jump(pal, hat=None) -> Image.Image:
    im = Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    skin, belly, spot = pal["skin"], pal["belly"], pal["spot"]
    # long back legs stretched out behind/below, feet trailing
    for s in (-1, 1):
        hip = (500 + s * 150, 640)
        knee = (500 + s * 290, 790)
        ankle = (500 + s * 330, 910)
        _limb(d, hip, knee, 78, skin)
        _limb(d, knee, ankle, 50, skin)
        _foot(d, ankle[0], ankle[1], math.pi / 2 + s * 0.45, 105, skin)
        _spots(d, [(hip[0] + s * 80, hip[1] + 60, 30)], spot)
    # body
    _e(d, 500, 500, 260, 290, skin)
    _e(d, 500, 600, 150, 170, belly, w=10)
    # arms reaching up/out
    for s in (-1, 1):
        _limb(d, (500 + s * 200, 440), (500 + s * 390, 290), 44, skin)
        _foot(d, 500 + s * 390, 290, -math.pi / 2 + s * 0.7, 80, skin)
    _spots(d, [(305, 560, 42), (695, 560, 42), (345, 690, 30), (655, 690, 30),
               (300, 400, 28), (700, 400, 28), (500, 315, 26)], spot)
    _eye(d, 360, 245, 112, skin, look=(0, -0.4))
    _eye(d, 640, 245, 112, skin, look=(0, -0.4))
    d.chord((400, 330, 600, 450), 0, 180, fill=pal["mouth"], outline=OUTLINE, width=12)
    if pal["crown"]:
        _crown(d, 500, 215, 150, 150)
    if hat:
        _hat(d, hat, 500, 215, 190)
    return im


def frog_side(pal, hat=None) -> Image.Image:
    """Side view, facing right."""
    im = Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    skin, belly, spot = pal["skin"], pal["belly"], pal["spot"]
    # far-side legs (slightly darker)
    far = tuple(int(c * 0.78) for c in skin[:3]) + (255,)
    _limb(d, (700, 720), (760, 895), 38, far)
    _foot(d, 770, 905, 0.15, 70, far)
    # body: tilted egg, head at the right
    body = Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
    bd = ImageDraw.Draw(body)
    _e(bd, 500, 600, 360, 230, skin)
    bd.chord((170, 560, 830, 840), 0, 180, fill=belly)
    bd.arc((140, 370, 860, 830), 5, 175, fill=OUTLINE, width=14)
    _spots(bd, [(330, 480, 44), (470, 430, 36), (250, 600, 34), (420, 560, 30), (600, 470, 26)], spot)
    body = body.rotate(12, resample=Image.BICUBIC, center=(500, 600))
    im.alpha_composite(body)
    # big folded back leg
    _e(d, 300, 720, 190, 140, skin)
    _spots(d, [(250, 680, 36), (360, 760, 26)], spot)
    _limb(d, (220, 820), (500, 900), 40, skin)
    _foot(d, 520, 905, 0.1, 110, skin)
    # near front leg
    _limb(d, (660, 700), (700, 890), 42, skin)
    _foot(d, 705, 905, 0.3, 75, skin)
    # eye, mouth, crown
    _eye(d, 680, 400, 118, skin, look=(0.8, 0.1))
    d.arc((640, 420, 880, 600), 10, 95, fill=OUTLINE, width=16)
    _e(d, 850, 500, 9, 9, OUTLINE, w=0)
    if pal["crown"]:
        _crown(d, 540, 400, 140, 145)
    if hat:
        _hat(d, hat, 560, 390, 190)
    return im


# --------------------------------------------------------------------------
# a second character for the tagged dataset: "blob cat"
# --------------------------------------------------------------------------

def blob_cat(fur=(150, 150, 165, 255), hat=None, closed_eyes=False) -> Image.Image:
    im = Image.new("RGBA", (SPRITE, SPRITE), (0, 0, 0, 0))
    d = ImageDraw.Draw(im)
    light = (235, 235, 240, 255)
    # tail
    d.arc((600, 430, 960, 900), 270, 80, fill=OUTLINE, width=92)
    d.arc((612, 442, 948, 888), 270, 80, fill=fur, width=66)
    # ears
    _poly(d, [(250, 380), (290, 130), (440, 300)], fur)
    _poly(d, [(750, 380), (710, 130), (560, 300)], fur)
    _poly(d, [(285, 330), (300, 200), (390, 300)], (245, 170, 185, 255), w=0)
    _poly(d, [(715, 330), (700, 200), (610, 300)], (245, 170, 185, 255), w=0)
    # body blob
    _e(d, 500, 620, 330, 310, fur)
    _e(d, 500, 720, 190, 180, light, w=10)
    # stripes
    for x in (420, 500, 580):
        d.line([(x, 320), (x, 390)], fill=(90, 90, 105, 255), width=22)
    # eyes
    for x in (390, 610):
        if closed_eyes:
            d.arc((x - 50, 440, x + 50, 520), 200, 340, fill=(20, 20, 20, 255), width=18)
        else:
            _e(d, x, 480, 55, 62, (250, 220, 60, 255), w=10)
            _e(d, x, 485, 18, 45, (15, 15, 20, 255), w=0)
    # nose, mouth, whiskers
    _poly(d, [(475, 540), (525, 540), (500, 570)], (240, 120, 140, 255), w=6)
    d.arc((440, 545, 500, 610), 0, 150, fill=OUTLINE, width=10)
    d.arc((500, 545, 560, 610), 30, 180, fill=OUTLINE, width=10)
    for s in (-1, 1):
        for k in (-1, 0, 1):
            d.line([(500 + s * 120, 570 + k * 18), (500 + s * 300, 545 + k * 45)],
                   fill=OUTLINE, width=8)
    # paws
    for x in (380, 620):
        _e(d, x, 905, 80, 45, fur)
    if hat:
        _hat(d, hat, 500, 310, 170)
    return im


# --------------------------------------------------------------------------
# backgrounds (drawn at SS x output size)
# --------------------------------------------------------------------------

def _gradient(w, h, top, bottom):
    t = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    a = np.array(top, np.float32)[None, None, :3]
    b = np.array(bottom, np.float32)[None, None, :3]
    arr = a * (1 - t) + b * t
    arr = np.broadcast_to(arr, (h, w, 3))
    return Image.fromarray(np.round(arr).astype(np.uint8), "RGB").convert("RGBA")


def _clouds(im, rng, n, y_max):
    d = ImageDraw.Draw(im)
    w, h = im.size
    for _ in range(n):
        cx, cy = rng.uniform(0, w), rng.uniform(h * 0.05, y_max)
        s = rng.uniform(0.06, 0.12) * w
        for dx, dy, r in ((-1.0, 0.2, 0.7), (0, 0, 1.0), (1.0, 0.2, 0.75), (0.5, 0.35, 0.7), (-0.5, 0.35, 0.7)):
            d.ellipse((cx + dx * s - r * s, cy + dy * s - r * s * 0.8,
                       cx + dx * s + r * s, cy + dy * s + r * s * 0.8), fill=(255, 255, 255, 255))


def bg_grass(w, h, rng, horizon=0.55, night=False):
    sky = ((20, 24, 70), (60, 60, 120)) if night else ((120, 190, 250), (200, 235, 255))
    im = _gradient(w, h, *sky)
    d = ImageDraw.Draw(im)
    hy = int(h * horizon)
    if night:
        for _ in range(40):
            x, y = rng.uniform(0, w), rng.uniform(0, hy)
            r = rng.uniform(2, 5) * w / 512
            d.ellipse((x - r, y - r, x + r, y + r), fill=(255, 255, 230, 255))
        mx, my, mr = w * 0.8, h * 0.16, w * 0.09
        d.ellipse((mx - mr, my - mr, mx + mr, my + mr), fill=(250, 245, 200, 255))
        d.ellipse((mx - mr * 0.4, my - mr * 1.1, mx + mr * 1.5, my + mr * 0.6), fill=(30, 30, 80, 255))
    else:
        _clouds(im, rng, 3, hy * 0.7)
        d = ImageDraw.Draw(im)
    ground = (40, 110, 40) if night else (95, 180, 70)
    # rolling hill top edge
    pts = [(0, h)]
    for i in range(0, 33):
        x = w * i / 32
        pts.append((x, hy + math.sin(i * 0.6 + rng.uniform(0, 0.3)) * h * 0.02))
    pts.append((w, h))
    d.polygon(pts, fill=ground + (255,))
    dark = tuple(max(0, c - 35) for c in ground) + (255,)
    for _ in range(int(w * h / 2500)):
        x, y = rng.uniform(0, w), rng.uniform(hy + h * 0.03, h)
        L = rng.uniform(10, 26) * w / 512 * (0.6 + y / h)
        d.line([(x, y), (x + rng.uniform(-6, 6), y - L)], fill=dark, width=max(2, int(w / 256)))
    return im


def bg_pond(w, h, rng, horizon=0.35):
    im = _gradient(w, h, (150, 205, 250), (215, 240, 255))
    _clouds(im, rng, 2, h * horizon * 0.6)
    d = ImageDraw.Draw(im)
    hy = int(h * horizon)
    # far reeds bank
    d.rectangle((0, hy - h * 0.04, w, hy + h * 0.01), fill=(70, 140, 70, 255))
    water = _gradient(w, h - hy, (70, 150, 200), (40, 100, 170))
    im.alpha_composite(water, (0, hy))
    d = ImageDraw.Draw(im)
    for _ in range(14):
        x, y = rng.uniform(0, w), rng.uniform(hy + h * 0.05, h)
        rw = rng.uniform(0.05, 0.14) * w
        d.arc((x - rw, y - rw * 0.2, x + rw, y + rw * 0.2), 200, 340, fill=(170, 215, 240, 255),
              width=max(3, int(w / 170)))
    return im


def lily_pad(d, cx, cy, rx):
    ry = rx * 0.38
    d.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=(60, 160, 60, 255), outline=(25, 80, 30, 255),
              width=max(6, int(rx / 25)))
    d.pieslice((cx - rx, cy - ry, cx + rx, cy + ry), 250, 290, fill=(55, 120, 180, 255))
    d.line([(cx, cy), (cx - rx * 0.6, cy + ry * 0.3)], fill=(40, 120, 40, 255), width=max(4, int(rx / 40)))
    d.line([(cx, cy), (cx + rx * 0.6, cy + ry * 0.3)], fill=(40, 120, 40, 255), width=max(4, int(rx / 40)))


def bg_sky(w, h, rng):
    im = _gradient(w, h, (90, 170, 245), (190, 230, 255))
    _clouds(im, rng, 5, h * 0.95)
    return im


def bg_plain(w, h, color):
    return Image.new("RGBA", (w, h), tuple(color) + (255,))


def bg_shapes(w, h, rng, base=(250, 235, 245)):
    im = bg_plain(w, h, base)
    d = ImageDraw.Draw(im)
    cols = [(200, 235, 210), (255, 245, 190), (215, 215, 250), (250, 205, 220)]
    for _ in range(9):
        c = rng.choice(cols) + (255,)
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.06, 0.16) * w
        k = rng.randrange(3)
        if k == 0:
            d.ellipse((x - r, y - r, x + r, y + r), fill=c)
        elif k == 1:
            d.rectangle((x - r, y - r, x + r, y + r), fill=c)
        else:
            d.polygon([(x, y - r), (x + r, y + r * 0.8), (x - r, y + r * 0.8)], fill=c)
    return im


def bg_stars(w, h, rng):
    im = _gradient(w, h, (30, 25, 80), (80, 50, 130))
    d = ImageDraw.Draw(im)
    for _ in range(10):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.02, 0.045) * w
        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((x + math.cos(a) * rr, y + math.sin(a) * rr))
        d.polygon(pts, fill=(255, 230, 110, 255))
    return im


# --------------------------------------------------------------------------
# compositing helpers
# --------------------------------------------------------------------------

def place(canvas: Image.Image, sprite: Image.Image, cx, foot_y, height, mirror=False, angle=0.0,
          shadow=True):
    """Paste `sprite` (drawn with feet at y~930 of SPRITE) centred at cx with its
    feet at foot_y and total sprite height `height` (canvas px)."""
    spr = ImageOps.mirror(sprite) if mirror else sprite
    if angle:
        spr = spr.rotate(angle, resample=Image.BICUBIC, center=(500, 930))
    s = height / SPRITE
    size = max(1, round(SPRITE * s))
    spr = spr.resize((size, size), Image.LANCZOS)
    x = round(cx - size / 2)
    y = round(foot_y - 930 * s)
    if shadow:
        sh = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        sd = ImageDraw.Draw(sh)
        rx, ry = size * 0.36, size * 0.05
        sd.ellipse((cx - rx, foot_y - ry, cx + rx, foot_y + ry), fill=(0, 0, 0, 70))
        canvas.alpha_composite(sh.filter(ImageFilter.GaussianBlur(size * 0.015)))
    # alpha_composite needs in-bounds offsets: crop the sprite to the canvas
    x0, y0 = max(0, x), max(0, y)
    x1, y1 = min(canvas.width, x + size), min(canvas.height, y + size)
    if x1 > x0 and y1 > y0:
        canvas.alpha_composite(spr.crop((x0 - x, y0 - y, x1 - x, y1 - y)), (x0, y0))


def finish(canvas: Image.Image, w: int, h: int) -> Image.Image:
    return canvas.convert("RGB").resize((w, h), Image.LANCZOS)


def save_png(im: Image.Image, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    # plain 8-bit RGB, no metadata (so reruns are byte-identical)
    im.convert("RGB").save(path, format="PNG", optimize=True)


# --------------------------------------------------------------------------
# dataset 1: sls_frog (one character, natural-language captions)
# --------------------------------------------------------------------------

def sls_frog_images():
    """Yield (name, (w, h), draw_fn(W, H, rng) -> RGBA canvas, caption or None)."""

    def s01(W, H, rng):  # sitting on grass, medium
        c = bg_grass(W, H, rng, horizon=0.5)
        place(c, frog_sit(SLS), W * 0.5, H * 0.88, H * 0.72)
        return c

    def s02(W, H, rng):  # on a lily pad in a pond
        c = bg_pond(W, H, rng)
        lily_pad(ImageDraw.Draw(c), W * 0.48, H * 0.8, W * 0.4)
        place(c, frog_sit(SLS), W * 0.48, H * 0.8, H * 0.6, shadow=False)
        return c

    def s03(W, H, rng):  # 160x112: jumping through the sky
        c = bg_sky(W, H, rng)
        place(c, frog_jump(SLS), W * 0.55, H * 0.93, H * 0.9, angle=-12, shadow=False)
        return c

    def s04(W, H, rng):  # side view filling the frame, plain tinted bg
        c = bg_plain(W, H, (205, 235, 215))
        place(c, frog_side(SLS), W * 0.5, H * 0.96, W * 1.05)
        return c

    def s05(W, H, rng):  # 112x160: small frog in tall portrait grass scene
        c = bg_grass(W, H, rng, horizon=0.62)
        place(c, frog_sit(SLS), W * 0.42, H * 0.9, W * 0.45)
        return c

    def s06(W, H, rng):  # mirrored side view, shapes background
        c = bg_shapes(W, H, rng)
        place(c, frog_side(SLS), W * 0.48, H * 0.9, W * 0.82, mirror=True)
        return c

    def s07(W, H, rng):  # 192x128: wide meadow, small frog on the right, side view
        c = bg_grass(W, H, rng, horizon=0.55)
        place(c, frog_side(SLS), W * 0.68, H * 0.9, H * 0.55)
        return c

    def s08(W, H, rng):  # close-up of the face
        c = bg_plain(W, H, (255, 240, 200))
        place(c, frog_sit(SLS, open_mouth=True), W * 0.5, H * 1.45, H * 1.55, shadow=False)
        return c

    def s09(W, H, rng):  # mirrored jump over the pond
        c = bg_pond(W, H, rng, horizon=0.45)
        place(c, frog_jump(SLS), W * 0.45, H * 0.85, H * 0.72, mirror=True, angle=10, shadow=False)
        return c

    def s10(W, H, rng):  # sitting, slightly off-centre, plain lavender bg (no caption file)
        c = bg_plain(W, H, (222, 215, 245))
        place(c, frog_sit(SLS), W * 0.58, H * 0.9, H * 0.62)
        return c

    def s11(W, H, rng):  # 128x160 night grass
        c = bg_grass(W, H, rng, horizon=0.6, night=True)
        place(c, frog_sit(SLS, closed_eyes=True), W * 0.5, H * 0.9, W * 0.62)
        return c

    return [
        ("01", (128, 128), s01, "sls frog, sitting in the grass, blue sky with clouds"),
        ("02", (128, 128), s02, "sls frog, sitting on a lily pad, pond background"),
        ("03", (160, 112), s03, "sls frog, jumping through the sky, clouds"),
        ("04", (128, 128), s04, "sls frog, side view, close up, plain green background"),
        ("05", (112, 160), s05, "sls frog, small, sitting in a meadow, tall picture"),
        ("06", (128, 128), s06, "sls frog, side view facing left, pastel shapes background"),
        ("07", (192, 128), s07, "sls frog, side view, small in a wide grassy meadow"),
        ("08", (128, 128), s08, "sls frog, close-up of the face, open mouth, cream background"),
        ("09", (128, 128), s09, "sls frog, leaping over a pond"),
        ("10", (128, 128), s10, None),  # no sidecar: falls back to the folder words "sls frog"
        ("11", (128, 160), s11, "sls frog, eyes closed, sitting in the grass at night, moon and stars"),
    ]


# --------------------------------------------------------------------------
# dataset 2: tagged_example (booru-style tags)
# --------------------------------------------------------------------------

def tagged_images():
    def mk(bg, sprite, cx=0.5, foot=0.9, height=0.72, mirror=False, angle=0.0, pad=False, shadow=True):
        def f(W, H, rng):
            c = bg(W, H, rng)
            if pad:
                lily_pad(ImageDraw.Draw(c), W * cx, H * foot, W * 0.4)
            place(c, sprite(), W * cx, H * foot, H * height, mirror=mirror, angle=angle,
                  shadow=shadow and not pad)
            return c
        return f

    white = lambda W, H, rng: bg_plain(W, H, (255, 255, 255))
    blue = lambda W, H, rng: bg_plain(W, H, (200, 225, 250))
    pink = lambda W, H, rng: bg_plain(W, H, (252, 222, 232))
    grass = lambda W, H, rng: bg_grass(W, H, rng)
    night = lambda W, H, rng: bg_grass(W, H, rng, night=True)
    pond = lambda W, H, rng: bg_pond(W, H, rng)
    sky = lambda W, H, rng: bg_sky(W, H, rng)

    def duo(W, H, rng):
        c = bg_grass(W, H, rng)
        place(c, blob_cat(), W * 0.72, H * 0.9, H * 0.5)
        place(c, frog_sit(SLS), W * 0.3, H * 0.92, H * 0.55)
        return c

    return [
        ("01", (128, 128), mk(grass, lambda: frog_sit(SLS)),
         "sls frog, 1frog, solo, orange skin, blue spots, crown, sitting, looking at viewer, grass, outdoors, day, no humans"),
        ("02", (128, 128), mk(white, lambda: frog_sit(SLS), height=0.8),
         "sls frog, 1frog, solo, orange skin, blue spots, crown, sitting, looking at viewer, simple background, white background, no humans"),
        ("03", (128, 128), mk(sky, lambda: frog_jump(SLS), foot=0.93, height=0.85, angle=-10, shadow=False),
         "sls frog, 1frog, solo, orange skin, blue spots, crown, jumping, open mouth, sky, cloud, outdoors, day, no humans"),
        ("04", (128, 128), mk(pond, lambda: frog_side(SLS), foot=0.8, height=0.62, pad=True),
         "sls frog, 1frog, solo, orange skin, blue spots, crown, from side, lily pad, pond, water, outdoors, day, no humans"),
        ("05", (128, 128), mk(night, lambda: frog_sit(SLS, closed_eyes=True), height=0.6),
         "sls frog, 1frog, solo, orange skin, blue spots, crown, sitting, closed eyes, grass, outdoors, night, moon, star (sky), no humans"),
        ("06", (128, 128), mk(grass, lambda: frog_sit(MINT, hat="top hat"), height=0.62),
         "mint frog, 1frog, solo, green skin, pink spots, top hat, sitting, looking at viewer, grass, outdoors, day, no humans"),
        ("07", (128, 128), mk(blue, lambda: frog_side(MINT), height=0.8, mirror=True),
         "mint frog, 1frog, solo, green skin, pink spots, from side, simple background, blue background, no humans"),
        ("08", (128, 128), mk(pond, lambda: frog_jump(MINT, hat="party hat"), foot=0.85, height=0.7, shadow=False),
         "mint frog, 1frog, solo, green skin, pink spots, party hat, jumping, open mouth, pond, water, outdoors, day, no humans"),
        ("09", (128, 128), mk(white, lambda: blob_cat(), height=0.8),
         "blob cat, 1cat, solo, grey fur, striped, yellow eyes, sitting, looking at viewer, simple background, white background, no humans"),
        ("10", (128, 128), mk(pink, lambda: blob_cat(hat="bow"), height=0.75),
         "blob cat, 1cat, solo, grey fur, striped, yellow eyes, bow, sitting, looking at viewer, simple background, pink background, no humans"),
        ("11", (128, 128), mk(lambda W, H, rng: bg_stars(W, H, rng), lambda: blob_cat(hat="party hat", closed_eyes=True), height=0.7),
         "blob cat, 1cat, solo, grey fur, striped, party hat, closed eyes, sitting, star (symbol), purple background, no humans"),
        ("12", (128, 128), duo,
         "sls frog, blob cat, 1frog, 1cat, duo, orange skin, blue spots, crown, grey fur, striped, sitting, looking at viewer, grass, outdoors, day, no humans"),
    ]


# --------------------------------------------------------------------------

def render(items, folder: Path, seed: int):
    out = []
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, (w, h), fn, caption) in enumerate(items):
        rng = random.Random(seed * 1000 + i)
        canvas = fn(w * SS, h * SS, rng)
        im = finish(canvas, w, h)
        save_png(im, folder / f"{name}.png")
        txt = folder / f"{name}.txt"
        if caption is not None:
            txt.write_text(caption + "\n", encoding="utf-8")
        elif txt.exists():
            txt.unlink()
        out.append(im)
    return out


def contact_sheet(images, path: Path, cell=200):
    cols = 6
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * cell, rows * cell), (60, 60, 60))
    for i, im in enumerate(images):
        s = min((cell - 8) / im.width, (cell - 8) / im.height)
        t = im.resize((round(im.width * s), round(im.height * s)), Image.NEAREST)
        x = (i % cols) * cell + (cell - t.width) // 2
        y = (i // cols) * cell + (cell - t.height) // 2
        sheet.paste(t, (x, y))
    sheet.save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sheet", type=Path, help="also write a contact sheet PNG here")
    args = ap.parse_args()
    frog = render(sls_frog_images(), HERE / "sls_frog" / "10_sls frog", SEED)
    tagged = render(tagged_images(), HERE / "tagged_example" / "5_tagged", SEED + 1)
    if args.sheet:
        contact_sheet(frog + tagged, args.sheet)
    print(f"wrote {len(frog)} sls_frog images and {len(tagged)} tagged_example images under {HERE}")


if __name__ == "__main__":
    main()
