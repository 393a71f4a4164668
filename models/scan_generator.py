"""Procedural RGB + organized point cloud scans of industrial parts, with exact defect masks.

The 3D branch has no real point clouds to be tested on, so this module renders
scans in the MVTec 3D-AD format: a part lying on a slightly tilted table, seen
from above by an orthographic sensor 0.4 m away. Each scan has an organized cloud
``xyz`` ``(H, W, 3)`` float32 in metres, in the sensor frame, where z is the distance
along the viewing axis and empty pixels are all-zero. It also has an RGB image
``(H, W, 3)`` uint8 from the same viewpoint and a defect mask ``(H, W)`` uint8
(0 good, 255 defect).

Realism that a detector has to cope with:

- per-scan pose jitter of the part (rotation, translation), table tilt, light
  direction and exposure, and a new phase of every procedural texture;
- Gaussian sensor noise on z (``Z_NOISE_SIGMA``), random pixel dropouts, dropout
  clusters, dropouts on steep flanks and in the projector's shadow;
- Lambert plus specular shading, cast shadows and ambient occlusion in the RGB.

Defects change only the pixels of their mask. 3D-only defects change z and leave
the RGB as the good scan of the same seed shows it, colour-only defects change
the RGB and leave xyz untouched, and the others change both. With the same numpy
and scipy versions, the same ``(part, seed, defect, size)`` gives the same bytes,
and the good scan of a seed is the defective scan of that seed without the defect.

NOTE: the shading and the cast shadows are computed from the defect-free
geometry, so a dent or bump casts no shadow of its own. This keeps 3D-only
defects invisible in RGB, as the modality split requires.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import types
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from qcstream.models.point_clouds import write_organized_cloud

logger = logging.getLogger(__name__)

PARTS = ("ring", "plate", "bagel")

#: Defect name -> the modality it shows in: "3d" (geometry only), "rgb" (colour
#: only) or "both".
DEFECT_TYPES = types.MappingProxyType({
    "dent": "3d",
    "bump": "3d",
    "stain": "rgb",
    "contamination": "rgb",
    "hole": "both",
    "cut": "both",
})

GOOD = "good"

#: Width in metres of the table area seen by the shorter image side.
FIELD_OF_VIEW = 0.10
#: Distance in metres from the sensor to the table under the image centre.
SENSOR_DISTANCE = 0.40
#: Standard deviation in metres of the Gaussian noise on z: 0.15 mm, about 1 % of
#: the ring's 16 mm height. An assumed value, not taken from a sensor's data sheet.
Z_NOISE_SIGMA = 0.00015
#: Smallest and largest defect area, as a fraction of the part's pixels.
DEFECT_AREA_RANGE = (0.005, 0.03)

_MIN_SIZE = 32
_MAX_SIZE = 4096

# Random streams: each concern draws from its own generator, so adding a defect
# leaves the pose, textures, noise and dropouts of the scan unchanged.
_STREAM_POSE = 0
_STREAM_SURFACE = 1
_STREAM_Z_NOISE = 2
_STREAM_DROPOUT = 3
_STREAM_RGB_NOISE = 4
_STREAM_LIGHT = 5
_STREAM_DEFECT = 10

# Standard deviation of unit white noise after interpolation of the given spline
# order (measured), used to bring the procedural noise to roughly unit variance.
_INTERPOLATED_NOISE_STD = {1: 0.67, 3: 0.87}

# Pose jitter: in-plane rotation (radians), translation (metres), table tilt (radians).
_MAX_ROTATION = math.radians(10.0)
_MAX_SHIFT = 0.003
_TABLE_TILT_RANGE = (math.radians(0.5), math.radians(3.0))

# Defects lie on part pixels at least this high above the table, in metres.
_DEFECT_MIN_HEIGHT = 0.003
# The bottom of a dent or cut stays this far above the table, in metres, so that
# background-plane removal with a 2 mm band keeps it.
_DEFECT_FLOOR_CLEARANCE = 0.0025
# Geometry change of dents, bumps and cuts in metres: the minimum at their rim and
# the range of the maximum at their centre.
_DEFECT_MIN_DEPTH = 6 * Z_NOISE_SIGMA
_DEFECT_MAX_DEPTH = (0.0016, 0.0028)
_HOLE_DEPTH = (0.003, 0.005)
_PLACEMENT_ATTEMPTS = 60

# Sensor model: triangulation angle of the projector, seen from the camera axis.
_PROJECTOR_ANGLE = math.radians(20.0)
_RANDOM_DROPOUT_RATE = 0.002


@dataclasses.dataclass(frozen=True, eq=False)
class Scan:
    """One generated scan in MVTec 3D-AD form."""

    #: ``(H, W, 3)`` uint8 colour image.
    rgb: np.ndarray
    #: ``(H, W, 3)`` float32 organized point cloud in metres, all-zero where nothing was measured.
    xyz: np.ndarray
    #: ``(H, W)`` uint8 defect mask, 0 good and 255 defect; all zero for a good scan.
    mask: np.ndarray
    #: Part type, one of :data:`PARTS`.
    part: str
    #: Defect name from :data:`DEFECT_TYPES`, or ``"good"``.
    defect_type: str
    #: ``(H, W)`` bool pixels of the defect-free part (measured or not); False on the table.
    #: Defect areas are fractions of its pixel count.
    foreground: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _Scene:
    """Pixel grid, pose and table of one scan, all ``(H, W)`` arrays in metres."""

    pitch: float
    x: np.ndarray
    y: np.ndarray
    #: Part-frame coordinates of each pixel (the part's pose undone).
    u: np.ndarray
    v: np.ndarray
    #: Distance from the sensor to the table along z.
    table_z: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Surface:
    """Defect-free part geometry and material, ``(H, W)`` arrays unless noted."""

    #: Height above the table in metres, 0 off the part.
    height: np.ndarray
    part: np.ndarray
    #: ``(H, W, 3)`` reflectance in [0, 1].
    albedo: np.ndarray
    gloss: float
    shininess: float
    #: Reflectance a hole or cut shows inside the part, ``(3,)``.
    cavity_colour: tuple[float, float, float]
    stain_colour: tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class _Defect:
    """Placement of one defect and its changes to height and colour, ``(H, W)`` arrays."""

    mask: np.ndarray
    #: Added to the part height in metres (0 outside the mask).
    height_change: np.ndarray
    #: Blend weight towards ``colour`` in [0, 1] (0 outside the mask and for 3D-only defects).
    colour_alpha: np.ndarray
    colour: tuple[float, float, float]


def generate_scan(
    part: str,
    seed: int,
    defect: str | None = None,
    size: tuple[int, int] = (224, 224),
) -> Scan:
    """Render one scan of ``part`` ``(H, W) = size``, good or with one ``defect``.

    ``seed`` is a non-negative integer that fixes the pose, textures, noise and
    dropouts, and the defect's placement. A defective scan equals the good scan of
    the same seed outside its mask.
    """
    part_index = _check_part(part)
    defect_index = _check_defect(defect)
    height, width = _check_size(size)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"generate_scan: seed {seed!r} must be a non-negative integer")

    def stream(index: int) -> np.random.Generator:
        return np.random.default_rng([int(seed), part_index, index])

    scene = _make_scene((height, width), stream(_STREAM_POSE))
    surface = _PART_BUILDERS[part](scene, stream(_STREAM_SURFACE))

    placed = None if defect is None else _make_defect(defect, surface, stream(_STREAM_DEFECT + defect_index))

    rgb = _render_rgb(scene, surface, placed, stream(_STREAM_LIGHT), stream(_STREAM_RGB_NOISE))
    xyz = _render_xyz(scene, surface, placed, stream(_STREAM_Z_NOISE), stream(_STREAM_DROPOUT))
    mask = np.zeros((height, width), dtype=np.uint8) if placed is None else placed.mask.astype(np.uint8) * 255
    return Scan(rgb=rgb, xyz=xyz, mask=mask, part=part, defect_type=defect or GOOD, foreground=surface.part.copy())


def write_dataset(
    root: str | Path,
    part: str,
    seed: int = 0,
    size: tuple[int, int] = (224, 224),
    n_train: int = 40,
    n_validation: int = 10,
    n_test_good: int = 10,
    n_test_per_defect: int = 6,
    defects: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Write one category of generated scans in the MVTec 3D-AD layout and return its folder.

    Writes ``root/part/train/good/{rgb,xyz}/NNN.{png,tiff}``, the same under
    ``validation/good``, and ``test/<type>/{rgb,xyz,gt}/NNN.{png,tiff,png}`` for
    ``good`` (all-zero masks) and each defect in ``defects`` (default: all of
    :data:`DEFECT_TYPES`). Every scan gets its own seed derived from ``seed``. The
    category folder must not exist yet or be empty, so old files never mix in.
    """
    _check_part(part)
    _check_size(size)
    defects = tuple(DEFECT_TYPES) if defects is None else tuple(defects)
    for defect in defects:
        _check_defect(defect)
    counts = {"n_train": n_train, "n_validation": n_validation, "n_test_good": n_test_good, "n_test_per_defect": n_test_per_defect}
    for name, value in {**counts, "seed": seed}.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"write_dataset: {name}={value!r} must be a non-negative integer")

    category = Path(root) / part
    if category.exists() and (not category.is_dir() or any(category.iterdir())):
        raise FileExistsError(
            f"write_dataset: {category} already contains files or is a file; remove it or choose another root"
        )
    # Three digits as in MVTec 3D-AD, more when a folder contains over 1000 scans, so names sort in order.
    digits = max(3, len(str(max(counts.values()) - 1)))

    jobs = [("train", GOOD, i) for i in range(n_train)]
    jobs += [("validation", GOOD, i) for i in range(n_validation)]
    jobs += [("test", GOOD, i) for i in range(n_test_good)]
    jobs += [("test", defect, i) for defect in defects for i in range(n_test_per_defect)]
    logger.info("writing %d %s scans of size %s to %s (seed %d)", len(jobs), part, size, category, seed)

    for split, defect_type, index in tqdm(jobs, desc=f"scans {part}", unit="scan", disable=not progress):
        scan_seed = _scan_seed(seed, split, defect_type, index)
        scan = generate_scan(part, scan_seed, None if defect_type == GOOD else defect_type, size)
        folder = category / split / defect_type
        stem = f"{index:0{digits}d}"
        _write_png(folder / "rgb" / f"{stem}.png", scan.rgb)
        write_organized_cloud(folder / "xyz" / f"{stem}.tiff", scan.xyz)
        if split == "test":
            _write_png(folder / "gt" / f"{stem}.png", scan.mask)

    logger.info("wrote %d %s scans to %s", len(jobs), part, category)
    return category


