"""The Python API's bad values: ``Pipeline.__call__`` with a wrong type, a non-finite or out-of-range number, or
latents of another shape or holding NaN raises one GenerateError whose one line names the value and what is allowed
(the command line's battery is tests/test_bad_inputs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pocketsd.errors import GenerateError

pytest.importorskip("torch")
pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def pipe(tiny_bundle: Path):
    from pocketsd.runtime.pipeline import Pipeline

    return Pipeline.from_bundle(tiny_bundle)


@pytest.mark.parametrize("kwargs, message", [
    ({"prompt": 5}, "prompt must be text (a str), not int"),
    ({"prompt": None}, "prompt must be text (a str), not NoneType"),
    ({"prompt": ["a", "b"]}, "prompt is a list; this pipeline makes one image per call"),
    ({"prompt": [1]}, "prompt is a list"),
    ({"prompt": "a", "negative_prompt": 3}, "negative_prompt must be text"),
    ({"prompt": "a", "guidance_scale": float("inf")}, "guidance scale must be a finite number"),
    ({"prompt": "a", "num_inference_steps": -1}, "number of steps must be between 1"),
    ({"prompt": "a", "num_inference_steps": 2.5}, "number of steps must be an integer"),
    ({"prompt": "a", "seed": -1}, "seed must be a non-negative integer"),
    ({"prompt": "a", "latents": np.zeros((1, 4, 2, 2))}, "latents have shape"),
    ({"prompt": "a", "latents": "nan"}, "before the first step: the initial noise holds NaN"),
])
def test_library_call_with_bad_values(pipe, kwargs: dict[str, Any], message: str):
    if isinstance(kwargs.get("latents"), str):
        kwargs = {**kwargs, "latents": np.full(pipe._latent_shape(), np.nan, np.float32)}
    with pytest.raises(GenerateError) as info:
        pipe(**{"num_inference_steps": 2, **kwargs})
    assert message in info.value.one_line()
