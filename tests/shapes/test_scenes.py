"""The procedural data set: every caption reads as the issue asks, draws are seeded, shapes are where they say."""

from __future__ import annotations

import numpy as np

from pocketsd.shapes.scenes import BACKGROUNDS, COLOURS, IMAGE_SIZE, Scene, all_scenes, draw, draw_batch, prompt_set


def test_captions_read_as_asked():
    assert Scene("circle", "red", "left", "blue").caption == "a red circle on the left, blue background"
    assert Scene("square", "white", "center", "black").caption == "a white square in the center, black background"


def test_every_scene_is_visible():
    scenes = all_scenes()
    assert len(scenes) == 405 and len(set(scenes)) == 405
    assert all(COLOURS[s.colour] != BACKGROUNDS[s.background] for s in scenes)


def test_the_prompt_set_is_fixed_and_distinct():
    first, again = prompt_set(120), prompt_set(120)
    assert first == again and len(set(first)) == 120
    assert {s.shape for s in first} == {"circle", "square", "triangle"} and len({s.position for s in first}) == 5


def test_draws_are_seeded_and_jittered():
    scenes = all_scenes()[:8]
    assert np.array_equal(draw_batch(scenes, 3), draw_batch(scenes, 3))
    assert not np.array_equal(draw_batch(scenes, 3), draw_batch(scenes, 4))
    assert draw_batch(scenes, 3).shape == (8, IMAGE_SIZE, IMAGE_SIZE, 3)


def test_the_shape_sits_where_the_caption_says():
    for position, (fx, fy) in {"left": (0.25, 0.5), "top": (0.5, 0.25), "center": (0.5, 0.5)}.items():
        image = draw(Scene("square", "red", position, "black"))
        ys, xs = np.nonzero(image[..., 0] > 100)
        assert abs(xs.mean() / IMAGE_SIZE - fx) < 0.03 and abs(ys.mean() / IMAGE_SIZE - fy) < 0.03


def test_captions_parse_back_to_their_scenes():
    from pocketsd.shapes.scenes import parse_caption

    assert all(parse_caption(s.caption) == s for s in all_scenes())
    assert parse_caption("A Red circle on the left , blue background") == Scene("circle", "red", "left", "blue")


def test_other_text_is_not_a_caption():
    import pytest

    from pocketsd.shapes.scenes import parse_caption

    for text in ("a cat", "a red circle on the left, red background", "a red hexagon on the left, blue background"):
        with pytest.raises(ValueError, match="is not a caption of the shapes data set: write 'a COLOUR SHAPE"):
            parse_caption(text)