# --- scene and procedural noise ------------------------------------------------


def _make_scene(size: tuple[int, int], rng: np.random.Generator) -> _Scene:
    height, width = size
    pitch = FIELD_OF_VIEW / min(height, width)
    cols = (np.arange(width) + 0.5 - width / 2) * pitch
    rows = (np.arange(height) + 0.5 - height / 2) * pitch
    x, y = np.meshgrid(cols, rows)

    rotation = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION)
    shift_x, shift_y = rng.uniform(-_MAX_SHIFT, _MAX_SHIFT, size=2)
    cos, sin = math.cos(rotation), math.sin(rotation)
    u = cos * (x - shift_x) + sin * (y - shift_y)
    v = -sin * (x - shift_x) + cos * (y - shift_y)

    tilt = rng.uniform(*_TABLE_TILT_RANGE)
    tilt_direction = rng.uniform(0, 2 * math.pi)
    slope = math.tan(tilt)
    table_z = SENSOR_DISTANCE + slope * (math.cos(tilt_direction) * x + math.sin(tilt_direction) * y)
    return _Scene(pitch=pitch, x=x, y=y, u=u, v=v, table_z=table_z)


def _noise(
    rng: np.random.Generator,
    u: np.ndarray,
    v: np.ndarray,
    cell: float,
    octaves: int = 1,
    stretch: float = 1.0,
    order: int = 3,
) -> np.ndarray:
    """Sample fractal value noise of roughly unit variance at the points ``(u, v)`` in metres.

    ``cell`` is the lattice spacing of the first octave in metres, and each further
    octave halves it. ``stretch`` > 1 elongates the features along ``u``. The
    lattice wraps around, so any coordinate is valid, and a random offset per
    octave gives each call its own phase.
    """
    lattice = 64
    total = np.zeros(u.shape)
    weight = 0.0
    amplitude = 1.0
    for octave in range(octaves):
        coefficients = rng.standard_normal((lattice, lattice))
        if order > 1:
            coefficients = ndimage.spline_filter(coefficients, order=order, mode="grid-wrap")
        offset = rng.uniform(0, lattice, size=2)
        scale = 2.0**octave / cell
        coordinates = np.stack([v * scale + offset[0], u * (scale / stretch) + offset[1]])
        sample = ndimage.map_coordinates(coefficients, coordinates, order=order, mode="grid-wrap", prefilter=False)
        total += amplitude * sample
        weight += amplitude**2
        amplitude *= 0.5
    return total / (math.sqrt(weight) * _INTERPOLATED_NOISE_STD[order])


