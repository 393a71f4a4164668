"""Heat-map overlays: colours, blending, display brightening, size, colour bar and caption."""

from __future__ import annotations

import io
import types

import numpy as np
import pytest
from PIL import Image

from qcstream.models.overlay import (
    MIN_CAPTION_WIDTH,
    blend,
    brighten,
    caption_band_height,
    jet,
    normalize,
    render_overlay,
)
from qcstream.streams.inspect import overlay_caption

CAPTION = "DEFECT  score 27.3 >= threshold 21.9 | line-1 cam-a | frame c73e05-cut-000 | 2026-12-04 21:16:02 UTC"


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


def test_blend_opacity_grows_with_score():
    rgb = np.full((3, 1, 3), 100, dtype=np.uint8)
    scores = np.array([[-1.0], [0.5], [1.0]], dtype=np.float32)

    mixed = blend(rgb, scores, vmin=0.0, vmax=1.0, alpha=0.5)

    # Below vmin: opacity 0, the photo is unchanged.
    np.testing.assert_array_equal(mixed[0, 0], [100, 100, 100])
    # Halfway: opacity 0.25 of jet(0.5) = (128, 255, 128): 0.75 * 100 + 0.25 * 128 = 107, 0.75 * 100 + 0.25 * 255 = 138.75.
    np.testing.assert_array_equal(mixed[1, 0], [107, 139, 107])
    # At vmax: opacity 0.5 of dark red (128, 0, 0): (100 + 128) / 2 = 114, 100 / 2 = 50.
    np.testing.assert_array_equal(mixed[2, 0], [114, 50, 50])


def test_brighten_scales_dark_photo():
    gray = np.repeat(np.arange(0, 100, dtype=np.uint8), 4).reshape(20, 20)
    rgb = np.stack([gray, gray, gray], axis=-1)
    rgb[0, 0] = (60, 30, 60)

    bright = brighten(rgb)

    # The 99.5th luminance percentile of the ramp 0..99 is 99, so the gain is 255 / 99.
    assert bright.dtype == np.uint8
    assert bright.max() == 255
    np.testing.assert_array_equal(bright[0, 4], np.round(np.array([1, 1, 1]) * 255 / 99))
    np.testing.assert_array_equal(bright[0, 1], [0, 0, 0])
    # One gain for all channels, so the hue stays: 60 * 255 / 99 = 154.5, 30 * 255 / 99 = 77.3.
    np.testing.assert_array_equal(bright[0, 0], [155, 77, 155])


def test_brighten_caps_gain_for_black_photos():
    rgb = np.full((4, 4, 3), 10, dtype=np.uint8)

    np.testing.assert_array_equal(brighten(rgb), np.full((4, 4, 3), 40))


def test_brighten_keeps_bright_photo():
    photo = np.repeat(np.linspace(0, 255, 200).astype(np.uint8), 3).reshape(10, 20, 3)
    photo[-1] = 255  # 5% white pixels: the 99.5th percentile is white already

    np.testing.assert_array_equal(brighten(photo), photo)


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


def bar_column(overlay: np.ndarray) -> np.ndarray:
    """The middle column of the colour bar of a 300-pixel-wide overlay (9 pixels wide, 4 from the edge)."""
    return overlay[:, 300 - 4 - 9 // 2]


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
    # The top of the bar shows the colour of the highest score, dark red; its bottom dark blue.
    column = bar_column(with_bar)
    red = np.nonzero(np.all(column == (128, 0, 0), axis=1))[0]
    blue = np.nonzero(np.all(column == (0, 0, 128), axis=1))[0]
    assert red.size == 1
    assert blue.size == 1
    assert 400 // 2 < red[0] < blue[0] < 400


def test_colour_bar_marks_the_threshold():
    rgb = np.full((400, 300, 3), 40, dtype=np.uint8)
    scores = np.zeros((400, 300), dtype=np.float32)

    without = bar_column(decode(render_overlay(rgb, scores, 0.0, 1.0)))
    marked = bar_column(decode(render_overlay(rgb, scores, 0.0, 1.0, threshold=0.25)))

    top = np.nonzero(np.all(marked == (128, 0, 0), axis=1))[0][0]
    bottom = np.nonzero(np.all(marked == (0, 0, 128), axis=1))[0][0]
    white = np.nonzero(np.all(marked == (255, 255, 255), axis=1))[0]
    assert not np.all(without == (255, 255, 255), axis=1).any()
    # A threshold at a quarter of the range lies a quarter of the way up from the bottom.
    assert white.size in (1, 2)
    assert abs(white.mean() - (bottom - 0.25 * (bottom - top))) <= 2


def test_colour_bar_is_left_out_of_tiny_frames():
    rgb = np.full((16, 16, 3), 90, dtype=np.uint8)
    scores = np.zeros((16, 16), dtype=np.float32)

    plain = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=False))
    with_bar = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=True))

    np.testing.assert_array_equal(plain, with_bar)


def test_caption_band_below_unchanged_frame():
    rgb = np.random.default_rng(0).integers(0, 256, (400, 300, 3), dtype=np.uint8)
    scores = np.zeros((400, 300), dtype=np.float32)

    plain = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=False))
    captioned = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=False, caption=CAPTION))

    band = caption_band_height(300, 400, CAPTION)
    assert band > 0
    assert captioned.shape == (400 + band, 300, 3)
    np.testing.assert_array_equal(captioned[:400], plain)
    # The band contains text: light pixels on the dark background.
    assert (captioned[400:].min(axis=2) > 200).any()
    assert (captioned[400:].max(axis=2) < 50).mean() > 0.5


def test_caption_band_grows_with_lines():
    short = caption_band_height(300, 400, "GOOD")
    long = caption_band_height(300, 400, CAPTION)

    assert short > 0
    # The long caption needs at least two lines in 300 pixels, so its band is taller.
    assert long > short
    assert caption_band_height(300, 400, None) == 0
    assert caption_band_height(300, 400, "") == 0


def test_caption_left_out_of_narrow_frames():
    width = MIN_CAPTION_WIDTH - 1
    rgb = np.full((80, width, 3), 90, dtype=np.uint8)
    scores = np.zeros((80, width), dtype=np.float32)

    overlay = decode(render_overlay(rgb, scores, 0.0, 1.0, caption=CAPTION))

    assert caption_band_height(width, 80, CAPTION) == 0
    assert overlay.shape == (80, width, 3)


def test_overlay_brightens_for_display_only():
    rgb = np.repeat(np.arange(0, 100, dtype=np.uint8), 3).reshape(20, 15)[..., None].repeat(3, axis=2)
    scores = np.zeros((20, 15), dtype=np.float32)

    displayed = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=False))
    as_is = decode(render_overlay(rgb, scores, 0.0, 1.0, colour_bar=False, brighten_photo=False))

    np.testing.assert_array_equal(as_is, rgb)
    np.testing.assert_array_equal(displayed, brighten(rgb))
    assert displayed.max() == 255


@pytest.mark.parametrize(
    ("score", "is_defect", "expected"),
    [
        (27.31, True, "DEFECT  score 27.31 >= threshold 21.9 | line-1 cam-a | frame f-7 | 2023-11-14 22:13:20 UTC"),
        (3.5, False, "GOOD  score 3.5 < threshold 21.9 | line-1 cam-a | frame f-7 | 2023-11-14 22:13:20 UTC"),
    ],
)
def test_inspected_frame_caption(score, is_defect, expected):
    frame = types.SimpleNamespace(line_id="line-1", camera_id="cam-a", frame_id="f-7", captured_at=1_700_000_000.0)

    assert overlay_caption(frame, score, 21.9, is_defect) == expected
