"""Generated scans: determinism, defect masks and modalities, sensor realism, data set layout."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.models.data import discover, load_mask
from qcstream.models.point_clouds import (
    cloud_to_points,
    fit_plane_ransac,
    read_organized_cloud,
    remove_background_plane,
    valid_mask,
)
from qcstream.models.scan_generator import (
    DEFECT_AREA_RANGE,
    DEFECT_TYPES,
    PARTS,
    Z_NOISE_SIGMA,
    generate_scan,
    write_dataset,
)

SIZE = (96, 112)
SEEDS = (0, 1)


def changed_pixels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return ``(H, W)`` bool: pixels where any channel differs."""
    return (a != b).any(axis=-1)


def test_same_seed_byte_identical():
    for part in PARTS:
        for defect in (None, "cut"):
            first = generate_scan(part, 11, defect, SIZE)
            second = generate_scan(part, 11, defect, SIZE)
            assert first.rgb.tobytes() == second.rgb.tobytes(), (part, defect)
            assert first.xyz.tobytes() == second.xyz.tobytes(), (part, defect)
            assert first.mask.tobytes() == second.mask.tobytes(), (part, defect)


def test_different_seeds_differ():
    for part in PARTS:
        first = generate_scan(part, 0, size=SIZE)
        second = generate_scan(part, 1, size=SIZE)
        # Pose jitter moves the part, so its pixels differ, not only the noise.
        assert not np.array_equal(first.foreground, second.foreground), part
        assert changed_pixels(first.rgb, second.rgb).mean() > 0.5, part
        assert changed_pixels(first.xyz, second.xyz).mean() > 0.5, part


def test_scan_arrays_and_labels():
    scan = generate_scan("plate", 0, None, SIZE)
    assert scan.rgb.shape == (*SIZE, 3)
    assert scan.rgb.dtype == np.uint8
    assert scan.xyz.shape == (*SIZE, 3)
    assert scan.xyz.dtype == np.float32
    assert scan.mask.shape == SIZE
    assert scan.mask.dtype == np.uint8
    assert not scan.mask.any()
    assert scan.part == "plate"
    assert scan.defect_type == "good"


def test_defect_types_table():
    assert set(DEFECT_TYPES) == {"dent", "bump", "stain", "contamination", "hole", "cut"}
    assert {DEFECT_TYPES[name] for name in ("dent", "bump")} == {"3d"}
    assert {DEFECT_TYPES[name] for name in ("stain", "contamination")} == {"rgb"}
    assert {DEFECT_TYPES[name] for name in ("hole", "cut")} == {"both"}


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("defect", list(DEFECT_TYPES))
def test_defect_mask_and_modality(part: str, defect: str):
    modality = DEFECT_TYPES[defect]
    for seed in SEEDS:
        good = generate_scan(part, seed, None, SIZE)
        scan = generate_scan(part, seed, defect, SIZE)
        mask = scan.mask > 0
        case = f"{part}/{defect}/seed {seed}"

        assert scan.defect_type == defect
        assert set(np.unique(scan.mask)) == {0, 255}, case
        assert np.array_equal(scan.foreground, good.foreground), case
        assert not (mask & ~good.foreground).any(), f"{case}: mask leaves the part"
        fraction = mask.sum() / good.foreground.sum()
        assert DEFECT_AREA_RANGE[0] <= fraction <= DEFECT_AREA_RANGE[1], f"{case}: area fraction {fraction:.4f}"

        rgb_changed = changed_pixels(scan.rgb, good.rgb)
        xyz_changed = changed_pixels(scan.xyz, good.xyz)
        assert not rgb_changed[~mask].any(), f"{case}: RGB changed outside the mask"
        assert not xyz_changed[~mask].any(), f"{case}: xyz changed outside the mask"

        if modality == "3d":
            assert not rgb_changed.any(), f"{case}: a 3D-only defect changed the RGB"
        else:
            assert rgb_changed[mask].all(), f"{case}: RGB unchanged at {(~rgb_changed[mask]).sum()} mask pixels"

        if modality == "rgb":
            assert not xyz_changed.any(), f"{case}: a colour-only defect changed xyz"
        else:
            measured = mask & valid_mask(good.xyz) & valid_mask(scan.xyz)
            # The projector's shadow can hide most of a small hole, so a fifth of the mask suffices.
            assert measured.sum() >= 0.2 * mask.sum(), f"{case}: too few measured mask pixels to compare"
            z_change = np.abs(scan.xyz[..., 2] - good.xyz[..., 2])[measured]
            assert z_change.min() > 3 * Z_NOISE_SIGMA, f"{case}: z change {z_change.min():.2e} m"


