"""Data discovery and loading: tiny synthetic folders in both layouts, and the real data."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from qcstream.models.data import DataError, Sample, discover, load_mask, load_rgb, load_xyz

# The shared data sits beside the project checkout (tests/unit/ -> repo -> its parent).
SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
TIRE = SHARED_DATA / "mvtec3d_tire"
TILE = SHARED_DATA / "magnetic_tile"
needs_real_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA}"
)


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_xyz(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, array, photometric="minisblack", planarconfig="contig")
    return path


def rgb(height: int, width: int, value: int) -> np.ndarray:
    return np.full((height, width, 3), value, dtype=np.uint8)


def mask_array(height: int, width: int, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[rows, cols] = 255
    return mask


@pytest.fixture()
def mvtec_ad(tmp_path: Path) -> Path:
    """MVTec AD layout: 2 train goods, test good + two scratches (one with a smaller mask)."""
    root = tmp_path / "ad"
    write_png(root / "train" / "good" / "b.png", rgb(6, 8, 10))
    Image.fromarray(np.full((6, 8), 20, dtype=np.uint8)).save(root / "train" / "good" / "a.jpg")
    (root / "train" / "good" / "notes.txt").write_text("not an image")
    write_png(root / "train" / "good" / ".hidden.png", rgb(6, 8, 0))

    write_png(root / "test" / "good" / "c.png", rgb(6, 8, 30))
    write_png(root / "test" / "scratch" / "e.png", rgb(6, 8, 50))
    write_png(root / "test" / "scratch" / "d.png", rgb(6, 8, 40))
    masks = root / "ground_truth" / "scratch"
    write_png(masks / "d_mask.png", mask_array(6, 8, slice(1, 3), slice(2, 5)))
    write_png(masks / "e_mask.png", mask_array(3, 4, slice(0, 1), slice(0, 2)))
    return root


@pytest.fixture()
def mvtec_3d(tmp_path: Path) -> Path:
    """MVTec 3D-AD layout: point clouds for some samples only."""
    root = tmp_path / "3d"
    write_png(root / "train" / "good" / "rgb" / "000.png", rgb(5, 4, 1))
    write_png(root / "train" / "good" / "rgb" / "001.png", rgb(5, 4, 2))
    write_xyz(root / "train" / "good" / "xyz" / "000.tiff", np.ones((5, 4, 3), dtype=np.float32))

    write_png(root / "test" / "good" / "rgb" / "000.png", rgb(5, 4, 3))
    write_png(root / "test" / "good" / "gt" / "000.png", np.zeros((5, 4), dtype=np.uint8))
    write_png(root / "test" / "hole" / "rgb" / "000.png", rgb(5, 4, 4))
    write_png(root / "test" / "hole" / "gt" / "000.png", mask_array(5, 4, slice(2, 4), slice(1, 2)))
    xyz = np.arange(5 * 4 * 3, dtype=np.float32).reshape(5, 4, 3)
    write_xyz(root / "test" / "hole" / "xyz" / "000.tiff", xyz)
    return root


def test_discover_mvtec_ad_test_split(mvtec_ad: Path) -> None:
    samples = discover(mvtec_ad, "test")

    assert samples == [
        Sample(mvtec_ad / "test/good/c.png", None, 0, "good"),
        Sample(mvtec_ad / "test/scratch/d.png", mvtec_ad / "ground_truth/scratch/d_mask.png",
               1, "scratch"),
        Sample(mvtec_ad / "test/scratch/e.png", mvtec_ad / "ground_truth/scratch/e_mask.png",
               1, "scratch"),
    ]


def test_discover_skips_non_images(mvtec_ad: Path) -> None:
    samples = discover(mvtec_ad, "train")

    assert [sample.image_path.name for sample in samples] == ["a.jpg", "b.png"]


def test_discover_accepts_split_and_type_folders(mvtec_ad: Path) -> None:
    assert discover(mvtec_ad / "train" / "good") == discover(mvtec_ad, "train")
    assert discover(mvtec_ad / "test") == discover(mvtec_ad, "test")
    # A type folder still finds its masks in <root>/ground_truth.
    assert discover(mvtec_ad / "test" / "scratch", "test") == discover(mvtec_ad, "test")[1:]


def test_discover_mvtec_3d(mvtec_3d: Path) -> None:
    train = discover(mvtec_3d, "train")
    test = discover(mvtec_3d, "test")

    assert train == [
        Sample(mvtec_3d / "train/good/rgb/000.png", None, 0, "good",
               mvtec_3d / "train/good/xyz/000.tiff"),
        Sample(mvtec_3d / "train/good/rgb/001.png", None, 0, "good", None),
    ]
    assert test == [
        Sample(mvtec_3d / "test/good/rgb/000.png", mvtec_3d / "test/good/gt/000.png", 0, "good", None),
        Sample(
            mvtec_3d / "test/hole/rgb/000.png",
            mvtec_3d / "test/hole/gt/000.png",
            1,
            "hole",
            mvtec_3d / "test/hole/xyz/000.tiff",
        ),
    ]
    assert discover(mvtec_3d / "train" / "good", "train") == train
    assert discover(mvtec_3d / "train" / "good" / "rgb") == train


def test_discover_split_errors(mvtec_ad: Path) -> None:
    with pytest.raises(DataError, match="invalid split 'val'"):
        discover(mvtec_ad, "val")
    with pytest.raises(DataError, match="has no 'validation' split"):
        discover(mvtec_ad, "validation")
    with pytest.raises(DataError, match="name one of them as the split"):
        discover(mvtec_ad)


def test_discover_empty_and_missing_folders(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "good").mkdir()

    with pytest.raises(DataError, match=f"no images found under {empty}: expected MVTec AD layout"):
        discover(empty)
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "missing", "train")


def test_discover_warns_missing_masks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_png(tmp_path / "test" / "dent" / "x.png", rgb(2, 2, 0))

    with caplog.at_level(logging.WARNING, logger="qcstream.models.data"):
        samples = discover(tmp_path, "test")

    assert samples == [Sample(tmp_path / "test/dent/x.png", None, 1, "dent")]
    assert "1 of 1 'dent' images" in caplog.text


def test_load_rgb_converts_modes(tmp_path: Path) -> None:
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.jpg", quality=100)
    write_png(tmp_path / "gray.png", gray)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0], rgba[..., 3] = 7, 0
    write_png(tmp_path / "rgba.png", rgba)
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(tmp_path / "palette.png")
    write_png(tmp_path / "sixteen.png", np.array([[0, 257 * 100, 65535]], dtype=np.uint16))

    from_png = load_rgb(tmp_path / "gray.png")
    assert from_png.shape == (2, 2, 3)
    assert from_png.dtype == np.uint8
    np.testing.assert_array_equal(from_png, np.stack([gray] * 3, axis=2))

    from_jpg = load_rgb(tmp_path / "gray.jpg")
    assert from_jpg.shape == (2, 2, 3)
    np.testing.assert_array_equal(from_jpg[..., 0], from_jpg[..., 2])

    expected_rgba = np.zeros((2, 2, 3), dtype=np.uint8)
    expected_rgba[..., 0] = 7
    np.testing.assert_array_equal(load_rgb(tmp_path / "rgba.png"), expected_rgba)
    np.testing.assert_array_equal(load_rgb(tmp_path / "palette.png"), [[[0, 0, 0], [10, 20, 30]]])
    np.testing.assert_array_equal(load_rgb(tmp_path / "sixteen.png")[..., 1], [[0, 100, 255]])


def test_load_rgb_rejects_float_images(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((2, 2), dtype=np.float32)).save(tmp_path / "float.tiff")

    with pytest.raises(DataError, match="floating-point pixels"):
        load_rgb(tmp_path / "float.tiff")


def test_corrupt_images_raise_data_error(tmp_path: Path) -> None:
    good = write_png(tmp_path / "good.png", rgb(32, 32, 90))
    data = good.read_bytes()
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not a png" * 10)

    with pytest.raises(DataError, match=f"cannot read image {truncated}.*replace it"):
        load_rgb(truncated)
    with pytest.raises(DataError, match=f"cannot read image {garbage}"):
        load_rgb(garbage)
    with pytest.raises(DataError, match=f"cannot read mask {garbage}"):
        load_mask(garbage, (32, 32))
    with pytest.raises(DataError, match=f"image {tmp_path / 'nope.png'} not found"):
        load_rgb(tmp_path / "nope.png")


def test_load_mask(mvtec_ad: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert not load_mask(None, (6, 8, 3)).any()
    assert load_mask(None, (6, 8, 3)).shape == (6, 8)

    same_size = load_mask(mvtec_ad / "ground_truth/scratch/d_mask.png", (6, 8, 3))
    assert same_size.dtype == bool
    np.testing.assert_array_equal(same_size, mask_array(6, 8, slice(1, 3), slice(2, 5)) > 0)

    # 3x4 mask with its top-left 1x2 set; nearest resize to 6x8 doubles each pixel.
    with caplog.at_level(logging.WARNING, logger="qcstream.models.data"):
        resized = load_mask(mvtec_ad / "ground_truth/scratch/e_mask.png", (6, 8))
    np.testing.assert_array_equal(resized, mask_array(6, 8, slice(0, 2), slice(0, 4)) > 0)
    assert "e_mask.png is 3x4 but its image is 6x8" in caplog.text

    with pytest.raises(DataError, match="positive height and width"):
        load_mask(None, (0, 8))


def test_load_xyz(mvtec_3d: Path, tmp_path: Path) -> None:
    xyz = load_xyz(mvtec_3d / "test/hole/xyz/000.tiff")

    assert xyz.dtype == np.float32
    np.testing.assert_array_equal(xyz, np.arange(60, dtype=np.float32).reshape(5, 4, 3))

    tifffile.imwrite(tmp_path / "flat.tiff", np.zeros((5, 4), dtype=np.float32))
    with pytest.raises(DataError, match=r"has shape \(5, 4\); expected \(H, W, 3\)"):
        load_xyz(tmp_path / "flat.tiff")
    (tmp_path / "bad.tiff").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="cannot read point cloud"):
        load_xyz(tmp_path / "bad.tiff")


@needs_real_data
def test_real_tire_splits() -> None:
    train = discover(TIRE, "train")
    validation = discover(TIRE, "validation")
    test = discover(TIRE, "test")

    assert len(train) == 210
    assert {s.label for s in train} == {0}
    assert len(validation) == 29
    assert {s.defect_type for s in validation} == {"good"}
    assert Counter(s.defect_type for s in test) == {
        "good": 13, "hole": 14, "cut": 14, "contamination": 14, "combined": 3,
    }
    assert all(s.mask_path is not None for s in test)
    assert all(s.xyz_path is None for s in test)
    assert discover(TIRE / "train" / "good") == train


@needs_real_data
def test_real_tire_images_and_masks() -> None:
    test = discover(TIRE, "test")

    for sample in test:
        image = load_rgb(sample.image_path)
        mask = load_mask(sample.mask_path, image.shape)
        assert image.shape == (400, 300, 3)
        assert image.dtype == np.uint8
        assert mask.any() == (sample.label == 1), sample


@needs_real_data
def test_real_magnetic_tile() -> None:
    train = discover(TILE, "train")
    test = discover(TILE, "test")

    assert len(train) == 551
    assert sum(s.label == 0 for s in test) == 199
    assert sum(s.label == 1 for s in test) == 187
    assert all((s.mask_path is None) == (s.label == 0) for s in test)

    for sample in test:
        image = load_rgb(sample.image_path)
        assert image.ndim == 3
        assert image.shape[2] == 3
        np.testing.assert_array_equal(image[..., 0], image[..., 1])
        if sample.mask_path is not None:
            with Image.open(sample.mask_path) as raw:
                assert raw.size == (image.shape[1], image.shape[0]), sample
