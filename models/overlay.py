"""Heat-map overlays of anomaly maps for people to look at.

The overlay keeps the frame's size, so an inspector can flip between the photo and
its heat map, and the colour bar is drawn inside the frame's lower right corner.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Control points of a jet-like colormap: position in [0, 1] -> RGB in [0, 1].
_JET_POSITIONS = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_JET_COLOURS = np.array(
    [
        [0.0, 0.0, 0.5],
        [0.0, 0.0, 1.0],
        [0.0, 1.0, 1.0],
        [1.0, 1.0, 0.0],
        [1.0, 0.0, 0.0],
        [0.5, 0.0, 0.0],
    ]
)


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB colours, dark blue (0) to dark red (1)."""
    clipped = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(clipped, _JET_POSITIONS, _JET_COLOURS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1) * 255.0).astype(np.uint8)


def normalize(anomaly_map: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """Scale scores to [0, 1] between ``vmin`` and ``vmax``; NaN counts as ``vmin``."""
    if not (np.isfinite(vmin) and np.isfinite(vmax)) or vmax <= vmin:
        raise ValueError(
            f"invalid colour range vmin={vmin!r}, vmax={vmax!r}: need finite values with vmax > vmin"
        )
    scores = np.nan_to_num(np.asarray(anomaly_map, dtype=np.float64), nan=vmin, posinf=vmax, neginf=vmin)
    return np.clip((scores - vmin) / (vmax - vmin), 0.0, 1.0)


def blend(rgb: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5) -> np.ndarray:
    """Return ``(H, W, 3)`` uint8: the colour-mapped scores laid over the image."""
    rgb = np.asarray(rgb)
    anomaly_map = np.asarray(anomaly_map)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {rgb.shape} dtype {rgb.dtype}")
    if anomaly_map.shape != rgb.shape[:2]:
        raise ValueError(
            f"anomaly map shape {anomaly_map.shape} does not match image size {rgb.shape[:2]}: "
            "the detector must return a map of the input's height and width"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"invalid alpha {alpha!r}: expected a value in [0, 1]")

    colours = jet(normalize(anomaly_map, vmin, vmax)).astype(np.float64)
    mixed = (1.0 - alpha) * rgb.astype(np.float64) + alpha * colours
    return np.round(mixed).astype(np.uint8)


def _draw_colour_bar(image: Image.Image, vmin: float, vmax: float) -> None:
    """Draw a vertical colour bar with its end values in the lower right corner."""
    width, height = image.size
    bar_height = max(int(height * 0.35), 8)
    bar_width = max(int(width * 0.03), 4)
    font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    top_label, bottom_label = f"{vmax:.3g}", f"{vmin:.3g}"
    label_width = int(max(draw.textlength(top_label, font=font), draw.textlength(bottom_label, font=font)))
    if bar_height + 40 > height or bar_width + label_width + 24 > width // 2:
        return  # too small a frame for a legend that would stay readable

    margin = 4
    x1 = width - margin - bar_width
    y0 = height - margin - bar_height - 12
    y1 = y0 + bar_height
    text_x = x1 - label_width - 4

    ramp = jet(np.linspace(1.0, 0.0, bar_height))[:, None, :].repeat(bar_width, axis=1)
    draw.rectangle([text_x - 4, y0 - 14, width - 1, y1 + 14], fill=(0, 0, 0))
    image.paste(Image.fromarray(ramp), (x1, y0))
    draw.text((text_x, y0 - 6), top_label, fill=(255, 255, 255), font=font)
    draw.text((text_x, y1 - 6), bottom_label, fill=(255, 255, 255), font=font)


def render_overlay(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
    colour_bar: bool = True,
) -> bytes:
    """Return PNG bytes of the heat map over the image, the same size as the image.

    Scores at or below ``vmin`` are dark blue, at or above ``vmax`` dark red; pass the
    detector's ``score_range`` so that maps of different frames compare.
    """
    image = Image.fromarray(blend(rgb, anomaly_map, vmin, vmax, alpha))
    if colour_bar:
        _draw_colour_bar(image, vmin, vmax)

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
