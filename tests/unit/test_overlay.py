"""Heat-map overlays: colours, blending, size and the colour bar."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from qcstream.models.overlay import blend, jet, normalize, render_overlay


def decode(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def test_jet_end_points_and_middle():
    colours = jet(np.array([0.0, 0.5, 1.0]))

    # 0 -> dark blue; 1 -> dark red; 0.5 lies halfway between cyan (0.375) and yellow (0.625).
    np.testing.assert_array_equal(colours, [[0, 0, 128], [128, 255, 128], [128, 0, 0]])


def test_jet_clips_values_outside_unit_range():
    np.testing.assert_array_equal(jet(np.array([-3.0, 7.0])), jet(np.array([0.0, 1.0])))


def test_normalize_scales_clips_and_nan():
    scores = np.array([0.0, 1.0, 2.0, 3.0, np.nan])

    np.testing.assert_allclose(normalize(scores, vmin=1.0, vmax=3.0), [0.0, 0.0, 0.5, 1.0, 0.0])


@pytest.mark.parametrize(("vmin", "vmax"), [(1.0, 1.0), (2.0, 1.0), (0.0, float("nan"))])
def test_normalize_rejects_an_empty_or_invalid_range(vmin, vmax):
    with pytest.raises(ValueError, match="invalid colour range"):
        normalize(np.zeros(3), vmin, vmax)


def test_blend_mixes_image_and_colour_by_alpha():
    rgb = np.full((2, 2, 3), 100, dtype=np.uint8)
    scores = np.array([[0.0, 0.0], [1.0, 1.0]], dtype=np.float32)

    mixed = blend(rgb, scores, vmin=0.0, vmax=1.0, alpha=0.5)

    # (100 + 0) / 2 = 50, (100 + 128) / 2 = 114, (100 + 0) / 2 = 50.
    np.testing.assert_array_equal(mixed[0, 0], [50, 50, 114])
    np.testing.assert_array_equal(mixed[1, 1], [114, 50, 50])


def test_blend_rejects_a_map_of_another_size():
    with pytest.raises(ValueError, match=r"anomaly map shape \(3, 3\) does not match image size \(2, 2\)"):
        blend(np.zeros((2, 2, 3), dtype=np.uint8), np.zeros((3, 3)), 0.0, 1.0)


def test_blend_rejects_a_non_rgb_image():
    with pytest.raises(ValueError, match="uint8 image"):
        blend(np.zeros((2, 2), dtype=np.uint8), np.zeros((2, 2)), 0.0, 1.0)


def test_overlay_keeps_the_frame_size():
    rgb = np.zeros((400, 300, 3), dtype=np.uint8)
    scores = np.linspace(0.0, 1.0, 400 * 300, dtype=np.float32).reshape(400, 300)

    overlay = decode(render_overlay(rgb, scores, 0.0, 1.0))

    assert overlay.shape == (400, 300, 3)


def test_colour_bar_in_lower_right_corner():
    rgb = np.full((400, 300, 3), 90, dtype=np.uint8)
    scores = np.zeros((400, 300), dtype=np.float32)

    plain = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=False))
    with_bar = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=True))

    changed = np.any(plain != with_bar, axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.size > 0
    assert rows.min() > 400 // 2
    assert cols.min() > 300 // 2
    # The top of the bar shows the colour of the highest score: dark red.
    assert tuple(with_bar[rows.min() + 14, 300 - 4 - 4]) == (128, 0, 0)


def test_colour_bar_is_left_out_of_tiny_frames():
    rgb = np.full((16, 16, 3), 90, dtype=np.uint8)
    scores = np.zeros((16, 16), dtype=np.float32)

    plain = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=False))
    with_bar = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=True))

    np.testing.assert_array_equal(plain, with_bar)