def test_dent_lowers_and_bump_raises():
    for defect, sign in (("dent", 1.0), ("bump", -1.0)):
        good = generate_scan("bagel", 3, None, SIZE)
        scan = generate_scan("bagel", 3, defect, SIZE)
        measured = (scan.mask > 0) & valid_mask(good.xyz) & valid_mask(scan.xyz)
        # z is the distance from the sensor: a dent is farther away, a bump nearer.
        z_change = scan.xyz[..., 2][measured] - good.xyz[..., 2][measured]
        assert (sign * z_change > 0).all(), defect


def test_table_noise_matches_sigma():
    scan = generate_scan("plate", 5, None, (160, 160))
    table = ~scan.foreground & valid_mask(scan.xyz)
    points = scan.xyz[table].astype(np.float64)

    # The table is a plane, so what is left after a least-squares plane fit is sensor noise.
    design = np.column_stack([points[:, 0], points[:, 1], np.ones(len(points))])
    coefficients, *_ = np.linalg.lstsq(design, points[:, 2], rcond=None)
    residual = points[:, 2] - design @ coefficients

    assert residual.std() == pytest.approx(Z_NOISE_SIGMA, rel=0.1)
    assert np.abs(coefficients[:2]).max() > 0, "the table should be tilted"


def test_dropouts_on_table_and_part():
    for part in PARTS:
        scan = generate_scan(part, 2, None, SIZE)
        missing = ~valid_mask(scan.xyz)
        assert 0.005 < missing.mean() < 0.2, f"{part}: {missing.mean():.3f} of the pixels missing"
        assert (missing & scan.foreground).any(), part
        assert (missing & ~scan.foreground).any(), part
        assert (scan.xyz[missing] == 0).all(), part


def test_remove_background_plane_leaves_part():
    for part in PARTS:
        scan = generate_scan(part, 4, None, SIZE)
        cleaned = remove_background_plane(scan.xyz, distance=0.002)
        remaining = valid_mask(cleaned)
        measured_part = scan.foreground & valid_mask(scan.xyz)

        assert not (remaining & ~scan.foreground).any(), f"{part}: table pixels survived"
        if part == "plate":
            # The plate is 6 mm thick everywhere, well clear of the 2 mm band.
            assert np.array_equal(remaining, measured_part)
        else:
            # Rounded parts lose their lowest rim.
            assert remaining.sum() >= 0.8 * measured_part.sum(), part


def test_dent_floor_survives_plane_removal():
    for part, defect, seed in itertools.product(PARTS, ("dent", "cut"), range(4)):
        scan = generate_scan(part, seed, defect, SIZE)
        measured = (scan.mask > 0) & valid_mask(scan.xyz)
        remaining = valid_mask(remove_background_plane(scan.xyz, distance=0.002, iterations=50))
        assert remaining[measured].all(), f"{part}/{defect}/seed {seed}: {(~remaining[measured]).sum()} defect pixels removed"


def test_table_plane_faces_sensor():
    scan = generate_scan("ring", 6, None, SIZE)
    points, pixel_index = cloud_to_points(scan.xyz)
    normal, offset, inliers = fit_plane_ransac(points, distance=0.001, iterations=50)
    assert normal[2] < -0.99
    assert offset == pytest.approx(0.4, abs=0.01)
    assert not scan.foreground.ravel()[pixel_index[inliers]].any()


def test_generate_scan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown part 'gear'"):
        generate_scan("gear", 0)
    with pytest.raises(ValueError, match="unknown defect 'scratch'"):
        generate_scan("ring", 0, "scratch")
    with pytest.raises(ValueError, match=r"invalid scan size \(8, 224\)"):
        generate_scan("ring", 0, None, (8, 224))
    with pytest.raises(ValueError, match="seed -1"):
        generate_scan("ring", -1)


