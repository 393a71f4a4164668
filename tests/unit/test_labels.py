"""Labels built from MVTec defect masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qcstream.streams.labels import label_from_mask

TIRE_TEST = Path(__file__).resolve().parents[3].joinpath("shared/data/mvtec3d_tire/test")


def test_mask_with_defect_pixels_gives_a_defect_label():
    mask = TIRE_TEST / "cut" / "gt" / "000.png"
    assert np.asarray(Image.open(mask)).max() == 255  # the data's own mask marks the cut

    label = label_from_mask("f-1", "line-1", mask, defect_type="cut", inspector="ana", labelled_at=5.0)

    assert (label.is_defect, label.defect_type, label.inspector, label.labelled_at) == (True, "cut", "ana", 5.0)


def test_empty_mask_gives_good_label():
    mask = TIRE_TEST / "good" / "gt" / "000.png"
    assert np.asarray(Image.open(mask)).max() == 0

    label = label_from_mask("f-2", "line-1", mask, defect_type="cut")

    assert (label.is_defect, label.defect_type) == (False, None)


def test_single_nonzero_pixel_counts_as_defect(tmp_path):
    mask = np.zeros((5, 5), dtype=np.uint8)
    mask[4, 4] = 1
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)

    assert label_from_mask("f-3", "line-1", path).is_defect is True


def test_missing_mask_file_is_named(tmp_path):
    with pytest.raises(ValueError, match="mask file .*nope.png does not exist"):
        label_from_mask("f-4", "line-1", tmp_path / "nope.png")


def test_bad_ids_are_rejected():
    with pytest.raises(ValueError, match="invalid line_id"):
        label_from_mask("f-5", "line/1", TIRE_TEST / "good" / "gt" / "000.png")