def _noise_on_circle(rng: np.random.Generator, angle: np.ndarray, features: float) -> np.ndarray:
    """Smooth periodic noise of the polar angle with about ``features`` bumps per turn."""
    radius = features / (2 * math.pi)
    return _noise(rng, radius * np.cos(angle), radius * np.sin(angle), cell=1.0)


# --- parts ----------------------------------------------------------------------

_RING_INNER_RADIUS = 0.021
_RING_OUTER_RADIUS = 0.037
_RING_HEIGHT = 0.016
_RING_GROOVE_DEPTH = 0.0012
_RING_GROOVE_HALF_WIDTH = 0.0006
_RING_GROOVE_RAMP = 0.0003
_RING_TREAD_BLOCKS = 36


def _ring(scene: _Scene, rng: np.random.Generator) -> _Surface:
    """Build a tire-like ring lying flat: rounded cross-section, tread grooves on top."""
    radius = np.hypot(scene.u, scene.v)
    angle = np.arctan2(scene.v, scene.u)
    centre_radius = (_RING_INNER_RADIUS + _RING_OUTER_RADIUS) / 2
    half_width = (_RING_OUTER_RADIUS - _RING_INNER_RADIUS) / 2
    across = (radius - centre_radius) / half_width
    across_abs = np.abs(across)
    part = across_abs < 1.0

    # A superellipse cross-section gives a flat tread and steep flanks.
    profile = np.where(part, _RING_HEIGHT * np.clip(1.0 - across_abs**4, 0.0, None) ** 0.25, 0.0)

    # Two circumferential grooves, and chevron-shaped transverse grooves on the shoulders.
    circumferential = np.abs(across_abs - 0.45) * half_width
    block_phase = angle * _RING_TREAD_BLOCKS / (2 * math.pi) + 0.8 * across_abs
    transverse = np.abs(block_phase - np.round(block_phase)) * (2 * math.pi * radius / _RING_TREAD_BLOCKS)
    transverse = np.where((across_abs > 0.5) & (across_abs < 0.85), transverse, np.inf)
    groove_distance = np.minimum(circumferential, transverse)
    groove = np.clip((_RING_GROOVE_HALF_WIDTH - groove_distance) / _RING_GROOVE_RAMP, 0.0, 1.0)
    groove = np.where(across_abs < 0.85, groove, 0.0)
    height = np.where(part, profile - _RING_GROOVE_DEPTH * groove, 0.0)

    rubber = 0.15 * (1.0 + 0.10 * _noise(rng, scene.u, scene.v, 0.004, octaves=2))
    rubber *= 1.0 + 0.08 * _noise(rng, scene.u, scene.v, 0.0005, order=1)
    rubber = np.where(across_abs > 0.85, rubber * 1.15, rubber)  # the moulded sidewall is a little lighter
    rubber *= 1.0 - 0.35 * groove  # dirt collects in the grooves
    albedo = np.stack([rubber, rubber, rubber * 1.05], axis=-1)
    albedo = _on_table(scene, rng, part, albedo)
    return _Surface(
        height=height, part=part, albedo=albedo, gloss=0.05, shininess=8.0,
        cavity_colour=(0.42, 0.36, 0.30), stain_colour=(0.80, 0.76, 0.68),
    )


