"""Decoding and validation of frame and point-cloud payloads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.streams.payload import PayloadError, decode_frame, decode_point_cloud
from qcstream.streams.records import FrameRef

TIRE_IMAGE = Path(__file__).resolve().parents[3].joinpath("shared/data/mvtec3d_tire/test/good/rgb/000.png")


def make_ref(width: int, height: int, payload_format: str = "png") -> FrameRef:
    return FrameRef(
        frame_id="cam-1-abc",
        line_id="line-1",
        camera_id="cam-1",
        captured_at=1_700_000_000.0,
        payload_bucket="frames",
        payload_key=f"line-1/cam-1/2023-11-14/cam-1-abc.{payload_format}",
        payload_format=payload_format,
        width=width,
        height=height,
    )


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_rgb_png_round_trips_exactly():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)

    decoded = decode_frame(make_ref(7, 5), png_bytes(rgb))

    assert decoded.dtype == np.uint8
    assert decoded.shape == (5, 7, 3)
    np.testing.assert_array_equal(decoded, rgb)


def test_real_tire_photo_decodes_to_its_size():
    with Image.open(TIRE_IMAGE) as image:
        width, height = image.size

    decoded = decode_frame(make_ref(width, height), TIRE_IMAGE.read_bytes())

    assert decoded.shape == (height, width, 3)


def test_grayscale_png_is_converted_to_rgb():
    gray = np.array([[0, 128], [200, 255]], dtype=np.uint8)

    decoded = decode_frame(make_ref(2, 2), png_bytes(gray))

    assert decoded.shape == (2, 2, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[:, :, channel], gray)


def test_rgba_png_drops_the_alpha_channel():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[..., 0] = 10
    rgba[..., 1] = 20
    rgba[..., 2] = 30
    rgba[..., 3] = 40

    decoded = decode_frame(make_ref(3, 2), png_bytes(rgba))

    np.testing.assert_array_equal(decoded, np.broadcast_to([10, 20, 30], (2, 3, 3)))


def test_size_other_than_declared_is_rejected():
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)

    with pytest.raises(PayloadError, match=r"6x4 .* declares 4x6"):
        decode_frame(make_ref(4, 6), png_bytes(rgb))


@pytest.mark.parametrize("payload", [b"not an image at all", b"\x89PNG\r\n\x1a\n garbage"])
def test_undecodable_bytes_are_rejected(payload):
    with pytest.raises(PayloadError, match="not a decodable image"):
        decode_frame(make_ref(4, 4), payload)


def test_truncated_png_is_rejected():
    rng = np.random.default_rng(1)
    data = png_bytes(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8))

    with pytest.raises(PayloadError, match="corrupt image payload"):
        decode_frame(make_ref(64, 64), data[: len(data) // 2])


def test_jpeg_declared_as_png_is_rejected():
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="JPEG")

    with pytest.raises(PayloadError, match="payload is a JPEG image but the frame reference declares png"):
        decode_frame(make_ref(4, 4), buffer.getvalue())


def test_empty_payload_is_rejected():
    with pytest.raises(PayloadError, match="empty"):
        decode_frame(make_ref(4, 4), b"")


def test_sixteen_bit_png_is_rejected():
    deep = np.full((3, 3), 40000, dtype=np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(deep).save(buffer, format="PNG")

    with pytest.raises(PayloadError, match="unsupported image mode"):
        decode_frame(make_ref(3, 3), buffer.getvalue())


def test_uint8_npy_is_accepted():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)

    decoded = decode_frame(make_ref(3, 2, "npy"), npy_bytes(rgb))

    np.testing.assert_array_equal(decoded, rgb)


def test_float_npy_unit_range_scaled():
    image = np.array([[[0.0, 0.5, 1.0]]], dtype=np.float32)

    decoded = decode_frame(make_ref(1, 1, "npy"), npy_bytes(image))

    # 0.5 * 255 = 127.5 rounds half to even: 128.
    np.testing.assert_array_equal(decoded, [[[0, 128, 255]]])


def test_float_npy_byte_range_rounded():
    image = np.array([[[0.0, 12.4, 254.6]]], dtype=np.float64)

    decoded = decode_frame(make_ref(1, 1, "npy"), npy_bytes(image))

    np.testing.assert_array_equal(decoded, [[[0, 12, 255]]])


def test_grayscale_npy_is_converted_to_rgb():
    gray = np.array([[7, 9]], dtype=np.uint8)

    decoded = decode_frame(make_ref(2, 1, "npy"), npy_bytes(gray))

    np.testing.assert_array_equal(decoded, [[[7, 7, 7], [9, 9, 9]]])


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((2, 2, 3), np.nan, dtype=np.float32), "NaN or infinite"),
        (np.full((2, 2, 3), 300.0, dtype=np.float32), r"span \[300, 300\]"),
        (np.full((2, 2, 3), -1.0, dtype=np.float32), "expected"),
        (np.zeros((2, 2, 3), dtype=np.int64), "dtype int64"),
        (np.zeros((2, 2, 2), dtype=np.uint8), "shape"),
        (np.zeros((2, 2, 3, 1), dtype=np.uint8), "shape"),
    ],
)
def test_bad_npy_arrays_are_rejected(array, message):
    with pytest.raises(PayloadError, match=message):
        decode_frame(make_ref(2, 2, "npy"), npy_bytes(array))


def test_npy_with_size_other_than_declared_is_rejected():
    with pytest.raises(PayloadError, match="declares"):
        decode_frame(make_ref(3, 3, "npy"), npy_bytes(np.zeros((2, 2, 3), dtype=np.uint8)))


def test_pickled_npy_is_refused():
    objects = np.array([{"a": 1}], dtype=object)

    with pytest.raises(PayloadError, match="not a valid .npy"):
        decode_frame(make_ref(1, 1, "npy"), npy_bytes(objects))


def test_point_cloud_npz_is_decoded_to_float32():
    xyz = np.arange(2 * 3 * 3, dtype=np.float64).reshape(2, 3, 3)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, xyz=xyz)

    decoded = decode_point_cloud(buffer.getvalue(), width=3, height=2)

    assert decoded.dtype == np.float32
    np.testing.assert_array_equal(decoded, xyz.astype(np.float32))


def test_point_cloud_npy_is_accepted():
    xyz = np.ones((2, 2, 3), dtype=np.float32)

    np.testing.assert_array_equal(decode_point_cloud(npy_bytes(xyz)), xyz)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.full((2, 2, 3), np.inf, dtype=np.float32), "NaN or infinite"),
        (np.zeros((2, 2), dtype=np.float32), "shape"),
        (np.zeros((2, 2, 3), dtype=np.int32), "dtype"),
    ],
)
def test_bad_point_clouds_are_rejected(array, message):
    with pytest.raises(PayloadError, match=message):
        decode_point_cloud(npy_bytes(array))


def test_point_cloud_of_another_size_is_rejected():
    with pytest.raises(PayloadError, match="declares 4x2"):
        decode_point_cloud(npy_bytes(np.zeros((2, 3, 3), dtype=np.float32)), width=4, height=2)


def test_point_cloud_archive_with_several_arrays_is_rejected():
    buffer = io.BytesIO()
    np.savez(buffer, a=np.zeros((1, 1, 3)), b=np.zeros((1, 1, 3)))

    with pytest.raises(PayloadError, match="expected one"):
        decode_point_cloud(buffer.getvalue())


def test_corrupt_point_cloud_is_rejected():
    with pytest.raises(PayloadError, match="not a valid"):
        decode_point_cloud(b"PK\x03\x04 broken zip")
