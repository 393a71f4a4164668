"""Plain folder layout: good folder, defect folder, mask folder matched by stem."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.models.data import DataError, discover_plain, load_mask, load_rgb


def write_image(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def square_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[1:3, 2:4] = 255
    return mask


@pytest.fixture()
def plain(tmp_path: Path) -> Path:
    """Good: a grayscale JPEG and an RGB PNG of other sizes. Defects: three, two masked (with and without _mask)."""
    write_image(tmp_path / "good" / "g2.png", np.full((5, 7, 3), 40, dtype=np.uint8))
    write_image(tmp_path / "good" / "g1.jpg", np.full((9, 4), 90, dtype=np.uint8))
    write_image(tmp_path / "scratch" / "d1.png", np.full((6, 8, 3), 120, dtype=np.uint8))
    write_image(tmp_path / "scratch" / "d2.png", np.full((4, 4), 200, dtype=np.uint8))
    write_image(tmp_path / "scratch" / "d3.png", np.full((6, 8, 3), 10, dtype=np.uint8))
    write_image(tmp_path / "masks" / "d1_mask.png", square_mask(6, 8))
    write_image(tmp_path / "masks" / "d2.png", square_mask(4, 4))
    return tmp_path


def test_plain_layout_lists_good_then_defects_with_masks(plain):
    samples = discover_plain(plain / "good", plain / "scratch", plain / "masks")

    listed = [(s.image_path.name, s.label, s.defect_type, s.mask_path and s.mask_path.name) for s in samples]
    assert listed == [
        ("g1.jpg", 0, "good", None),
        ("g2.png", 0, "good", None),
        ("d1.png", 1, "scratch", "d1_mask.png"),
        ("d2.png", 1, "scratch", "d2.png"),
        ("d3.png", 1, "scratch", None),
    ]


def test_plain_images_load_as_rgb(plain):
    samples = discover_plain(plain / "good", plain / "scratch", plain / "masks")

    shapes = [load_rgb(s.image_path).shape for s in samples]
    gray = load_rgb(samples[0].image_path)
    mask = load_mask(samples[2].mask_path, shapes[2])

    assert shapes == [(9, 4, 3), (5, 7, 3), (6, 8, 3), (4, 4, 3), (6, 8, 3)]
    assert (gray[..., 0] == gray[..., 2]).all()
    assert int(mask.sum()) == 4


def test_good_folder_alone(plain):
    samples = discover_plain(plain / "good")

    assert [s.label for s in samples] == [0, 0]


def test_unreadable_image_named_in_error(plain):
    (plain / "scratch" / "broken.png").write_bytes(b"not a png at all")

    with pytest.raises(DataError, match=r"broken\.png"):
        discover_plain(plain / "good", plain / "scratch", plain / "masks")


def test_unreadable_mask_named_in_error(plain):
    (plain / "masks" / "d3_mask.png").write_bytes(b"\x89PNG broken")

    with pytest.raises(DataError, match=r"mask .*d3_mask\.png"):
        discover_plain(plain / "good", plain / "scratch", plain / "masks")


def test_two_masks_for_one_stem_rejected(plain):
    write_image(plain / "masks" / "d1.png", square_mask(6, 8))

    with pytest.raises(DataError, match=r"two masks for image stem 'd1'.*d1\.png and d1_mask\.png"):
        discover_plain(plain / "good", plain / "scratch", plain / "masks")


def test_masks_beside_defect_images_need_the_suffix(plain):
    write_image(plain / "scratch" / "d3_mask.png", square_mask(6, 8))

    samples = discover_plain(plain / "good", plain / "scratch", plain / "scratch")

    assert {s.image_path.name: s.mask_path and s.mask_path.name for s in samples if s.label} == {
        "d1.png": None, "d2.png": None, "d3.png": "d3_mask.png",
    }


def test_mask_without_image_is_logged(plain, caplog):
    write_image(plain / "masks" / "orphan_mask.png", square_mask(6, 8))

    with caplog.at_level(logging.WARNING, logger="qcstream.models.data"):
        discover_plain(plain / "good", plain / "scratch", plain / "masks")

    assert "orphan_mask.png" in caplog.text


@pytest.mark.parametrize("folders, message", [
    (("missing",), r"good folder .*missing not found"),
    (("empty",), r"no images in good folder"),
    (("good", "missing"), r"defect folder .*missing not found"),
    (("good", None, "masks"), r"without a defect folder"),
])
def test_bad_folders_explained(plain, folders, message):
    (plain / "empty").mkdir()
    paths = [plain / name if name else None for name in folders]

    with pytest.raises(DataError, match=message):
        discover_plain(*paths)
