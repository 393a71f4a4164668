"""Wilson score intervals against values worked out by hand."""

from __future__ import annotations

import pytest

from qcstream.storage.statistics import wilson_interval


def test_wilson_half_of_ten():
    # center (5 + 1.9207) / 13.8415 = 0.5; half width 1.96 * sqrt(0.025 + 0.0096) / 1.3841 = 0.2634
    low, high = wilson_interval(5, 10)

    assert low == pytest.approx(0.2366, abs=1e-4)
    assert high == pytest.approx(0.7634, abs=1e-4)


def test_wilson_zero_errors_is_not_empty():
    # center = half width = 1.9207 / 13.8415 = 0.1388
    low, high = wilson_interval(0, 10)

    assert low == 0.0
    assert high == pytest.approx(0.2775, abs=1e-4)


def test_wilson_all_errors_mirrors_zero():
    low, high = wilson_interval(10, 10)

    assert low == pytest.approx(1 - 0.2775, abs=1e-4)
    assert high == pytest.approx(1.0, abs=1e-12)


def test_wilson_without_trials_is_none():
    assert wilson_interval(0, 0) is None


def test_wilson_rejects_more_errors_than_trials():
    with pytest.raises(ValueError, match="invalid counts 3 of 2"):
        wilson_interval(3, 2)


def test_wilson_bounds_are_exact_at_the_ends():
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0
