"""Discovery and loading of inspection images laid out as in MVTec AD or MVTec 3D-AD.

MVTec AD::

    <root>/<split>/<type>/<stem>.png|jpg
    <root>/ground_truth/<type>/<stem>_mask.png

MVTec 3D-AD::

    <root>/<split>/<type>/rgb/NNN.png
    <root>/<split>/<type>/gt/NNN.png
    <root>/<split>/<type>/xyz/NNN.tiff      (optional: runs RGB-only without it)

``<type>`` is ``good`` for defect-free parts and the defect name otherwise.
:func:`discover_plain` reads a third layout: a folder of good images, a folder of
defect images and a folder of their masks, matched by file stem.
Only numpy, Pillow and (for point clouds) tifffile are used, so the camera
station can load images without the worker's dependencies.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
GOOD = "good"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp"})
XYZ_SUFFIXES = (".tiff", ".tif")

LAYOUTS_HELP = (
    "expected MVTec AD layout (<root>/<split>/<type>/*.png|jpg, masks at "
    "<root>/ground_truth/<type>/<stem>_mask.png) or MVTec 3D-AD layout "
    "(<root>/<split>/<type>/rgb/NNN.png, masks at <root>/<split>/<type>/gt/NNN.png)"
)

T = TypeVar("T")


class DataError(Exception):
    """A data folder or file that cannot be used. The message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One inspection image and what is known about it."""

    image_path: Path
    #: Pixel mask (0 good, non-zero defect). None when the data set has no
    #: mask for the image, which for a good image means "no defect pixel".
    mask_path: Path | None
    #: 0 for a good part, 1 for a defective one.
    label: int
    #: Name of the type folder: "good" or the defect name.
    defect_type: str
    #: Organized point cloud of an MVTec 3D-AD sample, when present.
    xyz_path: Path | None = None


def discover(root: str | Path, split: str | None = None) -> list[Sample]:
    """List the samples of one split, sorted by type folder, then file name.

    ``root`` may be a data set root, which requires ``split``. It may also be a
    split folder such as ``<root>/test`` or a single type folder such as
    ``<root>/train/good`` (for 3D-AD, the folder containing ``rgb/``, or
    ``rgb/`` itself), and then ``split`` is ignored. The layout is detected
    per type folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} not found or not a folder; check the path")
    if split is not None and split not in SPLITS:
        raise DataError(f"invalid split {split!r}; use one of {', '.join(SPLITS)}")

    type_folders, ground_truth = _resolve_type_folders(root, split)
    samples = [sample for folder in type_folders for sample in _samples_in(folder, ground_truth)]
    if not samples:
        raise DataError(f"no images found under {root}: {LAYOUTS_HELP}")

    defective = sum(sample.label for sample in samples)
    logger.info(
        "discovered %d samples (%d defective, %d good) in %d type folder(s) under %s",
        len(samples), defective, len(samples) - defective, len(type_folders), root,
    )
    return samples


def discover_plain(
    good_dir: str | Path,
    defect_dir: str | Path | None = None,
    mask_dir: str | Path | None = None,
) -> list[Sample]:
    """List the samples of plain folders: good images, defect images, defect masks.

    Masks in ``mask_dir`` belong to the defect image of the same stem, written
    ``<stem>.<ext>`` or ``<stem>_mask.<ext>``. Returns the good samples, then the
    defect samples, each sorted by file name. ``defect_type`` is ``good``, or the
    name of ``defect_dir`` for defect samples. Each image and mask header is
    opened once, so a file that is not a readable image raises :class:`DataError`
    here and not in the middle of a fit.
    """
    good_dir = _existing_folder(good_dir, "good")
    good = [Sample(image_path=path, mask_path=None, label=0, defect_type=GOOD) for path in _images_in(good_dir)]
    if not good:
        raise DataError(f"no images in good folder {good_dir}; expected {', '.join(sorted(IMAGE_SUFFIXES))} files")

    defects: list[Sample] = []
    if defect_dir is not None:
        defect_dir = _existing_folder(defect_dir, "defect")
        masks = {}
        if mask_dir is not None:
            mask_dir = _existing_folder(mask_dir, "mask")
            # Masks beside their images must carry the _mask suffix, or each image would be its own mask.
            masks = _masks_by_stem(mask_dir, suffixed_only=mask_dir.resolve() == defect_dir.resolve())
        defect_type = defect_dir.name if defect_dir.name != GOOD else "defect"
        for path in _images_in(defect_dir):
            mask = masks.pop(path.stem, None)
            defects.append(Sample(image_path=path, mask_path=mask, label=1, defect_type=defect_type))
        if masks:
            logger.warning(
                "%d masks in %s match no defect image in %s by stem and are ignored, e.g. %s",
                len(masks), mask_dir, defect_dir, sorted(masks.values())[0].name,
            )
        unmasked = sum(1 for sample in defects if sample.mask_path is None)
        if unmasked:
            logger.warning(
                "%d of %d defect images in %s have no mask in %s; pixel metrics will treat them as all-good pixels",
                unmasked, len(defects), defect_dir, mask_dir,
            )
    elif mask_dir is not None:
        raise DataError(f"mask folder {mask_dir} given without a defect folder; masks belong to defect images, so pass defect_dir too")

    samples = good + defects
    for sample in samples:
        _check_image_header(sample.image_path, "image")
        if sample.mask_path is not None:
            _check_image_header(sample.mask_path, "mask")
    logger.info("discovered %d samples (%d defective, %d good) in plain folders under %s", len(samples), len(defects), len(good), good_dir)
    return samples


