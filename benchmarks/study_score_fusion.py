"""Compare decision-fusion rules of the multimodal detector from one fit per part type.

    .venv/bin/python benchmarks/study_score_fusion.py ring plate bagel

For each generated part type (224 x 224, FPFH point features, written to
``--output`` when missing), one "rgb+xyz" model is fitted. The three memory banks'
image and patch scores of the validation and test frames are then fused by each
rule below. For each rule the script prints image AUROC, pixel AUROC and AUPRO up
to 30% FPR, over all defects and per defect modality (3D-only, colour-only, both):

- each bank alone (RGB, points, fused features);
- patch fusion by a linear or an RBF one-class SVM, with the image score taken as
  the maximum fused patch score or from a linear or RBF image-level SVM;
- the sum of standardised bank scores, as a reference that learns nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from qcstream.models import data as data_io
from qcstream.models.anomaly_map import anomaly_map_from_patches
from qcstream.models.decision_fusion import ScoreFusion
from qcstream.models.metrics import aupro, image_auroc, pixel_auroc
from qcstream.models.multimodal import Frame, MultimodalDetector
from qcstream.models.multimodal_config import MultimodalConfig
from qcstream.models.scan_generator import DEFECT_TYPES, write_dataset

logger = logging.getLogger(__name__)

SIZE = 224


def bank_scores(detector: MultimodalDetector, samples: list[data_io.Sample]) -> tuple[np.ndarray, np.ndarray]:
    """Image scores ``(N, 3)`` and patch scores ``(N, h, w, 3)`` of the three banks."""
    images, patches = [], []
    names = list(detector.banks_)
    for start in range(0, len(samples), 8):
        frames = [Frame.from_sample(sample) for sample in samples[start : start + 8]]
        scores = detector._bank_scores(frames)
        images.append(np.stack([scores.image[name] for name in names], axis=1))
        patches.append(torch.stack([scores.patches[name] for name in names], dim=-1).numpy())
    return np.concatenate(images), np.concatenate(patches)


def report(part: str, rule: str, test: list[data_io.Sample], image: np.ndarray, patches: np.ndarray, blur_sigma: float) -> None:
    labels = np.array([sample.label for sample in test])
    masks = [data_io.load_mask(sample.mask_path, (SIZE, SIZE)) for sample in test]
    maps = [anomaly_map_from_patches(torch.as_tensor(p, dtype=torch.float32)[None], (SIZE, SIZE), blur_sigma)[0].numpy() for p in patches]

    cells = [f"{image_auroc(labels, image):.3f}", f"{pixel_auroc(masks, maps):.3f}", f"{aupro(masks, maps):.3f}"]
    for modality in ("3d", "rgb", "both"):
        keep = [i for i, sample in enumerate(test) if sample.label == 0 or DEFECT_TYPES.get(sample.defect_type) == modality]
        kept_aupro = aupro([masks[i] for i in keep], [maps[i] for i in keep])
        cells.append(f"{image_auroc(labels[keep], image[keep]):.2f} / {kept_aupro:.2f}")
    print(f"| {part} | {rule} | " + " | ".join(cells) + " |", flush=True)


def study(part: str, output: Path) -> None:
    if not (output / part).is_dir():
        write_dataset(output, part, seed=0, size=(SIZE, SIZE), progress=False)
    root = output / part
    config = MultimodalConfig(image_size=(SIZE, SIZE), cloud_size=(SIZE, SIZE), feature_grid=(28, 28))
    detector = MultimodalDetector(config).fit(data_io.discover(root, "train"), data_io.discover(root, "validation"), progress=False)

    validation_images, validation_patches = bank_scores(detector, data_io.discover(root, "validation"))
    test = data_io.discover(root, "test")
    test_images, test_patches = bank_scores(detector, test)
    flat_validation = validation_patches.reshape(-1, 3)
    flat_test = test_patches.reshape(-1, 3)

    for column, name in enumerate(detector.banks_):
        report(part, f"{name} bank alone", test, test_images[:, column], test_patches[..., column], config.blur_sigma)
    for patch_kernel in ("linear", "rbf"):
        fused = ScoreFusion(kernel=patch_kernel).fit(flat_validation).score(flat_test).reshape(test_patches.shape[:-1])
        report(part, f"patch {patch_kernel}, image = max patch", test, fused.reshape(len(test), -1).max(axis=1), fused, config.blur_sigma)
        for image_kernel in ("linear", "rbf"):
            image = ScoreFusion(kernel=image_kernel).fit(validation_images).score(test_images)
            report(part, f"patch {patch_kernel}, image SVM {image_kernel}", test, image, fused, config.blur_sigma)

    mean, spread = flat_validation.mean(axis=0), flat_validation.std(axis=0)
    summed = ((test_patches - mean) / spread).sum(axis=-1)
    report(part, "sum of standardised scores", test, summed.reshape(len(test), -1).max(axis=1), summed, config.blur_sigma)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="+", help="part types: ring, plate, bagel")
    parser.add_argument("--output", type=Path, default=Path("/tmp/qcstream-scans"), help="folder of the generated data sets")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print("| part | rule | I-AUROC | P-AUROC | AUPRO@30% | 3D-only I / PRO | colour-only I / PRO | both I / PRO |")
    print("|---|---|---|---|---|---|---|---|")
    for part in args.parts:
        study(part, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
