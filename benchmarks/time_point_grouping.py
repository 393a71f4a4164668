"""Time the Point-MAE grouping alone: farthest point sampling and kNN, outside the transformer.

    .venv/bin/python benchmarks/time_point_grouping.py --model-dir /tmp/pbench-points/fp32 --data /tmp/qcstream-scans/ring

Uses the same 8 test frames as ``bench_quantization.py`` and ``bench_pruning.py``
and prints the median milliseconds per frame over 3 rounds. Pruning and
quantization leave this part unchanged.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qcstream.models import data as data_io
from qcstream.models.detector import load_detector
from qcstream.models.multimodal import Frame
from qcstream.models.point_ops import group_points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True, help="fitted multimodal model with a Point-MAE encoder")
    parser.add_argument("--data", type=Path, required=True, help="MVTec 3D-AD layout data set root")
    parser.add_argument("--timed-frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    detector = load_detector(args.model_dir)
    encoder = detector.point_extractor.encoder
    test = data_io.discover(args.data, "test")
    picks = np.linspace(0, len(test) - 1, args.timed_frames).round().astype(int)
    inputs = [detector.point_extractor.encoder_input(Frame.from_sample(test[i]).xyz) for i in picks]

    timings = []
    with torch.inference_mode():
        group_points(inputs[0], encoder.num_groups, encoder.group_size)  # warm-up
        for _ in range(args.repeats):
            for points in inputs:
                started = time.perf_counter()
                group_points(points, encoder.num_groups, encoder.group_size)
                timings.append((time.perf_counter() - started) * 1000)
    print(f"grouping: median {statistics.median(timings):.1f} ms per frame over {len(timings)} calls")


if __name__ == "__main__":
    main()
