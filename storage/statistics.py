"""Confidence intervals for the error rates of the quality report."""

from __future__ import annotations

import math

#: Two-sided 95% standard normal quantile.
Z_95 = 1.959963984540054


def wilson_interval(errors: int, trials: int, z: float = Z_95) -> tuple[float, float] | None:
    """Return the Wilson score interval of the rate ``errors / trials``, or None when ``trials`` is 0.

    Unlike the normal approximation, it stays inside [0, 1] and does not shrink
    to a single point when no error (or only errors) occurred in a few trials,
    which is the usual case for FNR on a quiet line.
    """
    if trials < 0 or not 0 <= errors <= trials:
        raise ValueError(f"invalid counts {errors} of {trials}: need 0 <= errors <= trials")
    if trials == 0:
        return None
    rate = errors / trials
    z_squared = z * z
    denominator = 1 + z_squared / trials
    center = (rate + z_squared / (2 * trials)) / denominator
    half_width = z * math.sqrt(rate * (1 - rate) / trials + z_squared / (4 * trials * trials)) / denominator
    # The bounds at 0 and at ``trials`` errors are exactly 0 and 1; the formula gives them with rounding noise.
    low = 0.0 if errors == 0 else max(0.0, center - half_width)
    high = 1.0 if errors == trials else min(1.0, center + half_width)
    return low, high