_PLATE_HALF_SIZE = (0.034, 0.025)
_PLATE_CORNER_RADIUS = 0.004
_PLATE_THICKNESS = 0.006
_PLATE_HOLE_PITCH = 0.008
_PLATE_HOLE_RADIUS = 0.0024
_PLATE_HOLE_MARGIN = 0.0045


def _plate(scene: _Scene, rng: np.random.Generator) -> _Surface:
    """Build a brushed-steel plate with rounded corners and a regular grid of round holes."""
    half_u, half_v = _PLATE_HALF_SIZE
    corner_u = np.maximum(np.abs(scene.u) - (half_u - _PLATE_CORNER_RADIUS), 0.0)
    corner_v = np.maximum(np.abs(scene.v) - (half_v - _PLATE_CORNER_RADIUS), 0.0)
    inside = (np.abs(scene.u) <= half_u) & (np.abs(scene.v) <= half_v)
    inside &= np.hypot(corner_u, corner_v) <= _PLATE_CORNER_RADIUS

    columns = math.floor((half_u - _PLATE_HOLE_MARGIN) / _PLATE_HOLE_PITCH)
    rows = math.floor((half_v - _PLATE_HOLE_MARGIN) / _PLATE_HOLE_PITCH)
    nearest_u = np.clip(np.round(scene.u / _PLATE_HOLE_PITCH), -columns, columns) * _PLATE_HOLE_PITCH
    nearest_v = np.clip(np.round(scene.v / _PLATE_HOLE_PITCH), -rows, rows) * _PLATE_HOLE_PITCH
    hole = np.hypot(scene.u - nearest_u, scene.v - nearest_v) < _PLATE_HOLE_RADIUS
    part = inside & ~hole

    # A slight bow of up to 0.2 mm, different on every plate.
    bow = rng.uniform(-0.0002, 0.0002) * ((scene.u / half_u) ** 2 + (scene.v / half_v) ** 2) / 2
    height = np.where(part, _PLATE_THICKNESS + bow, 0.0)

    brushed = 1.0 + 0.06 * _noise(rng, scene.u, scene.v, 0.0004, stretch=25.0, order=1)
    tint = 1.0 + 0.04 * _noise(rng, scene.u, scene.v, 0.015)
    steel = 0.60 * brushed * tint
    albedo = np.stack([steel, steel * 1.01, steel * 1.04], axis=-1)
    albedo = _on_table(scene, rng, part, albedo)
    return _Surface(
        height=height, part=part, albedo=albedo, gloss=0.18, shininess=40.0,
        cavity_colour=(0.07, 0.07, 0.08), stain_colour=(0.55, 0.26, 0.09),
    )