def load_rgb(path: str | Path) -> np.ndarray:
    """Read an image as ``(H, W, 3)`` uint8 RGB.

    Grayscale, palette, RGBA and CMYK images are converted, and alpha is dropped.
    16-bit grayscale is scaled to 8 bits instead of being clipped.
    """
    return _read_image(Path(path), "image", _to_rgb)


def load_mask(path: str | Path | None, shape: tuple[int, ...]) -> np.ndarray:
    """Read a defect mask as ``(H, W)`` bool, True where the pixel is non-zero.

    ``shape`` is the image shape (its first two entries are used). ``path=None``
    gives an all-False mask. A mask of another size is resized to ``shape``
    with nearest-neighbour sampling and a warning.
    """
    if len(shape) < 2 or shape[0] < 1 or shape[1] < 1:
        raise DataError(f"load_mask: shape {shape!r} must start with a positive height and width")
    height, width = int(shape[0]), int(shape[1])
    if path is None:
        return np.zeros((height, width), dtype=bool)

    path = Path(path)
    mask = _read_image(path, "mask", _to_binary)
    if mask.shape != (height, width):
        logger.warning(
            "mask %s is %dx%d but its image is %dx%d (height x width); resizing with nearest neighbour",
            path, mask.shape[0], mask.shape[1], height, width,
        )
        resized = Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST)
        mask = np.asarray(resized, dtype=bool)
    return mask


def load_xyz(path: str | Path) -> np.ndarray:
    """Read an MVTec 3D-AD organized point cloud as ``(H, W, 3)`` float32 x, y, z.

    See :func:`qcstream.models.point_clouds.read_organized_cloud`, which this calls.
    """
    try:
        import tifffile  # noqa: F401 - checked here for a clear message; point_clouds reads with it.
    except ImportError as exc:
        raise DataError(
            "reading point clouds needs tifffile, which is missing; install it: pip install tifffile"
        ) from exc
    from qcstream.models.point_clouds import read_organized_cloud

    return read_organized_cloud(path)


def _resolve_type_folders(root: Path, split: str | None) -> tuple[list[Path], Path]:
    """Return the type folders to scan and the MVTec AD ``ground_truth`` folder for them."""
    present = [name for name in SPLITS if (root / name).is_dir()]
    if present:
        if split is None:
            raise DataError(
                f"{root} is a data set root with splits {', '.join(present)}; "
                "name one of them as the split"
            )
        if split not in present:
            raise DataError(
                f"{root} has no {split!r} split (found: {', '.join(present)}); "
                f"expected a folder {root / split}"
            )
        return _subfolders(root / split), root / "ground_truth"

    if root.name == "rgb" and _holds_images(root):
        root = root.parent
    if _is_type_folder(root):
        return [root], root.parent.parent / "ground_truth"

    # A split folder such as <root>/test, whose subfolders are the types.
    return _subfolders(root), root.parent / "ground_truth"


