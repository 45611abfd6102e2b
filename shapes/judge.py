"""Does a picture show what its prompt asked for? A deterministic reading of one shape on a plain background.

Pixel statistics, no learned model, so the verdict means the same on every machine and cannot share the generator's
mistakes:
- background: the median colour of the picture's border;
- the shape: the pixels farther than ``MASK_DISTANCE`` from the background colour (none, or fewer than
  ``MIN_AREA`` of the picture: nothing is read);
- colour: the median colour of the shape's inner half (its pixels farthest from the background colour), as the
  nearest of ``scenes.COLOURS``;
- position: the shape's centroid, as the nearest of ``scenes.POSITIONS``' anchors;
- shape: how full the four corners of the shape's bounding box are (a square fills all four, an upright triangle
  only the bottom two, a circle none), as the nearest of ``CORNER_PROTOTYPES``. The box is taken between the 2nd and
  98th percentile of the shape's pixel coordinates, so a few stray pixels do not stretch it.

On the procedural images themselves (``scenes.draw``, jittered) it reads every attribute right: tests/shapes checks
that on every one of the 405 scenes, blurred and with noise added.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import numpy as np

from pocketsd.shapes.scenes import BACKGROUNDS, COLOURS, POSITIONS, Scene, parse_caption

MASK_DISTANCE = 0.25  # RGB distance on a 0-1 scale; the closest shape/background pair in the palettes is 0.48 apart
MIN_AREA = 0.015  # of the picture; a drawn shape covers 5-12 %
BORDER = 1 / 32  # of the side: the frame the background is read from
CORNER = 0.2  # each corner box is this fraction of the bounding box's width and height
# (top corners' fill, bottom corners' fill) of each shape, measured on drawn scenes, sharp to blurred (radius 2 px): a
# square 1.0 to 0.5, a circle 0.1 to 0.45 (the trimmed box cuts into its rim), a triangle 0.0 at the top, 0.7-1.0 below
CORNER_PROTOTYPES = {"square": (0.8, 0.8), "circle": (0.25, 0.25), "triangle": (0.0, 0.9)}
ATTRIBUTES = ("colour", "shape", "position")


@dataclass(frozen=True)
class Reading:
    """What the judge sees; None where there is no shape to read."""

    colour: str | None
    shape: str | None
    position: str | None
    background: str


@dataclass(frozen=True)
class Verdict:
    colour: bool
    shape: bool
    position: bool

    @property
    def all(self) -> bool:
        return self.colour and self.shape and self.position


def _nearest(value: np.ndarray, table: dict[str, tuple[float, ...]]) -> str:
    names = list(table)
    distances = [float(np.linalg.norm(value - np.asarray(table[name], dtype=np.float64))) for name in names]
    return names[int(np.argmin(distances))]


def _unit(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) in [0, 1] from uint8 or float."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    return image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)


def read(image: np.ndarray) -> Reading:
    """Read the scene in an RGB image, uint8 (0-255) or float (0-1)."""
    pixels = _unit(image)
    height, width, _ = pixels.shape
    frame = max(1, round(min(height, width) * BORDER))
    border = np.concatenate([pixels[:frame].reshape(-1, 3), pixels[-frame:].reshape(-1, 3),
                             pixels[:, :frame].reshape(-1, 3), pixels[:, -frame:].reshape(-1, 3)])
    background_colour = np.median(border, axis=0)
    background = _nearest(background_colour * 255, BACKGROUNDS)
    distance = np.linalg.norm(pixels - background_colour, axis=-1)
    mask = distance > MASK_DISTANCE
    if mask.mean() < MIN_AREA:
        return Reading(None, None, None, background)
    core = mask & (distance >= np.median(distance[mask]))  # the shape's inside, not its edge blended into the ground
    colour = _nearest(np.median(pixels[core], axis=0) * 255, COLOURS)
    ys, xs = np.nonzero(mask)
    centre = np.array([xs.mean() / (width - 1), ys.mean() / (height - 1)])
    position = _nearest(centre, POSITIONS)
    top, bottom = _corner_fill(mask, ys, xs)
    shape = _nearest(np.array([top, bottom]), CORNER_PROTOTYPES)
    return Reading(colour, shape, position, background)


def _corner_fill(mask: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[float, float]:
    """Mean fill of the bounding box's two top corner boxes and of its two bottom ones."""
    y0, y1 = np.percentile(ys, [2, 98]).round().astype(int)
    x0, x1 = np.percentile(xs, [2, 98]).round().astype(int)
    box = mask[y0:y1 + 1, x0:x1 + 1]
    h, w = box.shape
    ch, cw = max(1, round(h * CORNER)), max(1, round(w * CORNER))
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    return float(top), float(bottom)


def judge(image: np.ndarray, scene: Scene) -> Verdict:
    """Whether ``image`` shows ``scene``'s colour, shape and position (its background is not judged)."""
    seen = read(image)
    return Verdict(seen.colour == scene.colour, seen.shape == scene.shape, seen.position == scene.position)


def adherence(verdicts: list[Verdict]) -> dict[str, float]:
    """The share of verdicts right on each attribute and on all three at once."""
    if not verdicts:
        raise ValueError("no verdicts to summarise")
    rates = {name: float(np.mean([getattr(v, name) for v in verdicts])) for name in ATTRIBUTES}
    return {**rates, "all": float(np.mean([v.all for v in verdicts]))}


def main(argv: list[str] | None = None) -> int:
    """``python -m pocketsd.shapes.judge IMAGE --prompt CAPTION``: one line per attribute; exit 0 when all three
    are right, 1 when one is not, 2 for a bad caption or image."""
    parser = argparse.ArgumentParser(prog="python -m pocketsd.shapes.judge",
                                     description="Does a picture show its shapes prompt?")
    parser.add_argument("image")
    parser.add_argument("--prompt", required=True, help='e.g. "a red circle on the left, blue background"')
    args = parser.parse_args(argv)
    from PIL import Image

    try:
        scene = parse_caption(args.prompt)
        with Image.open(args.image) as opened:
            image = np.asarray(opened.convert("RGB"))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seen, verdict = read(image), judge(image, scene)
    for name in ATTRIBUTES:
        mark = "right" if getattr(verdict, name) else "WRONG"
        print(f"{name:9s} asked {getattr(scene, name):9s} seen {getattr(seen, name) or 'nothing':9s} {mark}")
    return 0 if verdict.all else 1


if __name__ == "__main__":
    sys.exit(main())