_BAGEL_MAJOR_RADIUS = 0.0235
_BAGEL_MINOR_RADIUS = 0.0135
_BAGEL_FLATTENING = 0.75


def _bagel(scene: _Scene, rng: np.random.Generator) -> _Surface:
    """Build a flattened torus with a wobbly outline, a bumpy crust and a browned top."""
    radius = np.hypot(scene.u, scene.v)
    angle = np.arctan2(scene.v, scene.u)
    wobble = 0.0012 * _noise_on_circle(rng, angle, features=5.0)
    across = (radius - _BAGEL_MAJOR_RADIUS - wobble) / _BAGEL_MINOR_RADIUS
    dome = _BAGEL_FLATTENING * _BAGEL_MINOR_RADIUS * np.sqrt(np.clip(1.0 - across**2, 0.0, None))

    bumps = 1.0 + 0.06 * _noise(rng, scene.u, scene.v, 0.008, octaves=2)
    crust = 0.0003 * _noise(rng, scene.u, scene.v, 0.0015)
    height = dome * bumps + crust * np.clip(dome / 0.002, 0.0, 1.0)
    part = (np.abs(across) < 1.0) & (height > 0.0002)
    height = np.where(part, height, 0.0)

    browning = np.clip((height / (_BAGEL_FLATTENING * _BAGEL_MINOR_RADIUS)) ** 0.6, 0.0, 1.0)
    browning = np.clip(browning + 0.12 * _noise(rng, scene.u, scene.v, 0.006, octaves=2), 0.0, 1.0)
    pale = np.array([0.86, 0.70, 0.46])
    baked = np.array([0.60, 0.34, 0.13])
    albedo = pale + browning[..., None] * (baked - pale)
    speckle = _noise(rng, scene.u, scene.v, 0.0007, order=1)
    albedo *= (1.0 - 0.25 * np.clip(speckle - 1.5, 0.0, 1.0))[..., None]
    albedo = _on_table(scene, rng, part, albedo)
    return _Surface(
        height=height, part=part, albedo=albedo, gloss=0.07, shininess=12.0,
        cavity_colour=(0.93, 0.87, 0.72), stain_colour=(0.20, 0.13, 0.08),
    )


def _on_table(scene: _Scene, rng: np.random.Generator, part: np.ndarray, part_albedo: np.ndarray) -> np.ndarray:
    """Return ``(H, W, 3)`` albedo: the part's where ``part`` is set, a grey table elsewhere."""
    table = 0.45 * (1.0 + 0.06 * _noise(rng, scene.x, scene.y, 0.02, octaves=2))
    table *= 1.0 + 0.05 * _noise(rng, scene.x, scene.y, 0.0006, order=1)
    table_albedo = np.stack([table, table * 1.01, table * 1.05], axis=-1)
    return np.where(part[..., None], part_albedo, table_albedo)


_PART_BUILDERS: dict[str, Callable[[_Scene, np.random.Generator], _Surface]] = {
    "ring": _ring,
    "plate": _plate,
    "bagel": _bagel,
}


# --- defects --------------------------------------------------------------------


def _make_defect(name: str, surface: _Surface, rng: np.random.Generator) -> _Defect:
    """Place defect ``name`` at random on the part, with an area in :data:`DEFECT_AREA_RANGE`."""
    max_depth = rng.uniform(*_DEFECT_MAX_DEPTH)
    min_height = max_depth + _DEFECT_FLOOR_CLEARANCE if name in ("dent", "cut") else _DEFECT_MIN_HEIGHT
    eligible = surface.part & (surface.height >= min_height)
    part_pixels = int(surface.part.sum())
    smallest, largest = (fraction * part_pixels for fraction in DEFECT_AREA_RANGE)

    clearance = ndimage.distance_transform_edt(eligible)
    rows, cols = np.indices(eligible.shape)
    target = rng.uniform(1.2 * smallest, 0.8 * largest)
    for _ in range(_PLACEMENT_ATTEMPTS):
        extent = math.sqrt(target / math.pi)
        candidates = np.flatnonzero(clearance >= min(0.6 * extent, clearance.max()))
        centre = np.unravel_index(rng.choice(candidates), eligible.shape)
        footprint, profile = _DEFECT_SHAPES[name](rows, cols, centre, target, rng)
        mask = footprint & eligible
        area = int(mask.sum())
        if smallest <= area <= largest:
            return _defect_effect(name, mask, profile, max_depth, surface, rng)
        # Part edges and holes clip the footprint, so aim larger after a small miss.
        target *= 1.25 if area < smallest else 0.8

    raise RuntimeError(
        f"failed to place a {name} defect of {DEFECT_AREA_RANGE} of the part's {part_pixels} pixels "
        f"in {_PLACEMENT_ATTEMPTS} attempts; use a larger scan size"
    )


