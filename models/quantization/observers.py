"""Activation range calibrators: MinMax, EMA, Percentile and OMSE.

Each observer receives the activations of one tensor over the calibration frames and
returns the clipping range ``(low, high)`` that the tensor's 8-bit grid covers.
The four are the ones FQ-ViT (Lin et al. 2022) compares, and the M3DM
lightening paper after it.
"""

from __future__ import annotations

import torch

from qcstream.models.compression_options import CALIBRATORS

__all__ = ["CALIBRATORS", "ChannelMinMaxObserver", "EmaObserver", "MinMaxObserver", "OmseObserver", "PercentileObserver", "make_observer"]


class RangeObserver:
    """Base class: track the running minimum and maximum; subclasses refine the range."""

    def __init__(self, bits: int = 8) -> None:
        self.bits = bits
        self.low: float | None = None
        self.high: float | None = None
        self.batches = 0

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        low, high = float(x.min()), float(x.max())
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)
        self.batches += 1

    def range(self) -> tuple[float, float]:
        if self.low is None or self.high is None:
            raise RuntimeError("the observer saw no activations: run calibration frames through the model first")
        return self.low, self.high


class MinMaxObserver(RangeObserver):
    """The minimum and maximum over all calibration frames."""


class EmaObserver(RangeObserver):
    """An exponential moving average of each batch's minimum and maximum."""

    def __init__(self, bits: int = 8, momentum: float = 0.9) -> None:
        super().__init__(bits)
        self.momentum = momentum
        self.ema: tuple[float, float] | None = None

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        low, high = float(x.min()), float(x.max())
        if self.ema is None:
            self.ema = (low, high)
        else:
            m = self.momentum
            self.ema = (m * self.ema[0] + (1 - m) * low, m * self.ema[1] + (1 - m) * high)
        super().observe(x)

    def range(self) -> tuple[float, float]:
        super().range()
        return self.ema


class _SampledObserver(RangeObserver):
    """Keep a fixed-size random sample of the activations for range searches."""

    def __init__(self, bits: int = 8, sample_size: int = 1 << 20, per_batch: int = 1 << 16, seed: int = 0) -> None:
        super().__init__(bits)
        self.sample_size = sample_size
        self.per_batch = per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []

    def observe(self, x: torch.Tensor) -> None:
        super().observe(x)
        flat = x.detach().float().reshape(-1)
        if flat.numel() > self.per_batch:
            flat = flat[torch.randint(flat.numel(), (self.per_batch,), generator=self.generator)]
        self.samples.append(flat.clone())
        total = sum(s.numel() for s in self.samples)
        if total > self.sample_size:
            merged = torch.cat(self.samples)
            keep = torch.randperm(merged.numel(), generator=self.generator)[: self.sample_size]
            self.samples = [merged[keep]]

    def sample(self) -> torch.Tensor:
        super().range()
        return torch.cat(self.samples)


class PercentileObserver(_SampledObserver):
    """The ``100 - percentile`` and ``percentile`` quantiles of the sampled activations."""

    def __init__(self, bits: int = 8, percentile: float = 99.99, **kwargs) -> None:
        super().__init__(bits, **kwargs)
        self.percentile = percentile

    def range(self) -> tuple[float, float]:
        sample = self.sample()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        low, high = torch.quantile(sample, q).tolist()
        return low, high


class OmseObserver(_SampledObserver):
    """The range, shrunk from MinMax, that minimises the mean squared quantization error.

    OMSE (Choukroun et al. 2019) searches the clipping range; here over ``steps``
    shrink factors of the MinMax range, on the sampled activations.
    """

    def __init__(self, bits: int = 8, steps: int = 50, min_shrink: float = 0.3, **kwargs) -> None:
        super().__init__(bits, **kwargs)
        self.steps = steps
        self.min_shrink = min_shrink

    def range(self) -> tuple[float, float]:
        from qcstream.models.quantization.quantizers import asymmetric_qparams, fake_quantize

        sample = self.sample()
        low, high = self.low, self.high
        best, best_error = (low, high), float("inf")
        for shrink in torch.linspace(self.min_shrink, 1.0, self.steps).tolist():
            scale, zero_point = asymmetric_qparams(torch.tensor(low * shrink), torch.tensor(high * shrink), self.bits)
            error = float(((fake_quantize(sample, scale, zero_point, self.bits) - sample) ** 2).mean())
            if error < best_error:
                best, best_error = (low * shrink, high * shrink), error
        return best


class ChannelMinMaxObserver:
    """Per-channel minimum and maximum over the last dimension (for LayerNorm inputs)."""

    def __init__(self) -> None:
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def observe(self, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1, x.shape[-1])
        low, high = flat.amin(dim=0), flat.amax(dim=0)
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.low is None or self.high is None:
            raise RuntimeError("the observer saw no activations: run calibration frames through the model first")
        return self.low, self.high


def make_observer(calibrator: str, bits: int = 8) -> RangeObserver:
    """Return a fresh observer for ``calibrator``, one of :data:`CALIBRATORS`."""
    observers = {"minmax": MinMaxObserver, "ema": EmaObserver, "percentile": PercentileObserver, "omse": OmseObserver}
    if calibrator not in observers:
        raise ValueError(f"unknown calibrator {calibrator!r}; choose one of {', '.join(CALIBRATORS)}")
    return observers[calibrator](bits)
