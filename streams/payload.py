"""Decode and validate the payloads that frame references point to.

A payload arrives from a camera station outside the worker's control. Each way it
can be wrong (corrupt bytes, a size other than the declared one, odd channels or
dtypes, NaN values) raises :class:`PayloadError` with a reason for the dead-letter
topic.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
from PIL import Image, UnidentifiedImageError

from qcstream.streams.records import FrameRef

#: Pillow image modes we convert to RGB; 16-bit and float modes are rejected.
_IMAGE_MODES = {"RGB", "RGBA", "L", "LA", "P", "PA", "1"}


class PayloadError(ValueError):
    """A payload that cannot be turned into a valid image or point cloud."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _check_size(subject: str, width: int, height: int, ref_width: int | None, ref_height: int | None) -> None:
    if ref_width is None or ref_height is None:
        return
    if (width, height) != (ref_width, ref_height):
        raise PayloadError(
            f"{subject} is {width}x{height} (width x height) but the frame reference declares "
            f"{ref_width}x{ref_height}"
        )


def _decode_png(payload: bytes, width: int, height: int) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(payload))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise PayloadError(f"payload is not a decodable image: {error}") from error

    if image.format != "PNG":
        raise PayloadError(f"payload is a {image.format} image but the frame reference declares png")

    # The header gives the size, so a wrong or huge image is rejected before decoding it.
    _check_size("image", image.width, image.height, width, height)
    if image.mode not in _IMAGE_MODES:
        raise PayloadError(f"unsupported image mode {image.mode!r}: send 8-bit RGB or grayscale")

    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise PayloadError(f"corrupt image payload: {error}") from error

    rgb = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return np.ascontiguousarray(rgb)


def _load_npy(payload: bytes) -> np.ndarray:
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise PayloadError(f"payload is not a valid .npy array: {error}") from error
    if not isinstance(array, np.ndarray):
        raise PayloadError("payload is an .npz archive: expected a single .npy array")
    return array


def _float_to_uint8(array: np.ndarray) -> np.ndarray:
    """Convert a float image in [0, 1] or [0, 255] to uint8."""
    if not np.all(np.isfinite(array)):
        raise PayloadError("image array has NaN or infinite values")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 255.0:
        raise PayloadError(f"float image values span [{low:g}, {high:g}]: expected [0, 1] or [0, 255]")
    scale = 255.0 if high <= 1.0 else 1.0
    return np.round(array.astype(np.float64) * scale).astype(np.uint8)


def image_array_to_rgb(array: np.ndarray) -> np.ndarray:
    """Return an ``(H, W, 3)`` uint8 copy of a grayscale, RGB or RGBA image array.

    Accepts uint8 arrays and float arrays with values in [0, 1] or [0, 255].
    """
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4) or array.shape[0] == 0 or array.shape[1] == 0:
        raise PayloadError(
            f"image array has shape {array.shape}: expected (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
        )

    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        pixels = _float_to_uint8(array)
    else:
        raise PayloadError(f"image array has dtype {array.dtype}: expected uint8 or float")

    if pixels.shape[2] == 1:
        pixels = np.repeat(pixels, 3, axis=2)
    elif pixels.shape[2] == 4:
        pixels = pixels[:, :, :3]
    return np.ascontiguousarray(pixels, dtype=np.uint8)


def decode_frame(ref: FrameRef, payload: bytes) -> np.ndarray:
    """Return the frame as ``(H, W, 3)`` uint8 RGB, checked against ``ref``.

    Raises :class:`PayloadError` when the payload is not what ``ref`` declares.
    """
    if not payload:
        raise PayloadError("payload is empty")

    if ref.payload_format == "png":
        return _decode_png(payload, ref.width, ref.height)

    rgb = image_array_to_rgb(_load_npy(payload))
    _check_size("image array", rgb.shape[1], rgb.shape[0], ref.width, ref.height)
    return rgb


def decode_point_cloud(payload: bytes, width: int | None = None, height: int | None = None) -> np.ndarray:
    """Return an organized point cloud as ``(H, W, 3)`` float32.

    ``payload`` is a ``.npy`` array or an ``.npz`` archive holding one array (or one
    named ``xyz``). Points the sensor did not see are expected as 0, not NaN.
    """
    if not payload:
        raise PayloadError("point cloud payload is empty")

    if zipfile.is_zipfile(io.BytesIO(payload)):
        try:
            with np.load(io.BytesIO(payload), allow_pickle=False) as archive:
                names = list(archive.files)
                if "xyz" in names:
                    array = archive["xyz"]
                elif len(names) == 1:
                    array = archive[names[0]]
                else:
                    raise PayloadError(f"point cloud archive contains arrays {names}: expected one, or one named 'xyz'")
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise PayloadError(f"point cloud payload is not a valid .npz archive: {error}") from error
    else:
        array = _load_npy(payload)

    if array.ndim != 3 or array.shape[2] != 3:
        raise PayloadError(f"point cloud has shape {array.shape}: expected (H, W, 3)")
    if not np.issubdtype(array.dtype, np.floating):
        raise PayloadError(f"point cloud has dtype {array.dtype}: expected float")
    if not np.all(np.isfinite(array)):
        raise PayloadError("point cloud has NaN or infinite values: mark missing points with 0")
    _check_size("point cloud", array.shape[1], array.shape[0], width, height)
    return np.ascontiguousarray(array, dtype=np.float32)