def _defect_effect(
    name: str, mask: np.ndarray, profile: np.ndarray, max_depth: float, surface: _Surface, rng: np.random.Generator,
) -> _Defect:
    """Turn a placed footprint into a height change and a colour blend, both zero outside ``mask``.

    Dents, bumps and cuts change the height by ``_DEFECT_MIN_DEPTH`` at the rim and
    up to ``max_depth`` metres where ``profile`` is 1.
    """
    zero = np.zeros(mask.shape)
    profile = np.where(mask, profile, 0.0)
    modality = DEFECT_TYPES[name]

    height_change = zero
    if name in ("dent", "bump", "cut"):
        depth = _DEFECT_MIN_DEPTH + (max_depth - _DEFECT_MIN_DEPTH) * profile
        height_change = np.where(mask, -depth if name != "bump" else depth, 0.0)
    elif name == "hole":
        # Through the part where it is thinner than the hole is deep, as on the plate.
        depth = rng.uniform(*_HOLE_DEPTH)
        height_change = np.where(mask, -np.minimum(surface.height, depth), 0.0)

    colour_alpha = zero
    colour = surface.stain_colour
    if modality == "both":
        colour = surface.cavity_colour
        colour_alpha = np.where(mask, 0.85, 0.0)
    elif name == "stain":
        # Dried stains are darker at their rim.
        colour_alpha = np.where(mask, 0.6 + 0.3 * (1.0 - profile) ** 2, 0.0)
    elif name == "contamination":
        colour = _contrasting_colour(surface, mask, rng)
        colour_alpha = np.where(mask, 0.9, 0.0)
    return _Defect(mask=mask, height_change=height_change, colour_alpha=colour_alpha, colour=colour)


def _contrasting_colour(surface: _Surface, mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float, float]:
    """Pick a fibre or particle colour that differs clearly from the part's mean colour under ``mask``."""
    palette = np.array([[0.15, 0.35, 0.85], [0.85, 0.15, 0.12], [0.95, 0.95, 0.93], [0.20, 0.70, 0.25]])
    mean = surface.albedo[mask].mean(axis=0)
    contrast = np.abs(palette - mean).max(axis=1)
    choices = np.flatnonzero(contrast > 0.35)
    return tuple(float(c) for c in palette[rng.choice(choices)])


def _blob(
    rows: np.ndarray, cols: np.ndarray, centre: tuple[int, int], area: float,
    rng: np.random.Generator, wobble: float = 0.08,
) -> tuple[np.ndarray, np.ndarray]:
    """Return an irregular ellipse of about ``area`` pixels and a profile: 1 at the centre, 0 at the rim."""
    aspect = rng.uniform(0.6, 1.0)
    orientation = rng.uniform(0, math.pi)
    major = math.sqrt(area / (math.pi * aspect))
    dy = rows - centre[0] - rng.uniform(-0.5, 0.5)
    dx = cols - centre[1] - rng.uniform(-0.5, 0.5)
    along = dx * math.cos(orientation) + dy * math.sin(orientation)
    across = -dx * math.sin(orientation) + dy * math.cos(orientation)
    angle = np.arctan2(across, along)

    outline = np.ones(rows.shape)
    for harmonic in (2, 3, 5):
        outline += wobble * np.cos(harmonic * angle + rng.uniform(0, 2 * math.pi))
    radius = np.hypot(along / major, across / (major * aspect)) / outline
    footprint = radius < 1.0
    return footprint, np.clip(1.0 - radius**2, 0.0, 1.0)


def _stain_shape(rows, cols, centre, area, rng):
    return _blob(rows, cols, centre, area, rng, wobble=0.15)


def _cut_shape(rows, cols, centre, area, rng):
    # Width and length both grow with the square root of the area, so cuts keep
    # their shape at any image size.
    half_width = max(math.sqrt(area) / 6.0, 1.2)
    length = area / (2.0 * half_width)
    distance = _distance_to_curve(rows, cols, centre, length, half_width, bend=rng.uniform(-0.25, 0.25), rng=rng)
    footprint = distance < half_width
    return footprint, np.clip(1.0 - distance / half_width, 0.0, 1.0)