def _samples_in(type_folder: Path, ground_truth: Path) -> list[Sample]:
    defect_type = type_folder.name
    label = 0 if defect_type == GOOD else 1
    rgb_folder = type_folder / "rgb"

    samples = []
    if rgb_folder.is_dir():
        for image in _images_in(rgb_folder):
            mask = type_folder / "gt" / image.name
            samples.append(Sample(
                image_path=image,
                mask_path=mask if mask.is_file() else None,
                label=label,
                defect_type=defect_type,
                xyz_path=_xyz_for(type_folder / "xyz", image.stem),
            ))
    else:
        for image in _images_in(type_folder):
            mask = ground_truth / defect_type / f"{image.stem}_mask.png"
            samples.append(Sample(
                image_path=image,
                mask_path=mask if mask.is_file() else None,
                label=label,
                defect_type=defect_type,
            ))

    unmasked = sum(1 for sample in samples if sample.label == 1 and sample.mask_path is None)
    if unmasked:
        logger.warning(
            "%d of %d %r images in %s have no mask; pixel metrics will treat them as all-good pixels",
            unmasked, len(samples), defect_type, type_folder,
        )
    return samples


def _xyz_for(xyz_folder: Path, stem: str) -> Path | None:
    for suffix in XYZ_SUFFIXES:
        candidate = xyz_folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _is_type_folder(folder: Path) -> bool:
    return (folder / "rgb").is_dir() or _holds_images(folder)


def _holds_images(folder: Path) -> bool:
    return any(True for _ in _iter_images(folder))


def _images_in(folder: Path) -> list[Path]:
    return sorted(_iter_images(folder))


def _iter_images(folder: Path) -> Iterator[Path]:
    """Yield the image files directly in ``folder``, skipping hidden files and ``*_mask`` files."""
    for entry in folder.iterdir():
        if (
            entry.suffix.lower() in IMAGE_SUFFIXES
            and not entry.name.startswith(".")
            and not entry.stem.endswith("_mask")
            and entry.is_file()
        ):
            yield entry


def _subfolders(folder: Path) -> list[Path]:
    return sorted(
        entry for entry in folder.iterdir() if entry.is_dir() and not entry.name.startswith(".")
    )


def _existing_folder(folder: str | Path, what: str) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{what} folder {folder} not found or not a folder; check the path")
    return folder


def _masks_by_stem(mask_dir: Path, suffixed_only: bool = False) -> dict[str, Path]:
    """Map each image stem to its mask in ``mask_dir``, named ``<stem>`` or ``<stem>_mask`` (only the latter if ``suffixed_only``)."""
    masks: dict[str, Path] = {}
    candidates = sorted(
        entry for entry in mask_dir.iterdir()
        if entry.suffix.lower() in IMAGE_SUFFIXES
        and not entry.name.startswith(".")
        and (entry.stem.endswith("_mask") or not suffixed_only)
        and entry.is_file()
    )
    for mask in candidates:
        stem = mask.stem.removesuffix("_mask")
        if stem in masks:
            raise DataError(
                f"two masks for image stem {stem!r} in {mask_dir}: {masks[stem].name} and {mask.name}; "
                "keep one of them"
            )
        masks[stem] = mask
    return masks


def _check_image_header(path: Path, what: str) -> None:
    """Open ``path`` without decoding the pixels, raising :class:`DataError` naming it when that fails."""
    try:
        with Image.open(path):
            pass
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read {what} {path}: {exc}. The file is damaged or not an image; "
            "replace it or remove it from the folder"
        ) from exc


def _read_image(path: Path, what: str, convert: Callable[[Image.Image, Path], T]) -> T:
    """Open, fully decode and convert an image, turning read failures into :class:`DataError`."""
    try:
        with Image.open(path) as image:
            image.load()
            return convert(image, path)
    except FileNotFoundError as exc:
        raise DataError(f"{what} {path} not found; check the path or run discover() again") from exc
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"cannot read {what} {path}: {exc}. The file is damaged, truncated or not an image; "
            "replace it from the original data set or remove it from the folder"
        ) from exc


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode.startswith("I;16"):
        gray = np.asarray(image).astype(np.float64)
        gray8 = np.clip(np.round(gray / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(gray8[:, :, None], 3, axis=2)
    if image.mode == "F":
        raise DataError(
            f"unsupported image {path}: floating-point pixels; "
            "save it as 8-bit RGB or grayscale PNG/JPEG"
        )
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _to_binary(image: Image.Image, path: Path) -> np.ndarray:
    if image.mode in ("1", "L", "I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image)
    else:
        values = np.asarray(image.convert("L"))
    return values != 0
