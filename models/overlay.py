"""Heat-map overlays of anomaly maps for people to look at.

The frame keeps its pixel positions in the overlay, so an inspector can flip between
the photo and its heat map, and the colour bar is drawn inside the frame's lower
right corner. An optional caption goes into a band below the frame, never over it.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFont

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

#: Default heat-map opacity at ``vmax``; it falls linearly to 0 at ``vmin``.
DEFAULT_ALPHA = 0.6

#: Frames narrower than this get no caption band: the text would not be readable.
MIN_CAPTION_WIDTH = 120

#: Largest gain :func:`brighten` applies to a dark photo.
MAX_BRIGHTEN_GAIN = 4.0

#: Luminance percentile that :func:`brighten` scales to white.
_WHITE_PERCENTILE = 99.5

#: Brightness factor of the image behind the colour bar's labels.
_PANEL_BRIGHTNESS = 0.25
_CAPTION_BACKGROUND = (24, 24, 24)
_CAPTION_PADDING = 4
_SEPARATOR = " | "


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


def _check_image(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got shape {rgb.shape} dtype {rgb.dtype}")
    return rgb


def brighten(rgb: np.ndarray) -> np.ndarray:
    """Return a display copy of ``rgb``, scaled so that its 99.5th luminance percentile is white.

    One gain applies to every pixel and channel, so hues and black stay. The gain is at
    least 1, so bright photos are unchanged, and at most :data:`MAX_BRIGHTEN_GAIN`, so the
    sensor noise of a nearly black frame is not amplified. For display only:
    :func:`render_overlay` draws the copy, and the detector scores the original frame.
    """
    rgb = _check_image(rgb)
    luminance = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    high = float(np.percentile(luminance, _WHITE_PERCENTILE))
    gain = float(np.clip(255.0 / max(high, 1e-6), 1.0, MAX_BRIGHTEN_GAIN))
    if gain == 1.0:
        return rgb.copy()
    return np.round(np.clip(rgb.astype(np.float64) * gain, 0.0, 255.0)).astype(np.uint8)


def blend(
    rgb: np.ndarray, anomaly_map: np.ndarray, vmin: float, vmax: float, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """Return ``(H, W, 3)`` uint8: the colour-mapped scores laid over the image.

    The opacity of each pixel's colour grows with its score: 0 at or below ``vmin``
    (the photo shows unchanged), ``alpha`` at or above ``vmax``, linear between. So
    normal surface stays visible and only high scores are coloured.
    """
    rgb = _check_image(rgb)
    anomaly_map = np.asarray(anomaly_map)
    if anomaly_map.shape != rgb.shape[:2]:
        raise ValueError(
            f"anomaly map shape {anomaly_map.shape} does not match image size {rgb.shape[:2]}: "
            "the detector must return a map of the input's height and width"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"invalid alpha {alpha!r}: expected a value in [0, 1]")

    scaled = normalize(anomaly_map, vmin, vmax)
    colours = jet(scaled).astype(np.float64)
    opacity = (alpha * scaled)[..., None]
    mixed = (1.0 - opacity) * rgb.astype(np.float64) + opacity * colours
    return np.round(mixed).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _font_size(width: int, height: int) -> int:
    """Text height that stays readable on small frames and grows with large ones."""
    return max(11, min(width, height) // 24)


def _draw_colour_bar(image: Image.Image, vmin: float, vmax: float, threshold: float | None) -> None:
    """Draw a vertical colour bar in the lower right corner: title, end values, threshold mark."""
    width, height = image.size
    font = _font(_font_size(width, height))
    draw = ImageDraw.Draw(image)
    text_height = int(draw.textbbox((0, 0), "0123456789", font=font)[3]) + 2
    bar_height = max(int(height * 0.35), 8)
    bar_width = max(int(width * 0.03), 4)
    labels = {"top": f"{vmax:.3g}", "bottom": f"{vmin:.3g}"}
    threshold_label = None if threshold is None else f"threshold {threshold:.3g}"
    label_width = int(max(draw.textlength(text, font=font) for text in [*labels.values(), threshold_label or ""]))
    if bar_height + 3 * text_height + 8 > height or bar_width + label_width + 24 > width * 2 // 3:
        return  # too small a frame for a legend that would stay readable

    margin = 4
    x1 = width - margin - bar_width
    y0 = height - margin - bar_height - text_height // 2 - 2
    y1 = y0 + bar_height
    text_x = x1 - label_width - 6
    title_y = y0 - text_height - text_height // 2 - 2

    ramp = jet(np.linspace(1.0, 0.0, bar_height))[:, None, :].repeat(bar_width, axis=1)
    # A darkened, not blacked-out, panel: the text stays readable and the part shows through.
    panel = (text_x - 4, title_y - 2, width, height)
    image.paste(ImageEnhance.Brightness(image.crop(panel)).enhance(_PANEL_BRIGHTNESS), panel[:2])
    image.paste(Image.fromarray(ramp), (x1, y0))
    draw.text((text_x, title_y), "anomaly score", fill=(255, 255, 255), font=font)

    ends = {"top": y0, "bottom": y1}
    if threshold is not None:
        fraction = float(np.clip((threshold - vmin) / (vmax - vmin), 0.0, 1.0))
        mark_y = int(round(y1 - fraction * (bar_height - 1)))
        draw.line([x1 - 4, mark_y, width - 1, mark_y], fill=(255, 255, 255), width=2)
        draw.text((text_x, mark_y - text_height // 2), threshold_label, fill=(255, 255, 255), font=font)
        # An end label that would overlap the threshold label is left out, because the threshold matters more.
        ends = {name: y for name, y in ends.items() if abs(y - mark_y) >= text_height}
    for name, y in ends.items():
        draw.text((text_x, y - text_height // 2), labels[name], fill=(200, 200, 200), font=font)


def _wrap(caption: str, width: int, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> list[str]:
    """Split ``caption`` into lines that fit ``width``, breaking at ``" | "`` first, then at spaces."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for paragraph in caption.splitlines():
        current = ""
        for part in paragraph.split(_SEPARATOR):
            joined = f"{current}{_SEPARATOR}{part}" if current else part
            if measure.textlength(joined, font=font) <= width:
                current = joined
                continue
            if current:
                lines.append(current)
            current = ""
            for word in part.split(" "):
                joined = f"{current} {word}" if current else word
                if current and measure.textlength(joined, font=font) > width:
                    lines.append(current)
                    joined = word
                current = joined
        lines.append(current)
    return lines