def test_scan_time_224():
    generate_scan("bagel", 0, "cut")
    best = min(_timed(lambda: generate_scan("bagel", 1, "cut")) for _ in range(3))
    assert best < 0.2, f"one 224x224 scan took {best:.3f} s"


def _timed(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


# --- data set on disk -------------------------------------------------------------


def test_write_dataset_layout_and_read_back(tmp_path: Path):
    category = write_dataset(
        tmp_path, "ring", seed=3, size=(64, 72), n_train=2, n_validation=1,
        n_test_good=1, n_test_per_defect=2, defects=("dent", "stain"), progress=False,
    )

    assert category == tmp_path / "ring"
    files = sorted(str(path.relative_to(category)) for path in category.rglob("*") if path.is_file())
    expected = [
        "test/dent/gt/000.png", "test/dent/gt/001.png",
        "test/dent/rgb/000.png", "test/dent/rgb/001.png",
        "test/dent/xyz/000.tiff", "test/dent/xyz/001.tiff",
        "test/good/gt/000.png", "test/good/rgb/000.png", "test/good/xyz/000.tiff",
        "test/stain/gt/000.png", "test/stain/gt/001.png",
        "test/stain/rgb/000.png", "test/stain/rgb/001.png",
        "test/stain/xyz/000.tiff", "test/stain/xyz/001.tiff",
        "train/good/rgb/000.png", "train/good/rgb/001.png",
        "train/good/xyz/000.tiff", "train/good/xyz/001.tiff",
        "validation/good/rgb/000.png", "validation/good/xyz/000.tiff",
    ]
    assert files == expected

    for path in category.rglob("*.tiff"):
        xyz = read_organized_cloud(path)
        assert xyz.shape == (64, 72, 3)
        assert valid_mask(xyz).mean() > 0.8, path
    for path in category.rglob("rgb/*.png"):
        with Image.open(path) as image:
            assert image.mode == "RGB"
            assert image.size == (72, 64)
    for path in category.rglob("gt/*.png"):
        with Image.open(path) as image:
            assert image.mode == "L"
            values = set(np.unique(np.asarray(image)))
        if path.parts[-3] == "good":
            assert values == {0}, path
        else:
            assert values == {0, 255}, path

    # Scans in one folder are different parts, not copies.
    first = np.asarray(Image.open(category / "train/good/rgb/000.png"))
    second = np.asarray(Image.open(category / "train/good/rgb/001.png"))
    assert not np.array_equal(first, second)


def test_write_dataset_loads_with_discover(tmp_path: Path):
    category = write_dataset(
        tmp_path, "plate", size=(64, 64), n_train=1, n_validation=1,
        n_test_good=1, n_test_per_defect=1, defects=("hole",), progress=False,
    )

    samples = discover(category, "test")

    assert [(s.defect_type, s.label) for s in samples] == [("good", 0), ("hole", 1)]
    assert all(s.xyz_path is not None for s in samples)
    assert load_mask(samples[1].mask_path, (64, 64)).any()


def test_write_dataset_same_seed_same_files(tmp_path: Path):
    options = dict(size=(48, 48), n_train=1, n_validation=0, n_test_good=0, n_test_per_defect=1, defects=("bump",), progress=False)
    first = write_dataset(tmp_path / "a", "bagel", seed=9, **options)
    second = write_dataset(tmp_path / "b", "bagel", seed=9, **options)
    for relative in ("train/good/xyz/000.tiff", "test/bump/rgb/000.png", "test/bump/gt/000.png"):
        assert (first / relative).read_bytes() == (second / relative).read_bytes(), relative


def test_write_dataset_rejects_non_empty_folder(tmp_path: Path):
    (tmp_path / "ring").mkdir()
    (tmp_path / "ring" / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already contains files"):
        write_dataset(tmp_path, "ring", n_train=1, progress=False)


def test_write_dataset_rejects_bad_counts(tmp_path: Path):
    with pytest.raises(ValueError, match="n_train=-1"):
        write_dataset(tmp_path, "ring", n_train=-1, progress=False)
    with pytest.raises(ValueError, match="seed=-2"):
        write_dataset(tmp_path, "ring", seed=-2, progress=False)
    with pytest.raises(ValueError, match="unknown defect 'crack'"):
        write_dataset(tmp_path, "ring", defects=("crack",), progress=False)
    assert not list(tmp_path.iterdir())