def _contamination_shape(rows, cols, centre, area, rng):
    half_width = max(math.sqrt(area) / 10.0, 0.7)
    length = 0.75 * area / (2.0 * half_width)
    distance = _distance_to_curve(rows, cols, centre, length, half_width, bend=rng.uniform(-0.6, 0.6), rng=rng)
    footprint = distance < half_width

    # A few specks scattered around the fibre.
    speck_area = 0.25 * area
    specks = rng.integers(2, 6)
    for _ in range(specks):
        offset = rng.uniform(-0.4, 0.4, size=2) * length
        radius = math.sqrt(speck_area / specks / math.pi) * rng.uniform(0.7, 1.3)
        footprint |= np.hypot(rows - centre[0] - offset[0], cols - centre[1] - offset[1]) < max(radius, 0.8)
    return footprint, footprint.astype(float)


def _distance_to_curve(rows, cols, centre, length, half_width, bend, rng) -> np.ndarray:
    """Return the pixel distance to a bent segment (quadratic Bezier) of ``length`` pixels around ``centre``.

    Distances are exact up to ``half_width`` + 1 pixels from the curve and infinite
    beyond, which is all a footprint of that half-width needs.
    """
    direction = rng.uniform(0, math.pi)
    tangent = np.array([math.sin(direction), math.cos(direction)])
    normal = np.array([tangent[1], -tangent[0]])
    start = np.asarray(centre, dtype=float) - tangent * length / 2
    end = np.asarray(centre, dtype=float) + tangent * length / 2
    control = np.asarray(centre, dtype=float) + normal * bend * length

    steps = max(int(length * 2), 8)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end

    # Only the curve's bounding box, widened by the margin, is computed.
    margin = math.ceil(half_width) + 1
    height, width = rows.shape
    top = int(np.clip(np.floor(curve[:, 0].min()) - margin, 0, height))
    bottom = int(np.clip(np.ceil(curve[:, 0].max()) + margin + 1, 0, height))
    left = int(np.clip(np.floor(curve[:, 1].min()) - margin, 0, width))
    right = int(np.clip(np.ceil(curve[:, 1].max()) + margin + 1, 0, width))
    window_rows = rows[top:bottom, left:right]
    window_cols = cols[top:bottom, left:right]

    distance = np.full(rows.shape, np.inf)
    window = distance[top:bottom, left:right]
    for point in curve:
        np.minimum(window, np.hypot(window_rows - point[0], window_cols - point[1]), out=window)
    return distance


_DEFECT_SHAPES = {
    "dent": _blob,
    "bump": _blob,
    "hole": _blob,
    "stain": _stain_shape,
    "contamination": _contamination_shape,
    "cut": _cut_shape,
}


# --- rendering ------------------------------------------------------------------


def _render_xyz(
    scene: _Scene, surface: _Surface, defect: _Defect | None,
    noise_rng: np.random.Generator, dropout_rng: np.random.Generator,
) -> np.ndarray:
    """Return the ``(H, W, 3)`` float32 cloud with noise on z and sensor dropouts."""
    height = surface.height if defect is None else surface.height + defect.height_change
    z = scene.table_z - height + Z_NOISE_SIGMA * noise_rng.standard_normal(height.shape)

    missing = _sensor_dropouts(scene, surface, dropout_rng)
    if defect is not None:
        # The defect's own walls hide part of it from the projector.
        missing |= _projector_shadow(scene, height) & defect.mask

    xyz = np.stack([scene.x, scene.y, z], axis=-1).astype(np.float32)
    xyz[missing] = 0.0
    return xyz


def _sensor_dropouts(scene: _Scene, surface: _Surface, rng: np.random.Generator) -> np.ndarray:
    """Return the ``(H, W)`` bool pixels without a measurement, from the defect-free geometry."""
    gradient_y, gradient_x = np.gradient(surface.height, scene.pitch)
    slope = np.hypot(gradient_x, gradient_y)
    steep = rng.random(slope.shape) < np.clip((slope - 1.2) / 3.0, 0.0, 0.85)

    missing = steep | _projector_shadow(scene, surface.height)
    missing |= rng.random(slope.shape) < _RANDOM_DROPOUT_RATE

    rows, cols = np.indices(slope.shape)
    for _ in range(rng.integers(0, 4)):
        centre = rng.uniform(0, slope.shape[0]), rng.uniform(0, slope.shape[1])
        missing |= np.hypot(rows - centre[0], cols - centre[1]) < rng.uniform(1.0, 3.0)
    return missing


def _projector_shadow(scene: _Scene, height: np.ndarray) -> np.ndarray:
    """Return the pixels that the projector, tilted towards +x, cannot light past taller neighbours."""
    return _heightfield_shadow(height, (0.0, 1.0), math.tan(math.pi / 2 - _PROJECTOR_ANGLE), scene.pitch)


