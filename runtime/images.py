"""Images in and out: PIL ↔ arrays as diffusers' image processor does it, and PNGs that carry their parameters."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from pocketsd.errors import GenerateError, OutputError

PNG_KEY = "pocketsd"


def to_pil(pixels: np.ndarray) -> Image.Image:
    """float HWC in [0, 1] → 8-bit RGB, rounding as diffusers' ``numpy_to_pil``."""
    return Image.fromarray((pixels * 255).round().astype(np.uint8))


def load_image(path: str | Path, what: str = "init image") -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise GenerateError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise GenerateError(f"cannot read {what} {path}: {exc}", "pass a PNG or JPEG file") from None


def image_to_array(image: Any, height: int, width: int) -> np.ndarray:
    """A PIL image (or HWC uint8 / float [0,1] array) of exactly the bundle's size → NCHW float32 in [-1, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(image)
        array = array.astype(np.float32) / 255.0 if array.dtype == np.uint8 else array.astype(np.float32)
    if array.ndim != 3 or array.shape[2] != 3:
        raise GenerateError(f"init image has shape {list(array.shape)}", "pass an RGB image")
    if array.shape[:2] != (height, width):
        h, w = array.shape[:2]
        raise GenerateError(
            f"init image is {w}x{h} (width x height) but the bundle was exported for {width}x{height}",
            f"resize the image to {width}x{height}, or re-export with --resolution {h}x{w}",
        )
    return np.ascontiguousarray((array * 2.0 - 1.0).transpose(2, 0, 1)[None])


def save_png(image: Image.Image, path: str | Path, params: dict[str, Any]) -> Path:
    """Write the PNG with its generation parameters in a text chunk; same inputs give the same bytes."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_KEY, json.dumps(params, sort_keys=True))
    out = Path(path)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        tmp.replace(out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}", "choose a writable --out path") from None
    return out


def read_png_params(path: str | Path) -> dict[str, Any]:
    with Image.open(path) as img:
        return json.loads(img.text[PNG_KEY])
