"""Simulated quantizers and calibrators, checked against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from qcstream.models.quantization.observers import EmaObserver, MinMaxObserver, OmseObserver, PercentileObserver, make_observer
from qcstream.models.quantization.quantizers import (
    PowerOfTwoFactorQuantizer,
    asymmetric_qparams,
    fake_quantize,
    log2_quantize,
    quantize_weight_per_channel,
)


def test_asymmetric_qparams_cover_the_range_and_zero():
    scale, zero_point = asymmetric_qparams(torch.tensor(-1.0), torch.tensor(3.0), bits=8)

    assert float(scale) == pytest.approx(4 / 255)
    assert float(zero_point) == 64  # round(1 / (4 / 255)) = round(63.75)


def test_asymmetric_qparams_include_zero_for_a_positive_range():
    scale, zero_point = asymmetric_qparams(torch.tensor(2.0), torch.tensor(4.0), bits=8)

    assert float(zero_point) == 0
    assert float(scale) == pytest.approx(4 / 255)


def test_fake_quantize_rounds_to_the_grid_and_clips():
    scale, zero_point = torch.tensor(4 / 255), torch.tensor(64.0)

    out = fake_quantize(torch.tensor([0.5, 10.0, -5.0]), scale, zero_point, bits=8)

    # 0.5 -> q = round(31.875) + 64 = 96 -> 32 * 4/255; 10 clips to q = 255; -5 clips to q = 0.
    assert out.tolist() == pytest.approx([32 * 4 / 255, 191 * 4 / 255, -64 * 4 / 255])


def test_weights_are_quantized_per_output_channel():
    weight = torch.tensor([[1.0, -0.6, 0.2], [0.07, 0.0, -0.07]])

    out = quantize_weight_per_channel(weight, bits=4)

    # Row 0: scale 1/7; -0.6 -> round(-4.2) = -4; 0.2 -> round(1.4) = 1.
    assert out[0].tolist() == pytest.approx([1.0, -4 / 7, 1 / 7])
    # Row 1 has its own scale, 0.01, so its values survive exactly.
    assert out[1].tolist() == pytest.approx([0.07, 0.0, -0.07])


def test_log2_quantizer_levels():
    probabilities = torch.tensor([1.0, 0.5, 0.3, 0.01, 1e-6])

    out = log2_quantize(probabilities, bits=4)

    # -log2: 0, 1, 1.74 -> 2, 6.64 -> 7, 19.9 -> 20 > 15 -> 0.
    assert out.tolist() == pytest.approx([1.0, 0.5, 0.25, 2**-7, 0.0])


def test_log2_quantizer_keeps_the_order_of_attention_weights():
    probabilities = torch.softmax(torch.randn(1000), dim=0).sort(descending=True).values

    out = log2_quantize(probabilities, bits=4)

    assert bool((out[:-1] >= out[1:]).all())


def test_minmax_and_ema_observers():
    batches = [torch.tensor([-1.0, 1.0]), torch.tensor([-3.0, 5.0])]
    minmax, ema = MinMaxObserver(), EmaObserver(momentum=0.9)
    for batch in batches:
        minmax.observe(batch)
        ema.observe(batch)

    assert minmax.range() == (-3.0, 5.0)
    assert ema.range() == pytest.approx((0.9 * -1 + 0.1 * -3, 0.9 * 1 + 0.1 * 5))


def test_percentile_observer_ignores_the_outlying_tail():
    observer = PercentileObserver(percentile=99.0)
    observer.observe(torch.arange(10001, dtype=torch.float32))

    low, high = observer.range()

    # Linear interpolation over 0..10000: the 1st and 99th percentiles are 100 and 9900.
    assert low == pytest.approx(100.0)
    assert high == pytest.approx(9900.0)


def test_omse_observer_clips_outlier():
    values = torch.cat([torch.linspace(0, 1, 20000), torch.tensor([100.0])])
    omse, minmax = OmseObserver(), MinMaxObserver()
    omse.observe(values)
    minmax.observe(values)

    def error(bounds):
        scale, zero_point = asymmetric_qparams(torch.tensor(bounds[0]), torch.tensor(bounds[1]), 8)
        return float(((fake_quantize(values, scale, zero_point, 8) - values) ** 2).mean())

    assert omse.range()[1] < 100.0
    assert error(omse.range()) < error(minmax.range())


def test_unknown_calibrator_is_named():
    with pytest.raises(ValueError, match="'kl'.*minmax, ema, percentile, omse"):
        make_observer("kl")


def test_empty_observer_raises_with_advice():
    with pytest.raises(RuntimeError, match="run calibration frames"):
        MinMaxObserver().range()


def test_power_of_two_factors_follow_each_channel_range():
    quantizer = PowerOfTwoFactorQuantizer(channels=2, bits=8, factor_bits=3)
    quantizer.start_observing()
    quantizer(torch.tensor([[0.0, -8.0], [1.5, 8.0]]))
    quantizer.finish_observing()

    # Global range [-8, 8]: scale 16/255, zero point 127.5 rounded, base scale 2/255. Channel 0
    # ([0, 1.5]) does not fit alpha 0 (top about 1.0) but fits alpha 1 (about 2.0); channel 1 needs 3.
    assert quantizer.factor.tolist() == [1.0, 3.0]
    assert float(quantizer.zero_point) in (127.0, 128.0)
    assert float(quantizer.scale) == pytest.approx(2 / 255)


def test_power_of_two_factor_narrow_channel():
    narrow = torch.linspace(0, 1, 101)
    wide = torch.linspace(-8, 8, 101)
    x = torch.stack([narrow, wide], dim=1)
    ptf = PowerOfTwoFactorQuantizer(channels=2)
    ptf.start_observing()
    ptf(x)
    ptf.finish_observing()
    scale, zero_point = asymmetric_qparams(x.min(), x.max(), 8)

    ptf_error = float(((ptf(x)[:, 0] - narrow) ** 2).mean())
    tensor_error = float(((fake_quantize(narrow, scale, zero_point, 8) - narrow) ** 2).mean())

    assert ptf_error < tensor_error / 2
