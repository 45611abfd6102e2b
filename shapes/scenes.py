"""The procedural captioned data set the ``shapes`` model is trained on: one coloured shape on a plain background.

A scene is a shape (circle, square, triangle), its colour, where it sits (left, right, top, bottom, center) and the
background colour; its caption reads "a red circle on the left, blue background". Images are drawn with Pillow at
``IMAGE_SIZE``² from a seeded generator that jitters the shape's size and place a little, so a model cannot learn
one picture per caption. Everything here is numpy and Pillow: the judge (judge.py) and the adherence bench use it
without torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
# Shape colours, 0-255 RGB: six far apart in RGB, so that the judge reads them back from a blurred picture.
COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (40, 60, 230), "yellow": (240, 220, 40),
           "white": (245, 245, 245), "purple": (150, 40, 180)}
BACKGROUNDS = {"black": (10, 10, 10), "gray": (128, 128, 128), "blue": (40, 60, 230), "green": (30, 180, 40),
               "white": (245, 245, 245)}
# Where the shape's centre sits, as fractions of the image (x, y); y grows downwards.
POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
             "center": (0.5, 0.5)}
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
RADIUS = 0.16  # half the shape's width, as a fraction of the image
RADIUS_JITTER = 0.02
CENTRE_JITTER = 0.05


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {PHRASES[self.position]}, {self.background} background"


def parse_caption(text: str) -> Scene:
    """The scene a caption of this data set describes ("a red circle on the left, blue background"); ValueError
    naming the expected form for any other text."""
    words = " ".join(text.lower().replace(",", " , ").split())
    for scene in all_scenes():
        if " ".join(scene.caption.replace(",", " , ").split()) == words:
            return scene
    raise ValueError(f"{text!r} is not a caption of the shapes data set: write 'a COLOUR SHAPE POSITION, "
                     f"BACKGROUND background' with COLOUR one of {', '.join(COLOURS)}; "
                     f"SHAPE one of {', '.join(SHAPES)}; "
                     f"POSITION one of {', '.join(PHRASES.values())}; BACKGROUND one of {', '.join(BACKGROUNDS)} "
                     "(not the shape's colour)")


def all_scenes() -> list[Scene]:
    """Every scene whose shape colour differs from its background: 3 × 6 × 5 × 5 = 450, less the 45 where the shape
    would be invisible (blue, green or white on itself): 405."""
    return [Scene(s, c, p, b) for s, c, p, b in itertools.product(SHAPES, COLOURS, POSITIONS, BACKGROUNDS)
            if COLOURS[c] != BACKGROUNDS[b]]


def sample_scenes(count: int, seed: int) -> list[Scene]:
    """``count`` scenes drawn uniformly (with replacement) from ``all_scenes()``, the same for the same seed."""
    scenes = all_scenes()
    picks = np.random.default_rng(seed).integers(0, len(scenes), count)
    return [scenes[i] for i in picks]


def prompt_set(count: int = 120, seed: int = 1234) -> list[Scene]:
    """The fixed prompt set adherence is measured on: ``count`` distinct scenes in a seeded order."""
    scenes = all_scenes()
    order = np.random.default_rng(seed).permutation(len(scenes))[:count]
    return [scenes[i] for i in order]


def draw(scene: Scene, rng: np.random.Generator | None = None, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as a (size, size, 3) uint8 image; ``rng`` jitters the shape's size and centre (None: none)."""
    cx, cy = POSITIONS[scene.position]
    radius = RADIUS
    if rng is not None:
        cx, cy = cx + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER), cy + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER)
        radius += rng.uniform(-RADIUS_JITTER, RADIUS_JITTER)
    cx, cy, r = cx * size, cy * size, radius * size
    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    fill = COLOURS[scene.colour]
    if scene.shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif scene.shape == "square":
        side = r * 0.9  # a square of the circle's area would be 0.89 r; the same visual weight
        pen.rectangle((cx - side, cy - side, cx + side, cy + side), fill=fill)
    else:  # an upright triangle in the circle's box
        pen.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    return np.asarray(image)


def draw_batch(scenes: list[Scene], seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """(N, size, size, 3) uint8: each scene drawn with its own jitter from one seeded generator."""
    rng = np.random.default_rng(seed)
    return np.stack([draw(scene, rng, size) for scene in scenes])