def _heightfield_shadow(height: np.ndarray, direction: tuple[float, float], elevation_slope: float, pitch: float) -> np.ndarray:
    """Return ``(H, W)`` bool: pixels hidden from a far source in ``direction`` (row, col) by the height field.

    A pixel is hidden when a point ``d`` pixels towards the source rises above the
    ray ``height + d * pitch * elevation_slope``.
    """
    reach = int(math.ceil(height.max() / (elevation_slope * pitch))) + 1
    hidden = np.zeros(height.shape, dtype=bool)
    rows, cols = height.shape
    for step in range(1, reach + 1):
        d_row = int(round(direction[0] * step))
        d_col = int(round(direction[1] * step))
        if abs(d_row) >= rows or abs(d_col) >= cols:
            break
        source = height[max(d_row, 0):rows + min(d_row, 0), max(d_col, 0):cols + min(d_col, 0)]
        target = (slice(max(-d_row, 0), rows + min(-d_row, 0)), slice(max(-d_col, 0), cols + min(-d_col, 0)))
        hidden[target] |= source > height[target] + step * pitch * elevation_slope
    return hidden


def _render_rgb(
    scene: _Scene, surface: _Surface, defect: _Defect | None,
    light_rng: np.random.Generator, noise_rng: np.random.Generator,
) -> np.ndarray:
    """Shade the defect-free geometry and return the ``(H, W, 3)`` uint8 image."""
    elevation = math.radians(55.0 + light_rng.uniform(-4.0, 4.0))
    azimuth = math.radians(225.0 + light_rng.uniform(-10.0, 10.0))
    exposure = light_rng.uniform(0.95, 1.05)
    to_light = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth), math.sin(elevation)])

    # Height towards the sensor: table tilt plus the part.
    elevation_map = (SENSOR_DISTANCE - scene.table_z) + surface.height
    gradient_y, gradient_x = np.gradient(elevation_map, scene.pitch)
    normals = np.stack([-gradient_x, -gradient_y, np.ones_like(gradient_x)], axis=-1)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    diffuse = np.clip(normals @ to_light, 0.0, None)
    halfway = to_light + np.array([0.0, 0.0, 1.0])
    halfway /= np.linalg.norm(halfway)
    specular = np.clip(normals @ halfway, 0.0, None) ** surface.shininess
    specular = np.where(surface.part, surface.gloss * specular, 0.02 * specular)

    step_direction = (math.sin(azimuth), math.cos(azimuth))
    shadow = _heightfield_shadow(surface.height, step_direction, math.tan(elevation), scene.pitch)
    shadow = ndimage.gaussian_filter(shadow.astype(float), 1.0)
    occlusion = ndimage.gaussian_filter(surface.height, 0.003 / scene.pitch) - surface.height
    ambient_occlusion = 1.0 - 0.5 * np.clip(occlusion / 0.004, 0.0, 1.0)

    albedo = surface.albedo
    if defect is not None:
        albedo = albedo + defect.colour_alpha[..., None] * (np.asarray(defect.colour) - albedo)

    shade = (0.3 + 0.7 * diffuse * (1.0 - 0.75 * shadow)) * ambient_occlusion
    radius = np.hypot(scene.x, scene.y) / FIELD_OF_VIEW
    vignette = 1.0 - 0.25 * radius**2
    linear = (albedo * shade[..., None] + specular[..., None]) * (exposure * vignette)[..., None]
    linear += 0.006 * noise_rng.standard_normal(linear.shape)
    return np.clip(np.round(linear * 255.0), 0, 255).astype(np.uint8)


# --- helpers --------------------------------------------------------------------


def _check_part(part: str) -> int:
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; use one of {', '.join(PARTS)}")
    return PARTS.index(part)


def _check_defect(defect: str | None) -> int:
    if defect is None:
        return -1
    if defect not in DEFECT_TYPES:
        raise ValueError(
            f"unknown defect {defect!r}; use one of {', '.join(DEFECT_TYPES)}, or None for a good scan"
        )
    return list(DEFECT_TYPES).index(defect)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if (
        len(size) != 2
        or any(isinstance(side, bool) or not isinstance(side, (int, np.integer)) for side in size)
        or not all(_MIN_SIZE <= side <= _MAX_SIZE for side in size)
    ):
        raise ValueError(
            f"invalid scan size {size!r}; use (height, width) with integers from {_MIN_SIZE} to {_MAX_SIZE}"
        )
    return int(size[0]), int(size[1])


def _scan_seed(seed: int, split: str, defect_type: str, index: int) -> int:
    """Derive a scan's seed from the data set seed, its split, type and index."""
    split_index = ("train", "validation", "test").index(split)
    type_index = 0 if defect_type == GOOD else 1 + list(DEFECT_TYPES).index(defect_type)
    return int(np.random.SeedSequence([seed, split_index, type_index, index]).generate_state(1)[0])


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