def caption_band_height(width: int, height: int, caption: str | None) -> int:
    """Return the height in pixels of the caption band under a ``width`` x ``height`` frame.

    0 without a caption or for frames narrower than :data:`MIN_CAPTION_WIDTH`. The band
    grows by one text line for each line the caption wraps into.
    """
    if not caption or width < MIN_CAPTION_WIDTH:
        return 0
    font = _font(_font_size(width, height))
    lines = _wrap(caption, width - 2 * _CAPTION_PADDING, font)
    return len(lines) * _line_height(font) + 2 * _CAPTION_PADDING


def _line_height(font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> int:
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return int(measure.textbbox((0, 0), "Ag|0", font=font)[3]) + 3


def _add_caption(image: Image.Image, caption: str) -> Image.Image:
    width, height = image.size
    band = caption_band_height(width, height, caption)
    if band == 0:
        return image
    font = _font(_font_size(width, height))
    framed = Image.new("RGB", (width, height + band), _CAPTION_BACKGROUND)
    framed.paste(image, (0, 0))
    draw = ImageDraw.Draw(framed)
    y = height + _CAPTION_PADDING
    for line in _wrap(caption, width - 2 * _CAPTION_PADDING, font):
        draw.text((_CAPTION_PADDING, y), line, fill=(255, 255, 255), font=font)
        y += _line_height(font)
    return framed


def render_overlay(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    vmin: float,
    vmax: float,
    alpha: float = DEFAULT_ALPHA,
    colour_bar: bool = True,
    *,
    threshold: float | None = None,
    caption: str | None = None,
    brighten_photo: bool = True,
) -> bytes:
    """Return PNG bytes of the heat map over the image.

    Scores at or below ``vmin`` leave the photo uncoloured. Scores at or above ``vmax`` are
    dark red at opacity ``alpha`` (see :func:`blend`). Pass the detector's ``score_range``
    so that maps of different frames compare. ``threshold`` marks the decision threshold
    on the colour bar. ``brighten_photo`` brightens dark photos for display (see
    :func:`brighten`).

    NOTE: the detector compares its image score (the maximum patch score) with the
    threshold, not each pixel, and the map is blurred. So the map of a flagged frame can
    peak below the threshold mark.

    Size: ``W`` x ``H`` without ``caption``. With one, a band of
    ``caption_band_height(W, H, caption)`` rows is added below the frame (none for frames
    narrower than :data:`MIN_CAPTION_WIDTH`), so the PNG is ``W`` x ``H + band`` and rows
    ``0..H-1`` still match the anomaly map's pixels.
    """
    photo = brighten(rgb) if brighten_photo else rgb
    image = Image.fromarray(blend(photo, anomaly_map, vmin, vmax, alpha))
    if colour_bar:
        _draw_colour_bar(image, vmin, vmax, threshold)
    if caption:
        image = _add_caption(image, caption)

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
